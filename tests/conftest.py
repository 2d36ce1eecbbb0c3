"""Shared fixtures: a real broker, and an isolated topology namespace per test.

Broker resolution, in order: `AMQP_URL` if set; RabbitMQ on 127.0.0.1:5672 if it answers; a
testcontainers RabbitMQ if a Docker engine answers; otherwise the broker tests fail with a
message saying how to get a broker (never a silent skip, and never in CI).
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from urllib.parse import urlsplit

import aio_pika
import pytest

from contracts.topology import dead_letter_exchange, events_exchange
from services.messaging.settings import CourierSettings

LOCAL_URL = "amqp://guest:guest@127.0.0.1:5672/"


def _answers(url: str, default_port: int = 5672) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or default_port), 2
        ):
            return True
    except OSError:
        return False


def _docker_broker(stack: ExitStack) -> str | None:
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env().ping()
    except Exception:  # noqa: BLE001  # any failure means "no engine here"
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from testcontainers.rabbitmq import RabbitMqContainer

    container = stack.enter_context(RabbitMqContainer("rabbitmq:3.13-management"))
    host, port = container.get_container_host_ip(), container.get_exposed_port(5672)
    return f"amqp://guest:guest@{host}:{port}/"


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    with ExitStack() as stack:
        url = os.environ.get("AMQP_URL")
        if url is None and _answers(LOCAL_URL):
            url = LOCAL_URL
        if url is None:
            url = _docker_broker(stack)
        if url is None or not _answers(url):
            pytest.fail(
                "No RabbitMQ broker for the tests. Set AMQP_URL, start one on 127.0.0.1:5672 "
                "(`rabbitmq-server -detached`, or `docker compose up -d rabbitmq`), or run a "
                "Docker engine so testcontainers can start one.",
                pytrace=False,
            )
        yield url


class Namespace:
    """A topology namespace private to one test; removes every queue it could have made."""

    def __init__(self, amqp_url: str) -> None:
        self.name = f"t{uuid.uuid4().hex[:12]}"
        self.amqp_url = amqp_url
        self._settings: list[CourierSettings] = []

    def settings(self, **overrides: object) -> CourierSettings:
        settings = CourierSettings(amqp_url=self.amqp_url, namespace=self.name, **overrides)  # type: ignore[arg-type]
        self.remember(settings)
        return settings

    def remember(self, settings: CourierSettings) -> None:
        self._settings.append(settings)

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for a service process living in this namespace."""
        if "COURIER_RETRY_DELAYS" in extra:
            self.settings(retry_delays=extra["COURIER_RETRY_DELAYS"])
        return {
            **os.environ,
            "AMQP_URL": self.amqp_url,
            "COURIER_NAMESPACE": self.name,
            **extra,
        }

    async def cleanup(self) -> None:
        connection = await aio_pika.connect(self.amqp_url)
        async with connection:
            for settings in [*self._settings, CourierSettings(namespace=self.name)]:
                for topology in settings.all_topologies():
                    for queue in topology.queues():
                        channel = await connection.channel()
                        await channel.queue_delete(queue.name)
                        await channel.close()
            channel = await connection.channel()
            for exchange in (events_exchange(self.name), dead_letter_exchange(self.name)):
                await channel.exchange_delete(exchange)


@pytest.fixture
async def namespace(amqp_url: str) -> AsyncIterator[Namespace]:
    ns = Namespace(amqp_url)
    yield ns
    await ns.cleanup()


POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture(scope="session")
def postgres_url() -> str:
    url = os.environ.get("TEST_DATABASE_URL", POSTGRES_URL)
    if not _answers(url, default_port=5432):
        pytest.fail(
            f"No PostgreSQL for the storage tests at {url}. Start one "
            "(`pg_ctlcluster 15 main start`) or set TEST_DATABASE_URL.",
            pytrace=False,
        )
    return url


def _admin(postgres_url: str, statement: str) -> None:
    """Run one admin statement on its own loop (usable from sync and async fixtures alike)."""
    import asyncpg  # type: ignore[import-untyped]

    async def run() -> None:
        connection = await asyncpg.connect(postgres_url)
        try:
            await connection.execute(statement)
        finally:
            await connection.close()

    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, run()).result()


def _scratch_database(postgres_url: str) -> Iterator[str]:
    name = f"t{uuid.uuid4().hex[:12]}"
    _admin(postgres_url, f'CREATE DATABASE "{name}"')
    try:
        yield postgres_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        _admin(postgres_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def postgres_database(postgres_url: str) -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    yield from _scratch_database(postgres_url)


@pytest.fixture(scope="module")
def module_database(postgres_url: str) -> Iterator[str]:
    """One PostgreSQL database for a module (creating one per test costs about a second);
    its tests use their own event ids and keys."""
    yield from _scratch_database(postgres_url)
