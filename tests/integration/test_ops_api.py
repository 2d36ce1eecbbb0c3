"""The ops API (`/v1/ops`) of an in-process gateway on a real broker and a real store.

Dead letters reach the store the way they do in production: a real `Consumer` (or the broker
itself, for `delivery_limit`) puts them in a dead-letter queue, and the gateway's drain moves
them into its failure store, acknowledging each only once the store committed it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import itertools
import logging
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
import tracemalloc
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import httpx
import orjson
import pytest
from aio_pika.abc import AbstractIncomingMessage
from sqlalchemy import text, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

from contracts.events import NotificationRequested, NotificationRequestedData
from contracts.topology import control_queue, dead_letter_queue, lane_queue, work_queue
from services.gateway.app import create_app
from services.gateway.letters import keep_letters
from services.gateway.settings import GatewaySettings
from services.gateway.tracking import Tracking
from services.messaging import failure as f
from services.messaging.consumer import Consumer, Route
from services.messaging.dead_letters import DeadLetter, DeadLetterDrain, Sink
from services.messaging.declare import declare_topology
from services.messaging.errors import PermanentError
from services.messaging.inbox import Inbox
from services.messaging.publisher import Publisher
from services.messaging.retry import RetryPolicy
from services.messaging.settings import CourierSettings
from services.messaging.store import open_store, store_url
from services.ops.operations import Operations, Outcome, together
from services.ops.store import FailureStore, Filter, dead_letters
from tests.conftest import Namespace
from tests.integration.conftest import OPS_TOKEN, gateway_client, gateway_settings
from tests.integration.test_failure_store import letter
from tests.support.polling import eventually
from tests.support.processes import REPO
from tests.support.queues import assert_empty, ready_messages, take
from tests.support.tcp_proxy import TcpProxy

AUTH = {"Authorization": f"Bearer {OPS_TOKEN}"}
WRONG_TOKEN = "wrong-but-plausible-ops-token-9876543210"
HEX16 = re.compile(r"^[0-9a-f]{16}$")
DELAYS = (1,)


@asynccontextmanager
async def running_gateway(settings: GatewaySettings) -> AsyncIterator[httpx.AsyncClient]:
    """The in-process gateway; its lifespan ends (drain stopped) when the block is left."""
    clients = gateway_client(settings)
    client = await anext(clients)
    try:
        yield client
    finally:
        with suppress(StopAsyncIteration):
            await anext(clients)


def topology_settings(namespace: Namespace, **overrides: Any) -> dict[str, Any]:
    """Topology settings shared by the gateway and the test's own consumer and publisher."""
    values: dict[str, Any] = {"retry_delays": DELAYS, "delivery_limit": 1, **overrides}
    namespace.settings(**values)
    return values


async def letters(client: httpx.AsyncClient, **params: Any) -> list[dict[str, Any]]:
    response = await client.get("/v1/ops/dead-letters", params=params, headers=AUTH)
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


# --- authentication ----------------------------------------------------------------------------


def ops_requests(app_settings: GatewaySettings) -> list[tuple[str, str, dict[str, Any] | None]]:
    """Every route under /v1/ops with a body it would accept: (method, path, json)."""
    bodies: dict[str, dict[str, Any]] = {
        "/v1/ops/replays": {"ids": ["x"], "dry_run": True},
        "/v1/ops/discards": {"ids": ["x"], "why": "test", "dry_run": True},
    }
    found: list[tuple[str, str, dict[str, Any] | None]] = []
    # From the OpenAPI document, so a route added later is covered without editing this test.
    for path, operations in create_app(app_settings).openapi()["paths"].items():
        if path.startswith("/v1/ops"):
            concrete = path.replace("{letter_id}", "no-such-letter")
            found.extend((method.upper(), concrete, bodies.get(path)) for method in operations)
    assert len(found) >= 6, found
    return found


@pytest.fixture
def unstarted_app_settings(tmp_path: Path) -> GatewaySettings:
    # Authentication needs no broker and no store: the app is not even started.
    return GatewaySettings(
        namespace="auth-only", data_dir=tmp_path, ops_tokens={"tester": OPS_TOKEN}
    )


async def test_every_ops_route_needs_a_token(unstarted_app_settings: GatewaySettings) -> None:
    app = create_app(unstarted_app_settings)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        for method, path, body in ops_requests(unstarted_app_settings):
            for headers in (
                {},
                {"Authorization": f"Basic {OPS_TOKEN}"},
                {"Authorization": "Bearer"},
                {"Authorization": OPS_TOKEN},
            ):
                response = await client.request(method, path, json=body, headers=headers)
                assert response.status_code == 401, (method, path, headers, response.text)
                assert response.headers["www-authenticate"] == "Bearer", (method, path)
            # An invalid body is not even looked at without a token.
            response = await client.request(method, path, json={"junk": True})
            assert response.status_code == 401, (method, path)


async def test_a_wrong_token_is_forbidden(unstarted_app_settings: GatewaySettings) -> None:
    app = create_app(unstarted_app_settings)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        for method, path, body in ops_requests(unstarted_app_settings):
            for token in (WRONG_TOKEN, OPS_TOKEN[:-1], OPS_TOKEN + "x", OPS_TOKEN.upper()):
                response = await client.request(
                    method, path, json=body, headers={"Authorization": f"Bearer {token}"}
                )
                assert response.status_code == 403, (method, path, token, response.text)
                assert token not in response.text


async def test_an_ops_body_is_not_read_without_a_valid_token(
    unstarted_app_settings: GatewaySettings,
) -> None:
    # FastAPI reads and parses a route's JSON body before it solves the route's dependencies:
    # without a token, a body of any size was read and parsed (a 40 MB list of numbers stalled
    # a gateway's event loop for 4 s) before the 401.
    app = create_app(unstarted_app_settings)
    transport = httpx.ASGITransport(app=app)
    pulled: list[int] = []

    async def body() -> AsyncIterator[bytes]:
        yield b'{"ids": ['
        for _ in range(64):
            pulled.append(1)
            yield b'"x",' * 16384
        yield b'"x"]}'

    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        for path in ("/v1/ops/replays", "/v1/ops/discards"):
            for headers in ({}, {"Authorization": f"Bearer {WRONG_TOKEN}"}):
                pulled.clear()
                response = await client.post(
                    path,
                    content=body(),
                    headers={"Content-Type": "application/json", **headers},
                )
                assert response.status_code in (401, 403), (path, response.text)
                assert pulled == [], (path, headers, f"{len(pulled)} chunks of the body read")


async def test_an_ops_body_larger_than_the_body_limit_is_a_413(tmp_path: Path) -> None:
    settings = GatewaySettings(
        namespace="auth-only",
        data_dir=tmp_path,
        ops_tokens={"tester": OPS_TOKEN},
        max_body_bytes=4096,
    )
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app)
    ids = [f"letter-{n}" for n in range(1000)]  # about 13 KB of JSON
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        for path, body in (
            ("/v1/ops/replays", {"ids": ids, "dry_run": True}),
            ("/v1/ops/discards", {"ids": ids, "why": "test", "dry_run": True}),
        ):
            declared = await client.post(path, json=body, headers=AUTH)
            assert declared.status_code == 413, (path, declared.text)

            async def streamed(data: bytes = orjson.dumps(body)) -> AsyncIterator[bytes]:
                for start in range(0, len(data), 1024):  # no Content-Length: chunked
                    yield data[start : start + 1024]

            response = await client.post(
                path, content=streamed(), headers={**AUTH, "Content-Type": "application/json"}
            )
            assert response.status_code == 413, (path, response.text)


@pytest.mark.broker
async def test_tokens_never_reach_the_logs(
    namespace: Namespace, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = gateway_settings(namespace, tmp_path)
    async with running_gateway(settings) as client:
        for method, path, body in ops_requests(settings):
            allowed = await client.request(method, path, json=body, headers=AUTH)
            assert allowed.status_code not in (401, 403), (method, path, allowed.text)
            denied = await client.request(
                method, path, json=body, headers={"Authorization": f"Bearer {WRONG_TOKEN}"}
            )
            assert denied.status_code == 403
        actions = (await client.get("/v1/ops/actions", headers=AUTH)).json()["actions"]
        assert {a["actor"] for a in actions} == {"tester"}  # the token's name, not the token
        assert OPS_TOKEN not in str(actions)
    assert caplog.records, "nothing was logged at all: the check would prove nothing"
    for record in caplog.records:
        logged = f"{record.getMessage()} {record.__dict__!r}"
        assert OPS_TOKEN not in logged, record
        assert WRONG_TOKEN not in logged, record


def test_a_refused_token_setting_does_not_echo_the_tokens(tmp_path: Path) -> None:
    good = "a-real-token-of-sufficient-length-0123456789"
    short = "short-secret"
    result = subprocess.run(
        [sys.executable, "-m", "services.gateway"],
        env={
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(REPO),
            "COURIER_ENVIRONMENT": "production",
            "COURIER_OPS_TOKENS": f"alice:{good},bob:{short}",
            "COURIER_DATA_DIR": str(tmp_path),
        },
        cwd=REPO,
        capture_output=True,
        timeout=30,
        check=False,
    )
    output = (result.stdout + result.stderr).decode(errors="replace")
    assert result.returncode != 0 and "shorter than" in output  # it refused, and said why
    for token in (good, short):
        pieces = {token[i : i + 8] for i in range(len(token) - 7)}
        assert not [p for p in pieces if p in output], f"part of {token!r} is in:\n{output}"


# --- ingest: real dead letters through the drain -----------------------------------------------


def notification(subject: str) -> NotificationRequested:
    return NotificationRequested(data=NotificationRequestedData(recipient="r", subject=subject))


async def failing(event: NotificationRequested) -> None:
    subject = event.data.subject
    if subject == "permanent":
        raise PermanentError(f"recipient of {event.id} refused the message")
    if subject.startswith("transient"):
        raise TimeoutError(f"upstream did not answer within {len(subject)} seconds")


@asynccontextmanager
async def failing_consumer(
    namespace: Namespace, topology: Mapping[str, Any]
) -> AsyncIterator[None]:
    """A real `Consumer` for the notifier queue whose handler fails as its subject says."""
    settings = CourierSettings(amqp_url=namespace.amqp_url, namespace=namespace.name, **topology)
    publisher = Publisher(namespace.amqp_url)
    connection = await aio_pika.connect_robust(namespace.amqp_url)
    with tempfile.TemporaryDirectory() as data:
        engine = open_store(store_url(None, Path(data), "notifier"))
        try:
            inbox = Inbox(engine, "notifier")
            await inbox.start()
            await publisher.connect()
            consumer = Consumer(
                topology=settings.topology("notifier"),
                routes={"notification.requested": Route(failing, RetryPolicy(DELAYS, 0))},
                publisher=publisher,
                inbox=inbox,
                prefetch=8,
            )
            await consumer.start(connection)
            yield
            assert await consumer.stop(drain_seconds=5)
        finally:
            await connection.close()
            await publisher.close()
            await engine.dispose()


@asynccontextmanager
async def crashing_consumer(url: str, queue: str) -> AsyncIterator[list[AbstractIncomingMessage]]:
    """Takes every delivery of `queue` and hands it back unsettled (nack, requeue): what a
    consumer that keeps crashing on a message does to it."""
    deliveries: list[AbstractIncomingMessage] = []
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        q = await channel.get_queue(queue, ensure=True)

        async def on_message(message: AbstractIncomingMessage) -> None:
            deliveries.append(message)
            await message.nack(requeue=True)

        tag = await q.consume(on_message)
        yield deliveries
        await q.cancel(tag)


@pytest.mark.broker
async def test_dead_letters_of_every_kind_reach_the_store_with_their_story(
    namespace: Namespace, tmp_path: Path
) -> None:
    topology = topology_settings(namespace)
    settings = gateway_settings(namespace, tmp_path, **topology)
    dlqs = [dead_letter_queue(namespace.name, s) for s in ("notifier", "processor")]
    async with (
        running_gateway(settings) as client,
        failing_consumer(namespace, topology),
        crashing_consumer(namespace.amqp_url, work_queue(namespace.name, "processor")) as crashes,
    ):
        sent = {}
        for subject in ("permanent", "transient-a", "transient-bb"):
            response = await client.post(
                "/v1/events",
                json={
                    "type": "notification.requested",
                    "data": {"recipient": "r", "subject": subject},
                },
            )
            assert response.status_code == 202
            sent[subject] = response.json()["id"]
        response = await client.post(
            "/v1/events", json={"type": "dataset.submitted", "data": {"records": [{"a": 1}]}}
        )
        assert response.status_code == 202
        sent["crash"] = response.json()["id"]
        junk_id = f"junk-{uuid.uuid4()}"
        publisher = Publisher(namespace.amqp_url)
        await publisher.connect()
        try:
            await publisher.publish(
                aio_pika.Message(b'{"type": "notification.requested"}', message_id=junk_id),
                exchange=f"{namespace.name}.events",
                routing_key="notification.requested",
            )
        finally:
            await publisher.close()

        async def all_stored() -> list[dict[str, Any]]:
            found = await letters(client)
            assert len(found) == 5, found
            return found

        stored = {
            item["reason"] + ":" + str(item["event_id"]): item
            for item in await eventually(all_stored, timeout=20)
        }
        shown = {}
        for key, item in stored.items():
            response = await client.get(f"/v1/ops/dead-letters/{item['id']}", headers=AUTH)
            assert response.status_code == 200
            shown[key] = response.json()

        groups = (await client.get("/v1/ops/groups", headers=AUTH)).json()["groups"]

    permanent = shown[f"permanent:{sent['permanent']}"]
    assert permanent["service"] == "notifier"
    assert permanent["queue"] == work_queue(namespace.name, "notifier")
    assert permanent["event_type"] == "notification.requested"
    assert permanent["attempts"] == 1 and permanent["replays"] == 0
    assert permanent["exception_type"] == "services.messaging.errors.PermanentError"
    assert permanent["exception_message"] == f"recipient of {sent['permanent']} refused the message"
    assert 'raise PermanentError(f"recipient of' in permanent["traceback"]
    assert HEX16.match(permanent["fingerprint"]) and HEX16.match(permanent["group_key"])
    assert permanent["payload"]["id"] == sent["permanent"]
    assert permanent["payload"]["data"]["subject"] == "permanent"
    assert permanent["status"] == "dead" and permanent["related"] == []
    assert [entry["action"] for entry in permanent["history"]] == ["dead_lettered"]
    assert permanent["headers"][f.REASON] == "permanent"

    exhausted = [shown[f"retries_exhausted:{sent[s]}"] for s in ("transient-a", "transient-bb")]
    for item in exhausted:
        assert item["service"] == "notifier"
        assert item["attempts"] == 2  # the first delivery and one delayed retry
        assert item["exception_type"] == "builtins.TimeoutError"
        assert "raise TimeoutError(" in item["traceback"]
        assert item["first_failure"] <= item["last_failure"]
    # Same cause, different numbers in the message: one fingerprint, one group.
    assert exhausted[0]["fingerprint"] == exhausted[1]["fingerprint"]
    assert exhausted[0]["group_key"] == exhausted[1]["group_key"]
    assert exhausted[0]["exception_message"] != exhausted[1]["exception_message"]
    assert exhausted[0]["group_key"] != permanent["group_key"]

    invalid = shown[f"invalid:{junk_id}"]
    assert invalid["service"] == "notifier" and invalid["attempts"] == 1
    assert invalid["exception_type"] == "pydantic_core._pydantic_core.ValidationError"
    assert invalid["payload"] == {"type": "notification.requested"}

    broken = shown[f"delivery_limit:{sent['crash']}"]
    assert broken["service"] == "processor"
    assert broken["queue"] == work_queue(namespace.name, "processor")
    assert broken["event_type"] == "dataset.submitted"
    assert "delivery_limit" in broken["exception_message"]
    assert broken["exception_type"] is None and broken["traceback"] is None
    assert HEX16.match(broken["fingerprint"]) and HEX16.match(broken["group_key"])
    assert broken["payload"]["id"] == sent["crash"]
    assert len(crashes) == 2  # delivered, handed back, delivered again, then dead-lettered

    by_group = {g["group"]: g for g in groups}
    assert by_group[exhausted[0]["group_key"]]["count"] == 2
    assert by_group[exhausted[0]["group_key"]]["services"] == ["notifier"]
    assert by_group[broken["group_key"]]["services"] == ["processor"]
    assert by_group[broken["group_key"]]["event_types"] == ["dataset.submitted"]
    assert sum(g["count"] for g in groups) == 5

    # The gateway is stopped: any dead letter it had not acknowledged would be back now.
    await assert_empty(namespace.amqp_url, dlqs)


@pytest.mark.broker
async def test_a_dead_letter_stays_in_its_queue_until_the_store_has_it(
    namespace: Namespace, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = gateway_settings(namespace, tmp_path)
    engine = open_store(store_url(None, tmp_path, "gateway"))
    try:
        async with running_gateway(settings) as client:
            async with engine.begin() as conn:  # the store breaks
                await conn.execute(text("ALTER TABLE ops_dead_letters RENAME TO unavailable"))
            publisher = Publisher(namespace.amqp_url)
            await publisher.connect()
            try:
                await publisher.publish(
                    aio_pika.Message(b"not json", message_id="m-1"),
                    exchange="",
                    routing_key=dead_letter_queue(namespace.name, "notifier"),
                )
            finally:
                await publisher.close()

            async def refused() -> None:
                assert any("could not store a dead letter" in r.message for r in caplog.records)

            await eventually(refused, timeout=10)
            async with engine.begin() as conn:  # the store is back
                await conn.execute(text("ALTER TABLE unavailable RENAME TO ops_dead_letters"))

            async def stored() -> None:
                found = await letters(client)
                assert [item["event_id"] for item in found] == ["m-1"]

            await eventually(stored, timeout=10)
    finally:
        await engine.dispose()
    await assert_empty(namespace.amqp_url, [dead_letter_queue(namespace.name, "notifier")])


@pytest.mark.broker
async def test_the_drain_holds_at_most_its_prefetch_of_a_queue(
    namespace: Namespace, tmp_path: Path
) -> None:
    """`COURIER_DLQ_PREFETCH` bounds the letters the gateway holds in memory from one queue:
    with the store away it holds that many, and the rest wait in the queue."""
    settings = gateway_settings(namespace, tmp_path, dlq_prefetch=2)
    queue = dead_letter_queue(namespace.name, "notifier")
    engine = open_store(store_url(None, tmp_path, "gateway"))
    try:
        async with running_gateway(settings) as client:
            async with engine.begin() as conn:  # the store breaks
                await conn.execute(text("ALTER TABLE ops_dead_letters RENAME TO unavailable"))
            for n in range(5):
                await dead_letter_arrives(namespace, f"m-{n}")

            async def three_wait() -> None:
                assert await ready_messages(namespace.amqp_url, queue) == 3

            await eventually(three_wait, timeout=10)
            await asyncio.sleep(1)  # held, not taken later
            assert await ready_messages(namespace.amqp_url, queue) == 3
            async with engine.begin() as conn:  # the store is back
                await conn.execute(text("ALTER TABLE unavailable RENAME TO ops_dead_letters"))

            async def stored() -> None:
                assert len(await letters(client)) == 5

            await eventually(stored, timeout=30)
    finally:
        await engine.dispose()
    await assert_empty(namespace.amqp_url, [queue])


@asynccontextmanager
async def draining(
    namespace: Namespace, sink: Sink, url: str | None = None
) -> AsyncIterator[tuple[DeadLetterDrain, aio_pika.abc.AbstractRobustConnection]]:
    """A drain of the notifier's dead-letter queue into `sink`, on its own connection (to
    `url`, else the namespace's broker), stopped as the gateway stops it: a letter the sink has
    just taken is acked before the connection closes (closed first, the letter went back to its
    queue, and a test that had seen it kept found it there)."""
    connection = await aio_pika.connect_robust(url or namespace.amqp_url)
    drain = DeadLetterDrain(namespace.name, [dead_letter_queue(namespace.name, "notifier")], sink)
    try:
        await declare_topology(connection, namespace.settings().all_topologies())
        await drain.start(connection)
        yield drain, connection
    finally:
        await drain.stop(drain_seconds=5)
        await connection.close()


class CountingStores(FailureStore):
    """The real store, noting how many letters each of its transactions stored."""

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine)
        self.batches: list[int] = []

    async def store_many(self, letters: Sequence[DeadLetter]) -> list[datetime]:
        self.batches.append(len(letters))
        return await super().store_many(letters)


async def test_dead_letters_delivered_together_are_stored_together(
    namespace: Namespace, tmp_path: Path
) -> None:
    """A transaction per letter, the gateway kept ~430 dead letters a second: after an outage
    that dead-lettered thousands, operators waited minutes to see them. The letters the drain
    holds at once share a transaction."""
    connection = await aio_pika.connect_robust(namespace.amqp_url)
    async with connection, connection.channel() as channel:
        await declare_topology(connection, namespace.settings().all_topologies())
        await asyncio.gather(
            *(
                channel.default_exchange.publish(
                    aio_pika.Message(b"not json", message_id=f"m-{n}"),
                    routing_key=dead_letter_queue(namespace.name, "notifier"),
                )
                for n in range(40)
            )
        )
    engine = open_store(store_url(None, tmp_path, "gateway"))
    store = CountingStores(engine)
    tracking = Tracking(engine)
    try:
        await store.start()
        await tracking.start()
        async with draining(namespace, keep_letters(store, tracking)):

            async def all_stored() -> None:
                assert await store.count(Filter()) == 40

            await eventually(all_stored, timeout=10)
    finally:
        await tracking.close()
        await engine.dispose()
    assert sum(store.batches) == 40
    assert len(store.batches) <= 5, store.batches
    await assert_empty(namespace.amqp_url, [dead_letter_queue(namespace.name, "notifier")])


async def test_a_dead_letter_queue_an_operator_deleted_is_declared_again_and_drained(
    namespace: Namespace, caplog: pytest.LogCaptureFixture
) -> None:
    # The drain went on as if consuming, and ready: letters that failed meanwhile went back
    # to their work queue over and over, their events `processing` out of sight.
    kept: list[str | None] = []

    async def keep(letter: DeadLetter) -> None:
        kept.append(letter.event_id)

    caplog.set_level(logging.INFO, logger="courier.dead_letters")
    queue = dead_letter_queue(namespace.name, "notifier")
    connection = await aio_pika.connect_robust(namespace.amqp_url)
    topologies = namespace.settings().all_topologies()
    drain = DeadLetterDrain(namespace.name, [queue], keep, topologies=topologies)
    try:
        await declare_topology(connection, topologies)
        await drain.start(connection)
        assert drain.consuming
        async with connection.channel() as channel:
            await channel.queue_delete(queue)

        async def back() -> None:
            assert "consuming dead letters again" in caplog.text and drain.consuming

        await eventually(back, timeout=10)
        await dead_letter_arrives(namespace, "m-after")

        async def drained() -> None:
            assert kept == ["m-after"]

        await eventually(drained, timeout=10)
    finally:
        await drain.stop(drain_seconds=5)
        await connection.close()


async def test_after_a_reconnect_the_drain_consumes_dead_letters_again(
    namespace: Namespace,
) -> None:
    """The drain consumes on the channel's aiormq layer, which the robust channel does not
    restore after a reconnect: it consumes again itself, or letters would pile up unseen."""
    kept: list[str | None] = []

    async def keep(letter: DeadLetter) -> None:
        kept.append(letter.event_id)

    broker = urlsplit(namespace.amqp_url)
    async with TcpProxy(broker.hostname or "127.0.0.1", broker.port or 5672) as proxy:
        url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/?reconnect_interval=0.2"
        async with draining(namespace, keep, url) as (drain, connection):
            reconnected = asyncio.Event()
            connection.reconnect_callbacks.add(lambda *_: reconnected.set())
            proxy.reset_all()
            await asyncio.wait_for(reconnected.wait(), 10)

            async def consuming() -> None:
                assert drain.consuming

            await eventually(consuming, timeout=10)
            await dead_letter_arrives(namespace, "m-after-reconnect")

            async def drained() -> None:
                assert kept == ["m-after-reconnect"]

            await eventually(drained, timeout=10)
    await assert_empty(namespace.amqp_url, [dead_letter_queue(namespace.name, "notifier")])


async def test_a_late_reopen_does_not_consume_a_queue_twice(namespace: Namespace) -> None:
    """A consume-again that was waiting (after a broker cancel, a failed declare) may take the
    queue on the new channel before the reopen callback runs: the callback must not add a
    second consumer, which would double the window and outlive `stop`."""

    async def keep(letter: DeadLetter) -> None:
        return None

    queue = dead_letter_queue(namespace.name, "notifier")
    async with draining(namespace, keep) as (drain, connection):
        channel = await connection.channel()
        await drain._reopened(drain._channel)  # consumed on this channel already
        await asyncio.sleep(0.5)  # a consume-again would be done by now
        declared = await channel.declare_queue(queue, passive=True)
        assert declared.declaration_result.consumer_count == 1


def storing(store: FailureStore) -> Sink:
    """A drain's sink that stores each letter in `store`."""

    async def keep(letter: DeadLetter) -> None:
        await store.store(letter)

    return keep


async def dead_letter_arrives(
    namespace: Namespace,
    message_id: str,
    body: bytes = b"not json",
    headers: dict[str, Any] | None = None,
) -> None:
    """A message published straight into the notifier's dead-letter queue."""
    connection = await aio_pika.connect(namespace.amqp_url)
    async with connection, connection.channel() as channel:
        await channel.default_exchange.publish(
            aio_pika.Message(body, message_id=message_id, headers=headers),
            routing_key=dead_letter_queue(namespace.name, "notifier"),
        )


@asynccontextmanager
async def draining_a_limited_queue(
    namespace: Namespace, sink: Callable[[DeadLetter], Awaitable[None]]
) -> AsyncIterator[str]:
    """A drain of a dead-letter queue with a delivery limit of 1 (RabbitMQ 4 gives every
    quorum queue a default of 20), holding one letter (message id `m-held`). Stopped at the end,
    which the queue must find empty."""
    queue = f"{namespace.name}.limited-dlq"
    connection = await aio_pika.connect_robust(namespace.amqp_url)
    try:
        channel = await connection.channel()
        limited = {"x-queue-type": "quorum", "x-delivery-limit": 1}
        await channel.declare_queue(queue, durable=True, arguments=limited)
        await channel.default_exchange.publish(
            aio_pika.Message(b"not json", message_id="m-held", headers={"k": "v"}),
            routing_key=queue,
        )
        drain = DeadLetterDrain(namespace.name, [queue], sink)
        await drain.start(connection)
        yield queue
        assert await drain.stop(drain_seconds=5)
        await assert_empty(namespace.amqp_url, [queue])
    finally:
        channel = await connection.channel()
        await channel.queue_delete(queue)
        await connection.close()


async def test_a_dead_letter_is_held_while_the_store_is_away_not_returned_to_its_queue(
    namespace: Namespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Returned to its queue every second, it spent a delivery each time: a quorum queue with a
    # delivery limit (RabbitMQ 4 gives every one a default of 20; this one has 1) dropped it.
    monkeypatch.setattr("services.messaging.dead_letters.FIRST_HOLD_PAUSE", 0.05)
    tries: list[str] = []

    async def store_away_for_three_tries(letter: DeadLetter) -> None:
        tries.append(letter.event_id or "")
        if len(tries) <= 3:
            raise ConnectionRefusedError("the store is away")

    async with draining_a_limited_queue(namespace, store_away_for_three_tries):

        async def stored() -> None:
            assert tries == ["m-held"] * 4

        await eventually(stored, timeout=10)


async def test_a_letter_held_past_the_longest_hold_goes_back_as_new_spending_no_delivery(
    namespace: Namespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Returned with a nack after each ten-minute hold, a letter spent a delivery each time: on
    # RabbitMQ 4 a store away for some three hours lost it. Put back as a new message, it
    # spends none.
    monkeypatch.setattr("services.messaging.dead_letters.FIRST_HOLD_PAUSE", 0.05)
    monkeypatch.setattr("services.messaging.hold.MAX_HOLD_SECONDS", 0.3)
    ids: list[str] = []

    async def store_away_through_three_holds(letter: DeadLetter) -> None:
        ids.append(letter.id)
        if len(ids) <= 9:  # three tries a hold
            raise ConnectionRefusedError("the store is away")

    async with draining_a_limited_queue(namespace, store_away_through_three_holds):

        async def stored() -> None:
            assert len(ids) == 10

        await eventually(stored, timeout=15)
    assert len(set(ids)) == 1  # each copy is the same letter to the store


async def test_stopping_the_drain_waits_until_the_letter_being_stored_is_acked(
    namespace: Namespace,
) -> None:
    storing, stored = asyncio.Event(), asyncio.Event()
    kept: list[str | None] = []

    async def slow_store(letter: DeadLetter) -> None:
        storing.set()
        await stored.wait()
        kept.append(letter.event_id)

    async with draining(namespace, slow_store) as (drain, _):
        await dead_letter_arrives(namespace, "m-1")
        await asyncio.wait_for(storing.wait(), timeout=10)
        stopping = asyncio.create_task(drain.stop(drain_seconds=10))
        await asyncio.sleep(0.3)
        assert not stopping.done()
        stored.set()
        assert await stopping
    assert kept == ["m-1"]
    await assert_empty(namespace.amqp_url, [dead_letter_queue(namespace.name, "notifier")])


async def test_a_letter_still_being_stored_when_the_drain_gives_up_returns_to_its_queue(
    namespace: Namespace,
) -> None:
    storing, never = asyncio.Event(), asyncio.Event()

    async def stuck_store(letter: DeadLetter) -> None:
        storing.set()
        await never.wait()

    async with draining(namespace, stuck_store) as (drain, connection):
        await dead_letter_arrives(namespace, "m-1")
        await asyncio.wait_for(storing.wait(), timeout=10)
        assert not await drain.stop(drain_seconds=0.2)
        await connection.close()  # the shutdown goes on; unacked, the letter is the broker's again

    async def back() -> None:
        assert (
            await ready_messages(namespace.amqp_url, dead_letter_queue(namespace.name, "notifier"))
            == 1
        )

    await eventually(back, timeout=10)
    never.set()


async def test_a_dead_letter_the_store_refuses_as_it_is_is_stored_in_plain_form(
    namespace: Namespace, postgres_database: str, caplog: pytest.LogCaptureFixture
) -> None:
    """PostgreSQL holds no NUL in text and no 40-bit integer: such a letter, stored as it is,
    would go back to its queue for ever, never reaching the operators."""
    engine = open_store(store_url(postgres_database, Path(), "gateway"))
    store = FailureStore(engine)
    await store.start()
    caplog.set_level(logging.WARNING, logger="courier.dead_letters")
    try:
        async with draining(namespace, storing(store)):
            await dead_letter_arrives(
                namespace, "m\x00-1", body=b"\x00body", headers={f.REPLAYS: 2**40}
            )

            async def stored() -> None:
                page = await store.page(Filter())
                assert [item["event_id"] for item in page.items] == ["m\\x00-1"]

            await eventually(stored, timeout=10)
        [kept] = (await store.page(Filter())).items
        assert (await store.get(kept["id"]) or {})["body"] == b"\x00body"
        # Said with the store's reason, in one line: an expected case, not a traceback each.
        [said] = [r for r in caplog.records if "in plain form" in r.getMessage()]
        assert said.exc_info is None and "1099511627776" in getattr(said, "error", "")
    finally:
        await engine.dispose()
    await assert_empty(namespace.amqp_url, [dead_letter_queue(namespace.name, "notifier")])


# --- reading, replaying and discarding through the API ------------------------------------------


async def seed(tmp_path: Path, namespace: Namespace, count: int, **fields: Any) -> list[str]:
    """Dead letters written into the gateway's store (as the drain would), with real events."""
    engine = open_store(store_url(None, tmp_path, "gateway"))
    store = FailureStore(engine)
    await store.start()
    ids = []
    try:
        for _ in range(count):
            event = notification("seeded")
            body = event.model_dump_json().encode()
            item = letter(
                event_id=event.id,
                queue=work_queue(namespace.name, "notifier"),
                body=body,
                headers={"courier-reason": "retries_exhausted", "x-trace": "keep-me"},
                **fields,
            )
            await store.add(item)
            ids.append(item.id)
    finally:
        await engine.dispose()
    return ids


@pytest.mark.broker
async def test_listing_filters_and_cursor_paging_through_the_api(
    namespace: Namespace, tmp_path: Path
) -> None:
    settings = gateway_settings(namespace, tmp_path)
    seeded = await seed(tmp_path, namespace, 7, group="g-seven")
    others = await seed(tmp_path, namespace, 2, group="g-two", service="processor")
    async with running_gateway(settings) as client:
        seen: list[str] = []
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"limit": 3, **({"cursor": cursor} if cursor else {})}
            response = await client.get("/v1/ops/dead-letters", params=params, headers=AUTH)
            assert response.status_code == 200
            page = response.json()
            seen += [item["id"] for item in page["items"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert len(seen) == len(set(seen)) == 9
        assert set(seen) == {*seeded, *others}
        assert {i["id"] for i in await letters(client, group="g-two")} == set(others)
        assert {i["id"] for i in await letters(client, service="notifier")} == set(seeded)
        assert await letters(client, status="replayed") == []
        groups = (await client.get("/v1/ops/groups", headers=AUTH)).json()["groups"]
        assert [(g["group"], g["count"]) for g in groups] == [("g-seven", 7), ("g-two", 2)]
        missing = await client.get("/v1/ops/dead-letters/nope", headers=AUTH)
        assert missing.status_code == 404
        bad = await client.get("/v1/ops/dead-letters", params={"limit": 0}, headers=AUTH)
        assert bad.status_code == 422


@pytest.mark.broker
async def test_a_replay_or_discard_without_a_selection_or_by_an_empty_filter_is_refused(
    namespace: Namespace, tmp_path: Path
) -> None:
    settings = gateway_settings(namespace, tmp_path)
    await seed(tmp_path, namespace, 2)
    async with running_gateway(settings) as client:
        for path, body in (
            ("/v1/ops/replays", {}),
            ("/v1/ops/discards", {"why": "x"}),
            # An empty filter narrows nothing: `{"text": ""}` (a client's unset variable) took
            # every letter past the "all" guard.
            ("/v1/ops/discards", {"text": "", "why": "x"}),
            ("/v1/ops/replays", {"text": ""}),
            ("/v1/ops/replays", {"service": ""}),
            ("/v1/ops/replays", {"ids": [""]}),
            # PostgreSQL refuses a NUL: the discard went through, its audit row failed (503).
            ("/v1/ops/discards", {"all": True, "why": "bad\x00reason"}),
            # A reason of blanks says nothing in the audit trail.
            ("/v1/ops/discards", {"all": True, "why": " \t "}),
            # A letter each 1/rate seconds: 5e-324 made that infinite, and the request hung
            # with its claims renewed for good (found by fuzzing).
            ("/v1/ops/replays", {"all": True, "rate": 5e-324}),
            ("/v1/ops/replays", {"all": True, "rate": 0.0009}),
            # Switches are JSON booleans: "false" read as false ran a dry run for real.
            ("/v1/ops/replays", {"all": "yes"}),
            ("/v1/ops/discards", {"all": 1, "why": "x"}),
            ("/v1/ops/replays", {"all": True, "dry_run": "false"}),
            # The reason is `why`; the field's own name is not an alias of it.
            ("/v1/ops/discards", {"all": True, "reason_text": "x"}),
        ):
            response = await client.post(path, json=body, headers=AUTH)
            assert response.status_code == 422, (body, response.text)
        discard = await client.post("/v1/ops/discards", json={"all": True}, headers=AUTH)
        assert discard.status_code == 422  # a discard needs a reason
        assert len(await letters(client)) == 2
        actions = (await client.get("/v1/ops/actions", headers=AUTH)).json()["actions"]
        assert actions == []


@pytest.mark.broker
async def test_an_empty_filter_in_a_listing_narrows_nothing(
    namespace: Namespace, tmp_path: Path
) -> None:
    """`?service=` (a client's unset variable) matched no letter, where `?text=` was ignored."""
    settings = gateway_settings(namespace, tmp_path)
    seeded = set(await seed(tmp_path, namespace, 2))
    async with running_gateway(settings) as client:
        for name in ("service", "event_type", "group", "reason", "exception_type", "text"):
            assert {i["id"] for i in await letters(client, **{name: ""})} == seeded, name
        count = await client.get("/v1/ops/count", params={"service": ""}, headers=AUTH)
    assert count.json() == {"count": 2}


@pytest.mark.broker
async def test_letters_of_every_state_are_listed_with_status_any(
    namespace: Namespace, tmp_path: Path
) -> None:
    settings = gateway_settings(namespace, tmp_path)
    replayed, dead = await seed(tmp_path, namespace, 2)
    async with running_gateway(settings) as client:
        response = await client.post(
            "/v1/ops/replays", json={"ids": [replayed], "rate": 1000}, headers=AUTH
        )
        assert response.status_code == 200, response.text
        assert [i["id"] for i in await letters(client)] == [dead]  # `dead` by default
        every = {i["id"]: i["status"] for i in await letters(client, status="any")}
        count = await client.get("/v1/ops/count", params={"status": "any"}, headers=AUTH)
    assert every == {replayed: "replayed", dead: "dead"}
    assert count.json() == {"count": 2}


@pytest.mark.broker
async def test_a_replay_puts_the_letter_back_into_its_own_services_queue(
    namespace: Namespace, tmp_path: Path
) -> None:
    settings = gateway_settings(namespace, tmp_path)
    [letter_id] = await seed(tmp_path, namespace, 1)
    async with running_gateway(settings) as client:
        [item] = await letters(client)
        response = await client.post(
            "/v1/ops/replays", json={"ids": [letter_id], "rate": 1000}, headers=AUTH
        )
        assert response.status_code == 200, response.text
        outcome = response.json()
        assert (outcome["count"], outcome["ids"], outcome["dry_run"]) == (1, [letter_id], False)
        [message] = await take(namespace.amqp_url, work_queue(namespace.name, "notifier"), 1)
        shown = (await client.get(f"/v1/ops/dead-letters/{letter_id}", headers=AUTH)).json()
        actions = (await client.get("/v1/ops/actions", headers=AUTH)).json()["actions"]
    # Into the work queue of the service that failed it, not re-broadcast to every subscriber.
    await assert_empty(namespace.amqp_url, [work_queue(namespace.name, "processor")])
    assert message.message_id == item["event_id"]
    assert orjson.loads(message.body)["id"] == item["event_id"]
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    headers = dict(message.headers)
    assert headers[f.REPLAYS] == 1
    assert headers["x-trace"] == "keep-me"  # the sender's own headers travel on
    assert not set(headers) & f.FAILURE_HEADERS  # a fresh first attempt
    assert shown["status"] == "replayed"
    assert shown["history"][-1]["actor"] == "tester"
    assert shown["history"][-1]["action_id"] == outcome["action_id"]
    [action] = actions
    assert (action["id"], action["action"], action["actor"]) == (
        outcome["action_id"],
        "replay",
        "tester",
    )
    assert (action["count"], action["dry_run"], action["selection"]["ids"]) == (
        1,
        False,
        [letter_id],
    )


@pytest.mark.broker
async def test_each_replayed_letter_is_logged_with_its_events_ids(
    namespace: Namespace, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A replay logged a count alone: which events it sent back to work, and as whose action,
    showed in no log line carrying their ids."""
    caplog.set_level(logging.INFO)
    settings = gateway_settings(namespace, tmp_path)
    ids = await seed(tmp_path, namespace, 2)
    async with running_gateway(settings) as client:
        items = {item["id"]: item for item in await letters(client)}
        response = await client.post(
            "/v1/ops/replays", json={"ids": ids, "rate": 1000}, headers=AUTH
        )
        assert response.status_code == 200, response.text
        action_id = response.json()["action_id"]
        await take(namespace.amqp_url, work_queue(namespace.name, "notifier"), 2)
    lines = [r for r in caplog.records if r.getMessage() == "dead letter replayed"]
    assert sorted(
        (r.event_id, r.letter_id, r.action_id, r.actor)  # type: ignore[attr-defined]
        for r in lines
    ) == sorted((items[i]["event_id"], i, action_id, "tester") for i in ids)
    assert all(r.levelno == logging.INFO for r in lines)


@pytest.mark.broker
async def test_each_discarded_letter_is_logged_with_its_events_ids(
    namespace: Namespace, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A discard logged a count alone: which events ops gave up on, and why, showed in no log
    line carrying their ids."""
    caplog.set_level(logging.INFO)
    settings = gateway_settings(namespace, tmp_path)
    ids = await seed(tmp_path, namespace, 2)
    async with running_gateway(settings) as client:
        items = {item["id"]: item for item in await letters(client)}
        response = await client.post(
            "/v1/ops/discards", json={"ids": ids, "why": "bad input"}, headers=AUTH
        )
        assert response.status_code == 200, response.text
        action_id = response.json()["action_id"]
    lines = [r for r in caplog.records if r.getMessage() == "dead letter discarded"]
    assert sorted(
        (r.event_id, r.letter_id, r.action_id, r.actor, r.reason)  # type: ignore[attr-defined]
        for r in lines
    ) == sorted((items[i]["event_id"], i, action_id, "tester", "bad input") for i in ids)
    assert all(r.levelno == logging.INFO for r in lines)


@pytest.mark.broker
async def test_a_replayed_cancellation_goes_to_its_services_control_queue(
    namespace: Namespace, tmp_path: Path
) -> None:
    # In the work queue it would wait behind the backlog it is meant to overtake.
    settings = gateway_settings(namespace, tmp_path)
    [letter_id] = await seed(tmp_path, namespace, 1, event_type="cancellation.requested")
    async with running_gateway(settings) as client:
        response = await client.post(
            "/v1/ops/replays", json={"ids": [letter_id], "rate": 1000}, headers=AUTH
        )
        assert response.status_code == 200, response.text
        assert response.json()["ids"] == [letter_id]
        [message] = await take(namespace.amqp_url, control_queue(namespace.name, "notifier"), 1)
    await assert_empty(namespace.amqp_url, [work_queue(namespace.name, "notifier")])
    assert message.type == "cancellation.requested"
    assert dict(message.headers)[f.REPLAYS] == 1


@pytest.mark.broker
@pytest.mark.parametrize(
    "odd",
    [
        # The broker dead-lettered it from a queue no service declares: no queue to go back to.
        {"service": "unknown"},
        # Anyone may publish to a dead-letter queue: an event type of 256 bytes of UTF-8
        # cannot be framed again (a short string holds 255).
        {"event_type": "é" * 128},
    ],
    ids=["no queue takes it", "AMQP cannot carry it"],
)
async def test_a_letter_that_cannot_go_back_is_left_dead_and_the_replay_goes_on(
    namespace: Namespace, tmp_path: Path, odd: dict[str, Any]
) -> None:
    """The letters after it must not be held up by it, replay after replay (replays go oldest
    first: one that failed the whole replay stopped every later one at the same letter)."""
    settings = gateway_settings(namespace, tmp_path)
    [stray] = await seed(tmp_path, namespace, 1, **odd)
    [kept] = await seed(tmp_path, namespace, 1)
    async with running_gateway(settings) as client:
        response = await client.post(
            "/v1/ops/replays", json={"ids": [stray, kept], "rate": 1000}, headers=AUTH
        )
        assert response.status_code == 200, response.text
        outcome = response.json()
        assert (outcome["count"], outcome["ids"]) == (1, [kept])
        assert list(outcome["skipped"]) == [stray]
        shown = (await client.get(f"/v1/ops/dead-letters/{stray}", headers=AUTH)).json()
        assert shown["status"] == "dead"
    await take(namespace.amqp_url, work_queue(namespace.name, "notifier"), 1)


class StoreGoneAfter(FailureStore):
    """The real store, gone (every call fails) once `after` letters were marked replayed (a
    replay marks together the letters it published together, `together(rate)`)."""

    def __init__(self, engine: Any, after: int, error: Exception | None = None) -> None:
        super().__init__(engine)
        self.after = after
        self.marked = 0
        self.error = error or OperationalError(
            "SELECT 1", {}, ConnectionRefusedError("the store went away")
        )

    def _gone(self) -> None:
        if self.marked >= self.after:
            raise self.error

    async def renew(self, token: str) -> None:
        self._gone()
        await super().renew(token)

    async def held(self, token: str, letter_ids: Sequence[str]) -> dict[str, int]:
        self._gone()
        return await super().held(token, letter_ids)

    async def mark_replayed(
        self, letter_ids: Sequence[str], token: str, action_id: str, actor: str
    ) -> set[str]:
        marked = await super().mark_replayed(letter_ids, token, action_id, actor)
        self.marked += len(marked)
        return marked

    async def release(self, token: str) -> None:
        self._gone()
        await super().release(token)

    async def record_action(self, **kwargs: Any) -> str:
        self._gone()
        return await super().record_action(**kwargs)


class MarkCutOnce(FailureStore):
    """The real store, whose connection is cut under the first mark of a replayed letter (its
    PostgreSQL backend terminated mid-statement); the next statements, on a new connection,
    work."""

    def __init__(self, engine: Any) -> None:
        super().__init__(engine)
        self.cut = False

    async def mark_replayed(
        self, letter_ids: Sequence[str], token: str, action_id: str, actor: str
    ) -> set[str]:
        if not self.cut:
            self.cut = True
            raise OperationalError(
                "UPDATE ops_dead_letters ...", {}, ConnectionResetError("connection was closed")
            )
        return await super().mark_replayed(letter_ids, token, action_id, actor)


class ClaimLostWhileReading(FailureStore):
    """The real store, whose claims run out (released, as past their lease) just as the
    replay reads its letters: after its `held` check, before their publish."""

    async def letters(self, letter_ids: Sequence[str]) -> dict[str, DeadLetter]:
        found = await super().letters(letter_ids)
        await self.release_expired(timedelta(0))
        return found


class DiscardedWhileReading(ClaimLostWhileReading):
    """... and an operator discards it then."""

    async def letters(self, letter_ids: Sequence[str]) -> dict[str, DeadLetter]:
        found = await super().letters(letter_ids)
        await self.discard(Filter(), limit=10, reason="meanwhile", actor="bob", action_id="d-1")
        return found


class CountingRenewals(FailureStore):
    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine)
        self.renewed_at: list[float] = []

    async def renew(self, token: str) -> None:
        self.renewed_at.append(time.monotonic())
        await super().renew(token)


class CountingWindows(FailureStore):
    """The real store, noting when a replay starts on each window of letters, and its size."""

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine)
        self.windows: list[tuple[float, int]] = []
        self.marks: list[int] = []

    async def held(self, token: str, letter_ids: Sequence[str]) -> dict[str, int]:
        self.windows.append((time.monotonic(), len(letter_ids)))
        return await super().held(token, letter_ids)

    async def mark_replayed(
        self, letter_ids: Sequence[str], token: str, action_id: str, actor: str
    ) -> set[str]:
        self.marks.append(len(letter_ids))
        return await super().mark_replayed(letter_ids, token, action_id, actor)


@asynccontextmanager
async def releasing(store: FailureStore, lease: timedelta) -> AsyncIterator[None]:
    """What the gateway does meanwhile: release the claims whose lease ran out."""

    async def release() -> None:
        while True:
            await store.release_expired(lease)
            await asyncio.sleep(0.05)

    task = asyncio.get_running_loop().create_task(release())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@asynccontextmanager
async def replaying(
    namespace: Namespace, tmp_path: Path, store_type: Callable[[AsyncEngine], FailureStore]
) -> AsyncIterator[tuple[FailureStore, Publisher]]:
    """The gateway's store (a `store_type` on it) and a publisher, the topology declared."""
    settings = gateway_settings(namespace, tmp_path)
    connection = await aio_pika.connect_robust(namespace.amqp_url)
    publisher = Publisher(namespace.amqp_url)
    engine = open_store(store_url(None, tmp_path, "gateway"))
    try:
        await declare_topology(connection, settings.all_topologies())
        await publisher.connect()
        yield store_type(engine), publisher
    finally:
        await publisher.close()
        await connection.close()
        await engine.dispose()


def operations_on(store: FailureStore, publisher: Publisher, namespace: Namespace) -> Operations:
    return Operations(store, publisher, namespace.name, lease=timedelta(minutes=1))


async def replay_all(operations: Operations) -> Outcome:
    """Replay every dead letter (ten at most), as fast as it goes."""
    return await operations.replay(Filter(), actor="tester", limit=10, rate=1000, dry_run=False)


async def replay_in_twos(operations: Operations) -> Outcome:
    """Replay every dead letter (ten at most), two published and marked together."""
    assert together(40) == 2
    return await operations.replay(Filter(), actor="tester", limit=10, rate=40, dry_run=False)


async def replay_beside_a_releaser(
    namespace: Namespace,
    tmp_path: Path,
    store_type: Callable[[AsyncEngine], FailureStore],
    *,
    letters: int,
    rate: float,
    lease: timedelta,
) -> tuple[FailureStore, Outcome]:
    """Replay `letters` seeded letters at `rate` while claims past `lease` are released, as
    the gateway does; the store and the outcome, the letters taken from the work queue."""
    await seed(tmp_path, namespace, letters)
    async with replaying(namespace, tmp_path, store_type) as (store, publisher):
        operations = Operations(store, publisher, namespace.name, lease=lease)
        async with releasing(store, lease):
            outcome = await operations.replay(
                Filter(), actor="tester", limit=letters, rate=rate, dry_run=False
            )
        await take(namespace.amqp_url, work_queue(namespace.name, "notifier"), outcome.count)
    return store, outcome


@pytest.mark.broker
async def test_a_replay_renews_its_claims_every_half_lease_not_per_letter(
    namespace: Namespace, tmp_path: Path
) -> None:
    """A renewal writes every letter the replay holds: per letter, a replay of n letters
    cost n² row writes (minutes on PostgreSQL for a few thousand)."""
    store, outcome = await replay_beside_a_releaser(
        namespace, tmp_path, CountingRenewals, letters=20, rate=50, lease=timedelta(seconds=0.4)
    )
    assert outcome.count == 20 and outcome.error is None
    assert isinstance(store, CountingRenewals)
    # 0.4 s at 50/s: a few renewals, 0.2 s apart; per letter, 20 renewals 20 ms apart. Judged
    # by their spacing, not their count: a loaded host stretches the replay, and with it how
    # many half leases it lasts.
    assert store.renewed_at
    gaps = [b - a for a, b in itertools.pairwise(store.renewed_at)]
    assert all(gap >= 0.1 for gap in gaps), gaps


@pytest.mark.broker
async def test_a_replay_moves_what_its_rate_allows_in_50_ms_together_and_keeps_to_its_rate(
    namespace: Namespace, tmp_path: Path
) -> None:
    """Each letter published, confirmed and marked on its own, a replay moved ~200 letters a
    second whatever rate it was given. At 200 a second: ten letters together, published
    together and marked in one transaction, a window each 50 ms."""
    await seed(tmp_path, namespace, 30)
    async with replaying(namespace, tmp_path, CountingWindows) as (store, publisher):
        outcome = await operations_on(store, publisher, namespace).replay(
            Filter(), actor="tester", limit=30, rate=200, dry_run=False
        )
        assert (outcome.count, outcome.error) == (30, None)
        assert isinstance(store, CountingWindows)
        assert [size for _, size in store.windows] == [10, 10, 10]
        assert store.marks == [10, 10, 10]
        gaps = [b - a for (a, _), (b, _) in itertools.pairwise(store.windows)]
        assert all(gap >= 0.045 for gap in gaps), gaps
        await take(namespace.amqp_url, work_queue(namespace.name, "notifier"), 30)


async def statuses(store: FailureStore, ids: Sequence[str]) -> dict[str, str | None]:
    """Each letter's status, by id."""
    return {letter_id: ((await store.get(letter_id)) or {}).get("status") for letter_id in ids}


@pytest.mark.broker
async def test_a_replay_cancelled_while_a_window_is_confirmed_marks_what_the_broker_took(
    namespace: Namespace, tmp_path: Path
) -> None:
    """The gateway cancels a request still running past its graceful-shutdown timeout (a
    replay of thousands at a low rate runs longer). Cancelled while the last confirm of a
    window was awaited, a replay released the whole window, the nine letters the service had
    already got among them: dead again, for a discard to take."""
    ids = await seed(tmp_path, namespace, 10)
    assert together(200) == 10
    async with replaying(namespace, tmp_path, FailureStore) as (store, publisher):
        publish = publisher.publish
        confirmed = 0
        nine_confirmed = asyncio.Event()

        async def slow_tenth(message: Any, *, exchange: str, routing_key: str) -> None:
            nonlocal confirmed
            await publish(message, exchange=exchange, routing_key=routing_key)
            confirmed += 1
            if confirmed == 9:
                nine_confirmed.set()
                await asyncio.sleep(1)  # the window's last confirm, slow

        publisher.publish = slow_tenth  # type: ignore[method-assign]
        operations = operations_on(store, publisher, namespace)
        replay = asyncio.get_running_loop().create_task(
            operations.replay(Filter(), actor="tester", limit=10, rate=200, dry_run=False)
        )
        await nine_confirmed.wait()
        replay.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await replay
        await take(namespace.amqp_url, work_queue(namespace.name, "notifier"), 10)
        assert {letter_id: "replayed" for letter_id in ids} == await statuses(store, ids)
        discarded = await operations.discard(
            Filter(), actor="bob", limit=10, reason="looks stuck", dry_run=False
        )
        assert discarded.count == 0


@pytest.mark.broker
async def test_a_window_holds_a_few_megabytes_of_letters_not_a_hundred_letters_whatever_size(
    namespace: Namespace, tmp_path: Path
) -> None:
    """Letters of up to `COURIER_MAX_BODY_BYTES` (1 MiB) each: a window of a hundred held
    ~390 MB at once, per replay."""
    ids = await seed(tmp_path, namespace, 30)
    async with replaying(namespace, tmp_path, CountingWindows) as (store, publisher):
        async with store.engine.begin() as conn:
            await conn.execute(update(dead_letters).values(body=b"x" * 1_000_000))
        tracemalloc.start()
        try:
            outcome = await operations_on(store, publisher, namespace).replay(
                Filter(), actor="tester", limit=30, rate=10_000, dry_run=False
            )
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert outcome.count == len(ids)
        assert isinstance(store, CountingWindows)
        assert store.marks == [8, 8, 8, 6]  # 8 MiB a window
        assert peak < 64_000_000, peak
        await take(namespace.amqp_url, work_queue(namespace.name, "notifier"), len(ids))


@pytest.mark.broker
async def test_a_replay_slower_than_its_lease_keeps_its_claims_through_its_pauses(
    namespace: Namespace, tmp_path: Path
) -> None:
    """At 0.8 letters a second each pause outlasts a 1 s lease: renewed only when it reached
    the next letter, the replay found it released by then and moved one letter of three."""
    _, outcome = await replay_beside_a_releaser(
        namespace, tmp_path, FailureStore, letters=3, rate=0.8, lease=timedelta(seconds=1)
    )
    assert (outcome.count, outcome.error) == (3, None)


@pytest.mark.broker
@pytest.mark.parametrize(
    "error",
    [
        None,  # SQLAlchemy's OperationalError
        # What the raw drivers raise beside SQLAlchemy (STORE_ERRORS): asyncpg's refused
        # connection, sqlite3's own errors. They escaped the replay and its cleanup: a 503
        # "could not start the replay" for letters already moved, and no action recorded.
        ConnectionRefusedError("the store went away"),
        sqlite3.OperationalError("the store went away: disk I/O error"),
    ],
)
async def test_a_replay_whose_store_goes_away_says_what_it_moved(
    namespace: Namespace, tmp_path: Path, error: Exception | None
) -> None:
    # The cleanup (release, audit row) failed against the same dead store, and its exception
    # replaced the answer: a 500, the moved ids lost.
    await seed(tmp_path, namespace, 4)
    gone_after_two = functools.partial(StoreGoneAfter, after=2, error=error)
    async with replaying(namespace, tmp_path, gone_after_two) as (store, publisher):
        outcome = await replay_in_twos(operations_on(store, publisher, namespace))
        assert outcome.error is not None and "went away" in outcome.error
        assert outcome.count == 2 and len(outcome.ids) == 2
        await take(namespace.amqp_url, work_queue(namespace.name, "notifier"), 2)


@pytest.mark.broker
async def test_a_letter_published_when_its_mark_failed_is_marked_not_left_dead(
    namespace: Namespace, tmp_path: Path
) -> None:
    # Released with the letters the replay had not reached, it was dead again at once though
    # the service had it: a discard then took it, and its record said `discarded`, not
    # replayed, for an event the service handled again (found by PostgreSQL fault QA, with
    # backends terminated under replays and discards).
    *published, not_reached = await seed(tmp_path, namespace, 3)
    async with replaying(namespace, tmp_path, MarkCutOnce) as (store, publisher):
        operations = operations_on(store, publisher, namespace)
        outcome = await replay_in_twos(operations)
        assert outcome.error is not None and "connection was closed" in outcome.error
        assert (outcome.count, outcome.ids) == (2, published)
        discarded = await operations.discard(
            Filter(), actor="bob", limit=10, reason="meanwhile", dry_run=False
        )
        assert discarded.ids == [not_reached]
        for letter_id in published:
            found = await store.get(letter_id)
            assert found is not None and found["status"] == "replayed"
        await take(namespace.amqp_url, work_queue(namespace.name, "notifier"), 2)


@pytest.mark.broker
async def test_a_replay_stopped_by_its_store_says_why_without_the_statement(
    namespace: Namespace, tmp_path: Path
) -> None:
    # The answer carried SQLAlchemy's rendering of the error: the SQL statement, its
    # parameters and a link to SQLAlchemy's error pages (found by PostgreSQL fault QA).
    await seed(tmp_path, namespace, 1)
    async with replaying(namespace, tmp_path, MarkCutOnce) as (store, publisher):
        outcome = await replay_all(operations_on(store, publisher, namespace))
        assert outcome.error == (
            "the failure store failed: ConnectionResetError: connection was closed"
        )
        await take(namespace.amqp_url, work_queue(namespace.name, "notifier"), 1)


@pytest.mark.broker
async def test_a_letter_published_after_its_claim_ran_out_is_still_marked_replayed(
    namespace: Namespace, tmp_path: Path
) -> None:
    # Published, but left dead (and uncounted): the next replay sent it again.
    [letter_id] = await seed(tmp_path, namespace, 1)
    async with replaying(namespace, tmp_path, ClaimLostWhileReading) as (store, publisher):
        outcome = await replay_all(operations_on(store, publisher, namespace))
        assert (outcome.count, outcome.ids) == (1, [letter_id])
        found = await store.get(letter_id)
        assert found is not None and found["status"] == "replayed"
        await take(namespace.amqp_url, work_queue(namespace.name, "notifier"), 1)


@pytest.mark.broker
async def test_a_replay_is_in_the_audit_trail_while_it_runs_with_what_it_moved_so_far(
    namespace: Namespace, tmp_path: Path
) -> None:
    # Recorded only once it ended: a gateway killed midway left letters whose history named
    # an action the audit trail never had.
    await seed(tmp_path, namespace, 4)
    async with replaying(namespace, tmp_path, FailureStore) as (store, publisher):
        operations = Operations(store, publisher, namespace.name, lease=timedelta(seconds=0.3))
        running = asyncio.create_task(
            operations.replay(Filter(), actor="tester", limit=10, rate=4, dry_run=False)
        )

        async def audited() -> None:
            recorded = [a for a in await store.actions() if not a["dry_run"]]
            assert len(recorded) == 1, recorded
            assert recorded[0]["action"] == "replay" and recorded[0]["count"] >= 2, recorded
            assert not running.done()

        await eventually(audited, timeout=10)
        outcome = await running
        [action] = await store.actions()
        assert (action["id"], action["count"]) == (outcome.action_id, 4)
        await take(namespace.amqp_url, work_queue(namespace.name, "notifier"), 4)


@pytest.mark.broker
async def test_a_letter_discarded_while_it_was_published_is_said_not_counted(
    namespace: Namespace, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    [letter_id] = await seed(tmp_path, namespace, 1)
    async with replaying(namespace, tmp_path, DiscardedWhileReading) as (store, publisher):
        with caplog.at_level(logging.WARNING, logger="courier.ops"):
            outcome = await replay_all(operations_on(store, publisher, namespace))
        assert (outcome.count, outcome.error) == (0, None)
        [said] = [r for r in caplog.records if "claim was lost meanwhile" in r.getMessage()]
        assert getattr(said, "id", None) == letter_id
        found = await store.get(letter_id)
        assert found is not None and found["status"] == "discarded"
        await take(namespace.amqp_url, work_queue(namespace.name, "notifier"), 1)


@pytest.mark.broker
async def test_a_malformed_cursor_is_a_client_error(namespace: Namespace, tmp_path: Path) -> None:
    settings = gateway_settings(namespace, tmp_path)
    async with running_gateway(settings) as client:
        out_of_range = base64.urlsafe_b64encode(b"0001-01-01T00:00:00+01:00|x").decode()
        for cursor in ("garbage", "Zm9v", out_of_range):
            response = await client.get(
                "/v1/ops/dead-letters", params={"cursor": cursor}, headers=AUTH
            )
            # Shaped as the route's every other 422 (a query parameter's validation error).
            assert response.status_code == 422, response.text
            [error] = response.json()["detail"]
            assert error["loc"] == ["query", "cursor"] and "not a cursor" in error["msg"]


@pytest.mark.broker
async def test_a_replay_that_outlives_its_lease_moves_no_letter_twice(
    namespace: Namespace, tmp_path: Path
) -> None:
    settings = gateway_settings(namespace, tmp_path, replay_lease_seconds=0.5)
    await seed(tmp_path, namespace, 10)
    async with running_gateway(settings) as client:
        # 10 letters at 4 a second: the replay runs for 2.5 s, five times its lease.
        slow = asyncio.create_task(
            client.post("/v1/ops/replays", json={"all": True, "rate": 4}, headers=AUTH, timeout=30)
        )

        async def claimed() -> None:
            assert await letters(client) == []  # all ten claimed by the slow replay

        await eventually(claimed, timeout=10)
        # Meanwhile another replay of the same selection keeps trying, until the first ends.
        taken_over: list[str] = []

        async def first_replay_ended() -> None:
            response = await client.post(
                "/v1/ops/replays", json={"all": True, "rate": 1000}, headers=AUTH
            )
            taken_over.extend(response.json()["ids"])
            assert slow.done()

        await eventually(first_replay_ended, timeout=15)
        first = (await slow).json()
    assert not set(first["ids"]) & set(taken_over)
    assert len(first["ids"]) + len(taken_over) == 10
    queued = await ready_messages(namespace.amqp_url, work_queue(namespace.name, "notifier"))
    assert queued == 10


@pytest.mark.broker
async def test_letters_a_dead_replay_left_claimed_count_as_dead_again(
    namespace: Namespace, tmp_path: Path
) -> None:
    settings = gateway_settings(namespace, tmp_path, replay_lease_seconds=60)
    ids = await seed(tmp_path, namespace, 3)
    engine = open_store(store_url(None, tmp_path, "gateway"))
    try:  # a replay claimed them, then its gateway died; the lease ran out long ago
        store = FailureStore(engine)
        _, claimed = await store.claim(Filter(), limit=10, lease=timedelta(seconds=60))
        assert len(claimed) == 3
        async with engine.begin() as conn:
            await conn.execute(
                update(dead_letters).values(claimed_at=datetime.now(UTC) - timedelta(hours=1))
            )
    finally:
        await engine.dispose()
    async with running_gateway(settings) as client:
        listed = {item["id"] for item in await letters(client)}
        groups = (await client.get("/v1/ops/groups", headers=AUTH)).json()["groups"]
        dry = await client.post(
            "/v1/ops/replays", json={"all": True, "dry_run": True}, headers=AUTH
        )
        real = await client.post("/v1/ops/replays", json={"all": True}, headers=AUTH)
    assert real.json()["count"] == 3  # the replay does take them over
    assert dry.json()["count"] == 3
    assert listed == set(ids)
    assert [g["count"] for g in groups] == [3]


@pytest.mark.broker
async def test_letters_whose_claim_runs_out_while_the_gateway_runs_count_as_dead_again(
    namespace: Namespace, tmp_path: Path
) -> None:
    """A replay that died in another process (or whose client went away) leaves its claims;
    the gateway releases them once the lease runs out, not only at its next start."""
    settings = gateway_settings(namespace, tmp_path, replay_lease_seconds=1)
    ids = await seed(tmp_path, namespace, 3)
    async with running_gateway(settings) as client:
        engine = open_store(store_url(None, tmp_path, "gateway"))
        try:  # claimed by a replay elsewhere, which then died
            _, claimed = await FailureStore(engine).claim(
                Filter(), limit=10, lease=timedelta(seconds=1)
            )
        finally:
            await engine.dispose()
        assert len(claimed) == 3
        assert await letters(client) == []  # claimed: not dead

        async def dead_again() -> None:
            assert {item["id"] for item in await letters(client)} == set(ids)

        await eventually(dead_again, timeout=5)


@pytest.mark.broker
async def test_a_time_bound_out_of_range_in_utc_is_a_422(
    namespace: Namespace, tmp_path: Path
) -> None:
    # Before year 1 once in UTC: converting it raised OverflowError, a 500.
    far = "0001-01-01T00:00:00+01:00"
    async with running_gateway(gateway_settings(namespace, tmp_path)) as client:
        calls: list[tuple[str, str, dict[str, Any]]] = [
            ("GET", "/v1/ops/dead-letters", {"params": {"since": far}}),
            ("GET", "/v1/ops/count", {"params": {"until": far}}),
            ("GET", "/v1/ops/groups", {"params": {"since": far}}),
            ("POST", "/v1/ops/replays", {"json": {"since": far}}),
            ("POST", "/v1/ops/discards", {"json": {"until": far, "why": "x"}}),
        ]
        for method, path, kwargs in calls:
            response = await client.request(method, path, headers=AUTH, **kwargs)
            assert response.status_code == 422, (path, response.text)


@pytest.mark.broker
async def test_a_nul_in_a_filter_or_an_id_is_a_client_error_on_postgresql(
    namespace: Namespace, tmp_path: Path, postgres_database: str
) -> None:
    # PostgreSQL refuses a NUL in text: each of these was a 500.
    settings = gateway_settings(namespace, tmp_path, database_url=postgres_database)
    cursor = base64.urlsafe_b64encode(b"2026-01-01T00:00:00+00:00|a\x00").decode()
    async with running_gateway(settings) as client:
        calls: list[tuple[str, str, dict[str, Any]]] = [
            ("GET", "/v1/ops/dead-letters", {"params": {"text": "a\x00"}}),
            ("GET", "/v1/ops/dead-letters", {"params": {"cursor": cursor}}),
            ("GET", "/v1/ops/count", {"params": {"service": "a\x00"}}),
            ("POST", "/v1/ops/replays", {"json": {"service": "a\x00"}}),
            ("POST", "/v1/ops/discards", {"json": {"ids": ["a\x00"], "why": "x"}}),
        ]
        for method, path, kwargs in calls:
            response = await client.request(method, path, headers=AUTH, **kwargs)
            assert response.status_code == 422, (path, response.text)
        shown = await client.get("/v1/ops/dead-letters/a%00b", headers=AUTH)
        assert shown.status_code == 404


@pytest.mark.broker
async def test_a_store_away_is_a_503_to_retry(namespace: Namespace, tmp_path: Path) -> None:
    # Failing before the replay's loop (its claim), or in a discard or a listing, it was a 500:
    # the CLI then said "the gateway answered 500" instead of asking to retry.
    [letter_id] = await seed(tmp_path, namespace, 1)
    engine = open_store(store_url(None, tmp_path, "gateway"))
    try:
        async with running_gateway(gateway_settings(namespace, tmp_path)) as client:
            async with engine.begin() as conn:
                await conn.execute(text(f"ALTER TABLE {dead_letters.name} RENAME TO away"))
            calls: list[tuple[str, str, dict[str, Any]]] = [
                ("POST", "/v1/ops/replays", {"json": {"ids": [letter_id]}}),
                ("POST", "/v1/ops/discards", {"json": {"ids": [letter_id], "why": "x"}}),
                ("GET", "/v1/ops/dead-letters", {}),
                ("GET", f"/v1/ops/dead-letters/{letter_id}", {}),
            ]
            for method, path, kwargs in calls:
                response = await client.request(method, path, headers=AUTH, **kwargs)
                assert response.status_code == 503, (path, response.text)
                assert response.headers["retry-after"] == "5"
            async with engine.begin() as conn:
                await conn.execute(text(f"ALTER TABLE away RENAME TO {dead_letters.name}"))
    finally:
        await engine.dispose()


@pytest.mark.broker
async def test_a_replayed_file_goes_to_the_processors_files_lane(
    namespace: Namespace, tmp_path: Path
) -> None:
    # In the work queue it would sit in the prefetch window the lane keeps files out of.
    settings = gateway_settings(namespace, tmp_path)
    [letter_id] = await seed(
        tmp_path, namespace, 1, event_type="file.uploaded", service="processor"
    )
    async with running_gateway(settings) as client:
        response = await client.post(
            "/v1/ops/replays", json={"ids": [letter_id], "rate": 1000}, headers=AUTH
        )
        assert response.status_code == 200, response.text
        assert response.json()["ids"] == [letter_id]
        [message] = await take(
            namespace.amqp_url, lane_queue(namespace.name, "processor", "files"), 1
        )
    await assert_empty(namespace.amqp_url, [work_queue(namespace.name, "processor")])
    assert message.type == "file.uploaded"
    assert dict(message.headers)[f.REPLAYS] == 1
