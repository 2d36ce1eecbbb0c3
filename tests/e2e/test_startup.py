"""How a service process starts, or refuses to: real processes, exit codes (the same for the
gateway and the consumers)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import aio_pika
import httpx
import orjson
import pytest

from services.messaging.declare import declare_topology
from tests.conftest import Namespace
from tests.support.polling import eventually_sync
from tests.support.processes import consumer, free_port
from tests.support.stores import claimed_by

pytestmark = [pytest.mark.e2e, pytest.mark.broker]


def run_alone(
    module: str, data_dir: Path, env: dict[str, str] | None = None, **settings: str
) -> subprocess.CompletedProcess[str]:
    """`python -m <module>` with `settings` in its environment (`env`, or this process's), to
    its end: for a service that refuses to start or to go on."""
    return subprocess.run(
        [sys.executable, "-m", module],
        env={**(env or os.environ), "COURIER_DATA_DIR": str(data_dir), **settings},
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=30,
    )


def gateway_alone(
    namespace: Namespace, data_dir: Path, port: int | None = None, **settings: str
) -> subprocess.CompletedProcess[str]:
    """`run_alone` for a gateway of `namespace` (development settings) on `port`, or a free
    one."""
    env = namespace.env(COURIER_PORT=str(port or free_port()), COURIER_ENVIRONMENT="development")
    return run_alone("services.gateway", data_dir, env, **settings)


def broker_away(namespace: Namespace, data_dir: Path, unready_exit_after: str) -> dict[str, str]:
    """A consumer's environment whose broker does not answer."""
    return namespace.env(
        AMQP_URL=f"amqp://guest:guest@127.0.0.1:{free_port()}/",
        COURIER_UNREADY_EXIT_AFTER=unready_exit_after,
        COURIER_DATA_DIR=str(data_dir),
    )


async def declared_with_delivery_limit_3(namespace: Namespace) -> None:
    connection = await aio_pika.connect(namespace.amqp_url)
    async with connection:
        await declare_topology(connection, namespace.settings(delivery_limit=3).all_topologies())


async def test_a_consumer_refuses_a_queue_declared_differently_with_exit_code_2(
    namespace: Namespace, tmp_path: Path
) -> None:
    await declared_with_delivery_limit_3(namespace)
    env = namespace.env(COURIER_DELIVERY_LIMIT="9", COURIER_DATA_DIR=str(tmp_path))
    notifier = consumer("notifier", env, tmp_path).start()
    assert notifier.process is not None
    assert notifier.process.wait(30) == 2
    assert "x-delivery-limit" in notifier.log()


async def test_the_gateway_refuses_a_queue_declared_differently_with_exit_code_2(
    namespace: Namespace, tmp_path: Path
) -> None:
    # As the consumers do; before, it stayed up, unready, and took events into the queues.
    await declared_with_delivery_limit_3(namespace)
    done = gateway_alone(namespace, tmp_path, COURIER_DELIVERY_LIMIT="9")
    assert done.returncode == 2
    assert "topology mismatch; refusing to start" in done.stderr
    assert "x-delivery-limit" in done.stderr


@contextmanager
def port_taken() -> Iterator[int]:
    """A port on 127.0.0.1 something else listens on, while the block runs."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


def the_line_naming(setting: str, stderr: str) -> dict[str, Any]:
    """The one JSON log line that names `setting`."""
    [line] = [orjson.loads(line) for line in stderr.splitlines() if setting in line]
    return cast(dict[str, Any], line)


def test_the_gateway_exits_1_when_its_port_is_taken(namespace: Namespace, tmp_path: Path) -> None:
    # It had connected to the broker meanwhile: that connection must not keep it alive.
    with port_taken() as port:
        done = gateway_alone(namespace, tmp_path, port=port)
    assert done.returncode == 1
    assert "address already in use" in done.stderr
    # Which setting to look at, in a line of its own (uvicorn's says neither).
    refusal = the_line_naming("COURIER_PORT", done.stderr)
    assert refusal["level"] == "ERROR" and refusal["port"] == port


@pytest.mark.parametrize(
    "database_url",
    [
        "sqlite:////nonexistent/directory/gateway.sqlite3",  # a file that cannot be made
        "postgresql://postgres@127.0.0.1:{port}/test",  # a server that is not there
    ],
    ids=["sqlite", "postgresql"],
)
def test_the_gateway_exits_1_when_its_store_cannot_be_opened(
    namespace: Namespace, tmp_path: Path, database_url: str
) -> None:
    # As a consumer does, for its supervisor to start it again; 3 says another namespace's.
    done = gateway_alone(namespace, tmp_path, DATABASE_URL=database_url.format(port=free_port()))
    assert done.returncode == 1


async def test_the_gateway_on_a_store_of_another_namespace_exits_3(
    namespace: Namespace, tmp_path: Path
) -> None:
    await claimed_by("another-deployment", tmp_path, "gateway")
    done = gateway_alone(namespace, tmp_path)
    assert done.returncode == 3
    assert "'another-deployment', not" in done.stderr


async def test_a_consumer_on_a_store_of_another_namespace_exits_3_naming_it(
    namespace: Namespace, tmp_path: Path
) -> None:
    await claimed_by("another-deployment", tmp_path, "processor")
    env = namespace.env(COURIER_DATA_DIR=str(tmp_path))
    processor = consumer("processor", env, tmp_path).start()
    assert processor.process is not None
    assert processor.process.wait(30) == 3
    assert "'another-deployment', not" in processor.log()


@pytest.mark.parametrize("service", ["services.processor", "services.notifier", "services.gateway"])
def test_an_invalid_setting_exits_4_naming_its_variable_without_a_traceback(
    service: str, tmp_path: Path
) -> None:
    done = run_alone(service, tmp_path, COURIER_PREFETCH="many", COURIER_PORT="many")
    assert done.returncode == 4
    assert "invalid setting COURIER_" in done.stderr and "valid integer" in done.stderr
    assert "Traceback" not in done.stderr


def test_every_problem_of_the_settings_is_told_at_once(tmp_path: Path) -> None:
    """Checks across settings too: not one problem a start."""
    done = run_alone(
        "services.notifier",
        tmp_path,
        COURIER_ENVIRONMENT="production",
        COURIER_WEBHOOK_SECRET="short",
        COURIER_SMTP_HOST="mail.example.org",
        COURIER_SMTP_USERNAME="courier",
        COURIER_SMTP_PASSWORD="changeme",
    )
    assert done.returncode == 4
    told = [line for line in done.stderr.splitlines() if line.startswith("invalid settings: ")]
    assert [line.split()[2] for line in told] == [
        "COURIER_SMTP_FROM",
        "COURIER_WEBHOOK_SECRET",
        "COURIER_SMTP_PASSWORD",
    ]


def test_a_consumer_whose_health_port_is_taken_exits_1_naming_the_settings(
    namespace: Namespace, tmp_path: Path
) -> None:
    # It printed a raw traceback, not a log line, naming neither setting.
    with port_taken() as port:
        done = run_alone(
            "services.processor", tmp_path, namespace.env(COURIER_HEALTH_PORT=str(port))
        )
    assert done.returncode == 1
    refusal = the_line_naming("COURIER_HEALTH", done.stderr)
    assert refusal["level"] == "ERROR"
    assert "address already in use" in refusal["error"]


def test_a_consumer_without_a_broker_exits_1_after_its_grace_period(
    namespace: Namespace, tmp_path: Path
) -> None:
    processor = consumer("processor", broker_away(namespace, tmp_path, "2"), tmp_path).start()
    assert processor.process is not None
    assert processor.process.wait(30) == 1
    assert not processor.ready()


def test_a_consumer_waiting_for_its_broker_is_alive_and_not_ready(
    namespace: Namespace, tmp_path: Path
) -> None:
    # A liveness probe that cannot connect would restart it before its own grace period ends.
    notifier = consumer("notifier", broker_away(namespace, tmp_path, "60"), tmp_path).start()
    try:

        def answers() -> None:
            try:
                alive = httpx.get(notifier.health_url.replace("/readyz", "/healthz"), timeout=1)
                ready = httpx.get(notifier.health_url, timeout=1)
            except httpx.ConnectError as exc:
                raise AssertionError(f"not listening yet: {exc}") from None
            assert (alive.status_code, ready.status_code) == (200, 503)

        eventually_sync(answers, timeout=30)
    finally:
        notifier.kill()


def test_a_consumer_told_to_stop_while_it_waits_for_its_broker_exits_0_at_once(
    namespace: Namespace, tmp_path: Path
) -> None:
    # It waited on until COURIER_UNREADY_EXIT_AFTER and then exited 1, as if it had failed.
    processor = consumer("processor", broker_away(namespace, tmp_path, "120"), tmp_path).start()
    try:

        def waiting() -> None:
            assert "broker not reachable; retrying" in processor.log()

        eventually_sync(waiting, timeout=30)
        assert processor.terminate(timeout=15) == 0
        assert "stopped while waiting for the broker" in processor.log()
    finally:
        processor.kill()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_consumer_told_to_stop_while_its_store_does_not_answer_exits_0(
    namespace: Namespace, tmp_path: Path, sig: signal.Signals
) -> None:
    # A PostgreSQL that takes the connection and never answers (asyncpg waits 60 s): the
    # signal handlers came after the store's claim, so a stop then killed the process.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = f"postgresql://postgres@127.0.0.1:{silent.getsockname()[1]}/x"
        processor = consumer("processor", namespace.env(DATABASE_URL=url), tmp_path).start()
        try:
            assert processor.process is not None
            silent.settimeout(20)
            taken, _ = silent.accept()  # the store's connection: its answer awaited
            with taken:
                processor.process.send_signal(sig)
                assert processor.process.wait(15) == 0, processor.log()
            assert "stopped while opening the store" in processor.log()
        finally:
            processor.kill()


def test_a_consumer_told_to_stop_twice_exits_0(namespace: Namespace, tmp_path: Path) -> None:
    # A supervisor or an operator asking again: once stopped, the loop's handlers were gone
    # and the second SIGTERM killed the process (exit -15) on its way out.
    processor = consumer("processor", namespace.env(), tmp_path).start().wait_ready(60)
    try:
        assert processor.process is not None
        while processor.process.poll() is None:
            processor.process.send_signal(signal.SIGTERM)
            time.sleep(0.01)
        assert processor.process.wait(60) == 0, processor.log()
    finally:
        processor.kill()


def test_the_notifier_logs_which_channels_it_delivers_on(
    namespace: Namespace, tmp_path: Path
) -> None:
    # What the gateway's COURIER_NOTIFY_CHANNELS should list: here no webhook secret and no
    # SMTP server, so only the log channel.
    env = namespace.env(
        COURIER_DATA_DIR=str(tmp_path), COURIER_NOTIFY_LOG=str(tmp_path / "n.jsonl")
    )
    for unset in ("COURIER_WEBHOOK_SECRET", "COURIER_WEBHOOK_SECRETS", "COURIER_SMTP_HOST"):
        env.pop(unset, None)
    notifier = consumer("notifier", env, tmp_path).start()
    try:
        notifier.wait_ready()
        [line] = [
            record
            for record in (
                orjson.loads(text) for text in notifier.log().splitlines() if text.startswith("{")
            )
            if record.get("message") == "notification channels"
        ]
        assert (line["configured"], line["not_configured"]) == (["log"], ["webhook", "email"])
    finally:
        notifier.kill()
