"""The consumer's acknowledgement policy, against a real broker.

Each test runs the real `Consumer` on a private namespace with a handler written for the test.
"""

from __future__ import annotations

import asyncio
import sqlite3
import tempfile
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import aio_pika
import orjson
import pytest
from aiormq.exceptions import ChannelInvalidStateError, ChannelNotFoundEntity
from sqlalchemy import event as sqlalchemy_event
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from contracts.envelope import Envelope, derived_event_id
from contracts.events import (
    EVENT_ADAPTER,
    DatasetProcessed,
    DatasetProcessedData,
    DatasetSubmitted,
    DatasetSubmittedData,
    NotificationRequested,
    NotificationRequestedData,
    ResultsReported,
)
from contracts.topology import SUBSCRIPTIONS, ServiceTopology
from contracts.tracking import Transition
from services.gateway.letters import dead_lettered
from services.messaging import failure as f
from services.messaging.consumer import Consumer, Handler, Route
from services.messaging.dead_letters import read_dead_letter
from services.messaging.declare import declare_topology
from services.messaging.errors import PermanentError, StoreUnavailable, Unroutable
from services.messaging.inbox import Handled, Inbox
from services.messaging.publisher import Publisher
from services.messaging.results import ResultReporter
from services.messaging.retry import RetryPolicy
from services.messaging.status import Outcome, StatusReporter
from services.messaging.store import open_store
from tests.conftest import Namespace
from tests.support.polling import eventually
from tests.support.queues import assert_empty, ready_messages, take, unbind_everyone
from tests.support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.broker


def notification(subject: str = "hi") -> NotificationRequested:
    return NotificationRequested(data=NotificationRequestedData(recipient="r", subject=subject))


class Recorder:
    """A handler that fails as scripted and records every call."""

    def __init__(
        self, failures: Sequence[BaseException] = (), returns: Sequence[Envelope] = ()
    ) -> None:
        self.failures = list(failures)
        self.returns = returns
        self.calls: list[str] = []

    async def __call__(self, event: Envelope) -> Sequence[Envelope]:
        self.calls.append(event.id)
        if self.failures:
            raise self.failures.pop(0)
        return self.returns

    async def called(self, *event_ids: str, timeout: float = 10.0) -> None:
        """Wait until the calls so far are exactly `event_ids`."""

        async def seen() -> None:
            assert self.calls == list(event_ids)

        await eventually(seen, timeout=timeout)


@asynccontextmanager
async def running(
    namespace: Namespace,
    service: str,
    routes: Mapping[str, Route],
    delays: tuple[int, ...] = (1,),
    inbox: Inbox | None = None,
    delivery_limit: int | None = None,
    results_linger: float = 0.0,
    reporter: StatusReporter | None = None,
    control: bool = False,
) -> AsyncIterator[tuple[Publisher, ServiceTopology, Consumer]]:
    """A consumer of the service's work queue (`control`: of its control queue)."""
    limit = {} if delivery_limit is None else {"delivery_limit": delivery_limit}
    settings = namespace.settings(retry_delays=delays, **limit)
    topology = settings.topology(service)
    publisher = Publisher(namespace.amqp_url)
    connection = await aio_pika.connect_robust(namespace.amqp_url)
    store = tempfile.TemporaryDirectory()
    engine = open_store(f"sqlite+aiosqlite:///{store.name}/inbox.sqlite3")
    try:
        if inbox is None:
            inbox = Inbox(engine, service)
            await inbox.start()
        await publisher.connect()
        await declare_topology(connection, settings.all_topologies())
        results = ResultReporter(
            service, publisher, topology.events_exchange, linger=results_linger, batch=8
        )
        consumer = Consumer(
            topology=topology,
            routes=routes,
            publisher=publisher,
            inbox=inbox,
            prefetch=8,
            results=results,
            reporter=reporter,
            queue=topology.control_queue_spec() if control else None,
        )
        await consumer.start(connection)
        yield publisher, topology, consumer
        assert await consumer.stop(drain_seconds=5)
    finally:
        await connection.close()
        await publisher.close()
        if inbox is not None:
            inbox.close()
        await engine.dispose()
        store.cleanup()


async def inbox_with_effects(engine: AsyncEngine) -> Inbox:
    """The notifier's inbox in `engine`, beside a table of what its stateful handlers wrote."""
    inbox = Inbox(engine, "notifier")
    await inbox.start()
    async with engine.begin() as conn:
        await conn.execute(text("CREATE TABLE effects (event_id TEXT)"))
    return inbox


async def write_effect(conn: AsyncConnection, event: Envelope) -> None:
    await conn.execute(text("INSERT INTO effects VALUES (:id)"), {"id": event.id})


async def effects(engine: AsyncEngine) -> list[str]:
    async with engine.connect() as conn:
        return list((await conn.scalars(text("SELECT event_id FROM effects"))).all())


def dataset_and_its_result() -> tuple[DatasetSubmitted, DatasetProcessed]:
    """A submitted dataset and the follow-up its handler returns (its id derived)."""
    submitted = DatasetSubmitted(data=DatasetSubmittedData(records=[{"a": 1}]))
    processed = DatasetProcessed(
        id=derived_event_id(submitted.id, "dataset.processed"),
        data=DatasetProcessedData(dataset_id=submitted.id, name="d", record_count=1, fields={}),
    )
    return submitted, processed


def route(handler: Handler, delays: tuple[int, ...] = (1,), immediate: int = 0) -> Route:
    return Route(handler, RetryPolicy(delays=delays, immediate=immediate))


async def publish(publisher: Publisher, topology: ServiceTopology, event: Envelope) -> None:
    await publisher.publish_event(event, exchange=topology.events_exchange)


async def test_a_handled_message_is_acked_once(namespace: Namespace) -> None:
    handler = Recorder()
    event = notification()
    async with running(namespace, "notifier", {"notification.requested": route(handler)}) as (
        pub,
        topo,
        _,
    ):
        await publish(pub, topo, event)

        await handler.called(event.id)
    # The consumer is gone: an unacked message would be back in the queue now.
    await assert_empty(namespace.amqp_url, [topo.queue, topo.dead_letter_queue])
    assert handler.calls == [event.id]


async def refused_for_good(
    namespace: Namespace,
) -> tuple[Recorder, Envelope, ServiceTopology, aio_pika.abc.AbstractIncomingMessage]:
    """A notification whose handler raises a permanent error, and its dead letter."""
    handler = Recorder(failures=[PermanentError("recipient refused")])
    event = notification()
    async with running(
        namespace, "notifier", {"notification.requested": route(handler, immediate=3)}
    ) as (pub, topo, _):
        await publish(pub, topo, event)
        [dead] = await take(namespace.amqp_url, topo.dead_letter_queue, 1)
    return handler, event, topo, dead


async def test_a_permanent_error_dead_letters_at_once_with_its_story(namespace: Namespace) -> None:
    handler, event, topo, dead = await refused_for_good(namespace)
    assert handler.calls == [event.id]
    headers: dict[str, Any] = dict(dead.headers)
    assert headers[f.REASON] == "permanent"
    assert headers[f.SERVICE] == "notifier" and headers[f.QUEUE] == topo.queue
    assert headers[f.EVENT_ID] == event.id and headers[f.EVENT_TYPE] == "notification.requested"
    assert headers[f.EXCEPTION_TYPE] == "services.messaging.errors.PermanentError"
    assert headers[f.EXCEPTION_MESSAGE] == "recipient refused"
    assert "raise self.failures.pop(0)" in headers[f.TRACEBACK] and headers[f.FINGERPRINT]
    assert dead.message_id == event.id and orjson.loads(dead.body)["id"] == event.id
    await assert_empty(namespace.amqp_url, [topo.queue])


# A file name as `os.listdir` gives one that is not UTF-8: a lone surrogate, which no AMQP
# header can carry as it stands.
UNDECODABLE = b"report-\xff.csv".decode("utf-8", "surrogateescape")


async def test_an_error_whose_text_no_header_can_carry_is_dead_lettered_at_once(
    namespace: Namespace,
) -> None:
    handler = Recorder(failures=[PermanentError(f"cannot read {UNDECODABLE}")])
    event = notification()
    routes = {"notification.requested": route(handler)}
    async with running(namespace, "notifier", routes, delivery_limit=2) as (pub, topo, _):
        await publish(pub, topo, event)
        [dead] = await take(namespace.amqp_url, topo.dead_letter_queue, 1)
    headers: dict[str, Any] = dict(dead.headers)
    # Not the broker's `delivery_limit` after the handler ran three times, story lost.
    assert headers[f.REASON] == "permanent" and handler.calls == [event.id]
    assert headers[f.EXCEPTION_MESSAGE] == "cannot read report-\\udcff.csv"


async def test_a_transient_error_whose_text_no_header_can_carry_waits_in_the_delay_tier(
    namespace: Namespace,
) -> None:
    handler = Recorder(failures=[ConnectionResetError(f"cannot reach {UNDECODABLE}")] * 2)
    event = notification()
    routes = {"notification.requested": route(handler)}
    async with running(namespace, "notifier", routes, delivery_limit=2) as (pub, topo, _):
        await publish(pub, topo, event)
        [dead] = await take(namespace.amqp_url, topo.dead_letter_queue, 1, timeout=15)
    headers: dict[str, Any] = dict(dead.headers)
    assert headers[f.REASON] == "retries_exhausted"  # the first attempt, one delayed retry
    assert handler.calls == [event.id, event.id]


class _Unprintable(Exception):
    def __str__(self) -> str:
        raise IndexError("a bug in the exception's own __str__")


async def test_an_error_that_cannot_be_rendered_is_dead_lettered_with_its_type(
    namespace: Namespace,
) -> None:
    handler = Recorder(failures=[_Unprintable()])
    event = notification()
    routes = {
        "notification.requested": Route(
            handler, RetryPolicy(delays=(1,), immediate=0, permanent=(_Unprintable,))
        )
    }
    async with running(namespace, "notifier", routes, delivery_limit=2) as (pub, topo, _):
        await publish(pub, topo, event)
        [dead] = await take(namespace.amqp_url, topo.dead_letter_queue, 1)
    headers: dict[str, Any] = dict(dead.headers)
    assert headers[f.REASON] == "permanent" and handler.calls == [event.id]
    assert headers[f.EXCEPTION_TYPE].endswith("._Unprintable")


def failing_its_first_attempt() -> tuple[list[int], dict[str, Route]]:
    """The attempts a handler is told of (`takes_attempt`), and its route: the first fails
    transiently, to come back from the 1 s delay tier."""
    attempts: list[int] = []

    async def handler(event: Envelope, *, attempt: int) -> None:
        attempts.append(attempt)
        if attempt == 1:
            raise ConnectionResetError("blip")

    policy = RetryPolicy(delays=(1,), immediate=0)
    return attempts, {"notification.requested": Route(handler, policy, takes_attempt=True)}


async def delete_queue(namespace: Namespace, name: str) -> None:
    """What an operator's `rabbitmqctl delete_queue` does."""
    connection = await aio_pika.connect(namespace.amqp_url)
    async with connection, connection.channel() as channel:
        await channel.queue_delete(name)


async def test_a_dead_letter_queue_an_operator_deleted_is_declared_again_for_the_letter(
    namespace: Namespace,
) -> None:
    # Its publish unroutable, the failure went back to the queue until the broker's delivery
    # limit, the handler run each time, and the letter reached no one.
    handler = Recorder(failures=[PermanentError("recipient refused")])
    event = notification()
    routes = {"notification.requested": route(handler)}
    async with running(namespace, "notifier", routes) as (pub, topo, _):
        await delete_queue(namespace, topo.dead_letter_queue)
        await publish(pub, topo, event)

        async def dead_lettered() -> None:
            try:
                count = await ready_messages(namespace.amqp_url, topo.dead_letter_queue)
            except ChannelNotFoundEntity:
                count = 0  # not declared again yet
            assert count == 1

        await eventually(dead_lettered)
        [dead] = await take(namespace.amqp_url, topo.dead_letter_queue, 1)
    assert dict(dead.headers)[f.REASON] == "permanent" and handler.calls == [event.id]


async def test_a_delay_tier_an_operator_deleted_is_declared_again_for_the_retry(
    namespace: Namespace,
) -> None:
    # Returned to the queue instead, the failure skipped the back-off, ran again at once
    # as attempt 1 each time, and ended as `delivery_limit`, not `retries_exhausted`.
    attempts, routes = failing_its_first_attempt()
    async with running(namespace, "notifier", routes) as (pub, topo, _):
        await delete_queue(namespace, topo.retry_queue(1))
        await publish(pub, topo, notification())

        async def retried() -> None:
            assert attempts == [1, 2]  # the first delivery, then back from the delay tier

        await eventually(retried)


async def test_a_dead_letter_is_logged_with_its_event_id_type_and_reason(
    namespace: Namespace, caplog: pytest.LogCaptureFixture
) -> None:
    _, event, _, _ = await refused_for_good(namespace)
    [record] = [r for r in caplog.records if r.message == "dead-lettered"]
    logged = (record.event_id, record.event_type, record.reason)  # type: ignore[attr-defined]
    assert logged == (event.id, "notification.requested", "permanent")


async def test_a_transient_failure_is_retried_later_through_the_broker(
    namespace: Namespace,
) -> None:
    handler = Recorder(failures=[ConnectionResetError("blip")])
    event = notification()
    async with running(namespace, "notifier", {"notification.requested": route(handler)}) as (
        pub,
        topo,
        _,
    ):
        await publish(pub, topo, event)

        await handler.called(event.id, event.id)
    await assert_empty(
        namespace.amqp_url, [topo.queue, topo.dead_letter_queue, topo.retry_queue(1)]
    )


async def test_a_handler_that_takes_the_attempt_is_told_which_one_it_is(
    namespace: Namespace,
) -> None:
    attempts, routes = failing_its_first_attempt()
    async with running(namespace, "notifier", routes) as (pub, topo, _):
        await publish(pub, topo, notification())

        async def retried() -> None:
            assert attempts == [1, 2]  # the first delivery, then back from the delay tier

        await eventually(retried)


async def test_retries_exhausted_end_in_the_dead_letter_queue(namespace: Namespace) -> None:
    handler = Recorder(failures=[TimeoutError("down")] * 100)
    event = notification()
    routes = {"notification.requested": route(handler, delays=(1, 2), immediate=1)}
    async with running(namespace, "notifier", routes, delays=(1, 2)) as (pub, topo, _):
        await publish(pub, topo, event)
        [dead] = await take(namespace.amqp_url, topo.dead_letter_queue, 1, timeout=15)
    headers: dict[str, Any] = dict(dead.headers)
    assert headers[f.REASON] == "retries_exhausted"
    assert headers[f.ATTEMPT] == 3  # first delivery + two delayed retries
    assert len(handler.calls) == 3 * 2  # each attempt retried once in process
    assert headers[f.FIRST_FAILURE] < headers[f.LAST_FAILURE]
    assert "x-death" not in headers


async def test_a_body_that_is_not_an_event_is_dead_lettered_as_invalid(
    namespace: Namespace,
) -> None:
    handler = Recorder()
    async with running(namespace, "notifier", {"notification.requested": route(handler)}) as (
        pub,
        topo,
        _,
    ):
        garbage = aio_pika.Message(
            b'{"type": "notification.requested", "data": {}}', message_id="junk-1"
        )
        await pub.publish(
            garbage, exchange=topo.events_exchange, routing_key="notification.requested"
        )
        [dead] = await take(namespace.amqp_url, topo.dead_letter_queue, 1)
    assert dead.headers[f.REASON] == "invalid" and dead.headers[f.EVENT_ID] == "junk-1"
    assert handler.calls == []


async def test_a_letter_names_the_queue_it_failed_in(namespace: Namespace) -> None:
    # A control queue's letter named the work queue.
    async with running(namespace, "notifier", {}, control=True) as (pub, topo, _):
        assert topo.control_queue is not None
        garbage = aio_pika.Message(b'{"bad": 2}', type="cancellation.requested")
        await pub.publish(garbage, exchange="", routing_key=topo.control_queue)
        [dead] = await take(namespace.amqp_url, topo.dead_letter_queue, 1)
    assert dead.headers[f.REASON] == "invalid"
    assert dead.headers[f.QUEUE] == topo.control_queue


async def test_a_type_without_a_handler_is_dead_lettered_as_invalid(namespace: Namespace) -> None:
    async with running(namespace, "notifier", {}) as (pub, topo, _):
        await publish(pub, topo, notification())
        [dead] = await take(namespace.amqp_url, topo.dead_letter_queue, 1)
    assert dead.headers[f.REASON] == "invalid"
    assert "no handler" in str(dead.headers[f.EXCEPTION_MESSAGE])


async def test_follow_ups_are_published_and_results_reported_before_the_ack(
    namespace: Namespace,
) -> None:
    submitted, processed = dataset_and_its_result()
    handler = Recorder(returns=[processed])
    async with running(namespace, "processor", {"dataset.submitted": route(handler)}) as (
        pub,
        topo,
        _,
    ):
        await publish(pub, topo, submitted)
        [follow_up] = await take(namespace.amqp_url, f"{namespace.name}.notifier", 1)
        [message] = await take(namespace.amqp_url, f"{namespace.name}.gateway", 1)
    body = orjson.loads(follow_up.body)
    assert body["id"] == processed.id
    assert body["causationid"] == submitted.id and body["correlationid"] == submitted.id
    # The gateway gets the result in a report, not as its own delivery.
    report = EVENT_ADAPTER.validate_json(message.body)
    assert isinstance(report, ResultsReported)
    assert message.message_id == report.id and message.type == "results.reported"
    assert [r.model_dump(mode="json") for r in report.data.results] == [body]
    await assert_empty(namespace.amqp_url, [topo.queue])


async def test_results_handled_together_reach_the_gateway_in_one_report(
    namespace: Namespace,
) -> None:
    pairs = [dataset_and_its_result() for _ in range(5)]
    results = {submitted.id: processed for submitted, processed in pairs}

    async def handler(event: Envelope) -> Sequence[Envelope]:
        return [results[event.id]]

    routes = {"dataset.submitted": route(handler)}
    async with running(namespace, "processor", routes, results_linger=0.5) as (pub, topo, _):
        for submitted, _processed in pairs:
            await publish(pub, topo, submitted)
        [message] = await take(namespace.amqp_url, f"{namespace.name}.gateway", 1)
        await assert_empty(namespace.amqp_url, [f"{namespace.name}.gateway", topo.queue])
    report = EVENT_ADAPTER.validate_json(message.body)
    assert isinstance(report, ResultsReported)
    assert sorted(r.id for r in report.data.results) == sorted(p.id for _, p in pairs)


async def test_an_input_whose_result_the_broker_refuses_is_not_acked(
    namespace: Namespace,
) -> None:
    submitted, processed = dataset_and_its_result()
    handler = Recorder(returns=[processed])
    routes = {"dataset.submitted": route(handler)}
    async with running(namespace, "processor", routes, delivery_limit=2) as (pub, topo, _):
        await unbind_everyone(namespace.amqp_url, namespace.settings(), "results.reported")
        await publish(pub, topo, submitted)
        # The result itself reached the notifier; its report did not reach the gateway: the
        # input goes back to the queue (no second effect) until the delivery limit
        # dead-letters it.
        [dead] = await take(namespace.amqp_url, topo.dead_letter_queue, 1, timeout=20)
        assert dead.message_id == submitted.id
        assert handler.calls == [submitted.id]
        await assert_empty(namespace.amqp_url, [topo.queue, f"{namespace.name}.gateway"])


async def test_a_result_whose_report_was_refused_is_reported_when_the_input_returns(
    namespace: Namespace, caplog: pytest.LogCaptureFixture
) -> None:
    submitted, processed = dataset_and_its_result()
    handler = Recorder(returns=[processed])
    routes = {"dataset.submitted": route(handler)}
    gateway = namespace.settings().topology("gateway")
    async with running(namespace, "processor", routes) as (pub, topo, _):
        await unbind_everyone(namespace.amqp_url, namespace.settings(), "results.reported")
        await publish(pub, topo, submitted)

        async def returned() -> None:
            assert any("not settled" in r.message for r in caplog.records)

        await eventually(returned)
        connection = await aio_pika.connect(namespace.amqp_url)
        async with connection, connection.channel() as channel:  # the route is back
            queue = await channel.get_queue(gateway.queue)
            await queue.bind(gateway.events_exchange, routing_key="results.reported")
        [message] = await take(namespace.amqp_url, gateway.queue, 1, timeout=20)
        report = EVENT_ADAPTER.validate_json(message.body)
        assert isinstance(report, ResultsReported)
        assert [r.id for r in report.data.results] == [processed.id]
        assert handler.calls == [submitted.id]  # the inbox knew it: no second effect
        await assert_empty(namespace.amqp_url, [topo.queue, topo.dead_letter_queue])


async def test_a_follow_up_the_broker_refuses_returns_the_input_without_a_second_effect(
    namespace: Namespace,
) -> None:
    submitted, processed = dataset_and_its_result()
    handler = Recorder(returns=[processed])
    routes = {"dataset.submitted": route(handler)}
    async with running(namespace, "processor", routes, delivery_limit=2) as (
        pub,
        topo,
        _,
    ):
        await unbind_everyone(namespace.amqp_url, namespace.settings(), "dataset.processed")
        await publish(pub, topo, submitted)
        # Not the handler's failure: no retry tier; the input goes back to the queue (the
        # inbox recognises it: no second effect) until the broker's delivery limit
        # dead-letters it.
        [dead] = await take(namespace.amqp_url, topo.dead_letter_queue, 1, timeout=20)
        assert dead.message_id == submitted.id
        assert handler.calls == [submitted.id]
        await assert_empty(namespace.amqp_url, [topo.queue, topo.retry_queue(1)])


def unserialisable_follow_up() -> NotificationRequested:
    """A follow-up built without validation, holding what JSON cannot carry."""
    unserialisable: Any = object()
    return NotificationRequested.model_construct(data=unserialisable)


async def test_a_follow_up_that_cannot_be_serialised_dead_letters_its_input_at_once(
    namespace: Namespace,
) -> None:
    """The same handler would return the same follow-up again: permanent, no retry."""
    handler = Recorder(returns=[unserialisable_follow_up()])
    event = notification()
    routes = {"notification.requested": route(handler, immediate=3)}
    async with running(namespace, "notifier", routes) as (pub, topo, _):
        await publish(pub, topo, event)
        [dead] = await take(namespace.amqp_url, topo.dead_letter_queue, 1)
        await assert_empty(namespace.amqp_url, [topo.queue, topo.retry_queue(1)])
    assert handler.calls == [event.id]
    assert dead.message_id == event.id and dead.headers[f.REASON] == "permanent"
    assert str(dead.headers[f.EXCEPTION_TYPE]).endswith(".FollowUpNotSerialisable")
    assert "'notification.requested'" in str(dead.headers[f.EXCEPTION_MESSAGE])
    assert "cannot be serialised" in str(dead.headers[f.EXCEPTION_MESSAGE])


async def test_a_stateful_handler_whose_follow_up_cannot_be_serialised_keeps_no_state(
    namespace: Namespace, tmp_path: Path
) -> None:
    engine = open_store(f"sqlite+aiosqlite:///{tmp_path}/state.sqlite3")
    inbox = await inbox_with_effects(engine)

    async def stateful(event: Envelope, conn: AsyncConnection) -> Sequence[Envelope]:
        await write_effect(conn, event)
        return [unserialisable_follow_up()]

    routes = {"notification.requested": Route(stateful, RetryPolicy(delays=(1,)), stateful=True)}
    event = notification()
    async with running(namespace, "notifier", routes, inbox=inbox) as (pub, topo, _):
        await publish(pub, topo, event)
        [dead] = await take(namespace.amqp_url, topo.dead_letter_queue, 1)
        assert dead.headers[f.REASON] == "permanent"
        assert await inbox.lookup(event.id) is None
    written = await effects(engine)
    await engine.dispose()
    assert written == []  # the transaction rolled back with the inbox record


async def test_a_delivery_is_held_through_a_store_outage_not_spent_on_its_delivery_limit(
    namespace: Namespace, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each return to the queue counts against the delivery limit: a store away for a few
    seconds would send healthy work to the dead-letter queue. The delivery waits instead."""
    engine = open_store(f"sqlite+aiosqlite:///{tmp_path}/inbox.sqlite3")
    inbox = Inbox(engine, "notifier")
    await inbox.start()
    event = notification()
    handler = Recorder()
    routes = {"notification.requested": route(handler)}
    try:
        async with running(namespace, "notifier", routes, inbox=inbox, delivery_limit=1) as (
            pub,
            topo,
            _,
        ):
            async with engine.begin() as conn:  # the store goes away
                await conn.execute(text("ALTER TABLE notifier_inbox RENAME TO away"))
            await publish(pub, topo, event)

            async def held_a_while() -> None:
                holding = [r for r in caplog.records if "holding the delivery" in r.message]
                assert len(holding) >= 4  # held 1.4 s: two returns to the queue would be 0.6 s

            await eventually(held_a_while, timeout=10)
            async with engine.begin() as conn:  # and comes back
                await conn.execute(text("ALTER TABLE away RENAME TO notifier_inbox"))
            await handler.called(event.id)
            await eventually(lambda: assert_empty(namespace.amqp_url, [topo.queue]), timeout=10)
            await assert_empty(namespace.amqp_url, [topo.dead_letter_queue])
    finally:
        await engine.dispose()


InboxT = TypeVar("InboxT", bound=Inbox)


@asynccontextmanager
async def on_disk(tmp_path: Path, service: str, kind: type[InboxT]) -> AsyncIterator[InboxT]:
    """An inbox of `kind`, started on a SQLite file of its own, its outcomes owing reports as
    the runtime's do; its engine disposed after."""
    engine = open_store(f"sqlite+aiosqlite:///{tmp_path}/inbox.sqlite3")
    inbox = kind(engine, service, reported_types=SUBSCRIPTIONS[service])
    await inbox.start()
    try:
        yield inbox
    finally:
        await engine.dispose()


class InboxLockedOnce(Inbox):
    """An inbox whose first record fails as a store locked by another writer does."""

    failed = False

    async def remember(
        self, event: Envelope, follow_ups: Sequence[bytes], attempt: int = 1
    ) -> datetime | None:
        if not self.failed:
            self.failed = True
            raise sqlite3.OperationalError("database is locked")
        return await super().remember(event, follow_ups, attempt)


async def test_a_held_delivery_whose_handler_succeeded_never_runs_it_again(
    namespace: Namespace, tmp_path: Path
) -> None:
    # Held after its record failed, the delivery was processed again from the start: the
    # handler (an email, a webhook) ran a second time, with no crash and no redelivery.
    submitted, processed = dataset_and_its_result()
    handler = Recorder(returns=[processed])
    async with (
        on_disk(tmp_path, "processor", InboxLockedOnce) as inbox,
        running(namespace, "processor", {"dataset.submitted": route(handler)}, inbox=inbox) as (
            pub,
            topo,
            _,
        ),
    ):
        await publish(pub, topo, submitted)

        async def recorded() -> None:
            assert isinstance(await inbox.lookup(submitted.id), Handled)

        await eventually(recorded, timeout=10)
        await eventually(lambda: assert_empty(namespace.amqp_url, [topo.queue]), timeout=10)
    assert inbox.failed and handler.calls == [submitted.id]


async def test_a_handler_whose_store_is_unavailable_is_held_not_retried_through_a_tier(
    namespace: Namespace, caplog: pytest.LogCaptureFixture
) -> None:
    # A retry through a delay tier spends an attempt: a long outage dead-lettered the event.
    locked = StoreUnavailable("could not record")
    locked.__cause__ = sqlite3.OperationalError("database is locked")
    handler = Recorder(failures=[locked])
    event = notification()
    async with running(
        namespace,
        "notifier",
        {"notification.requested": route(handler, delays=(60,))},
        delays=(60,),
    ) as (pub, topo, _):
        await publish(pub, topo, event)
        await handler.called(event.id, event.id)  # again in process, not after 60 s
        await eventually(lambda: assert_empty(namespace.amqp_url, [topo.queue]), timeout=10)
    assert any("holding the delivery" in r.message for r in caplog.records)
    await assert_empty(namespace.amqp_url, [topo.retry_queue(60), topo.dead_letter_queue])


async def test_a_stateful_delivery_is_held_while_the_store_refuses_writes_not_retried(
    namespace: Namespace, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A stateful handler's transaction is the runtime's: a store that refuses it (here
    another writer holds SQLite's lock; a full disk looks the same) is an outage, not the
    handler failing. The delivery waits for the store, spending no retry attempt."""
    path = tmp_path / "state.sqlite3"
    engine = open_store(f"sqlite+aiosqlite:///{path}")

    def fail_writes_fast(dbapi_connection: Any, _: Any) -> None:  # after the store's pragmas
        dbapi_connection.cursor().execute("PRAGMA busy_timeout=100")

    sqlalchemy_event.listen(engine.sync_engine, "connect", fail_writes_fast)
    inbox = await inbox_with_effects(engine)
    calls: list[str] = []

    async def stateful(event: Envelope, conn: AsyncConnection) -> None:
        calls.append(event.id)
        await write_effect(conn, event)

    routes = {"notification.requested": Route(stateful, RetryPolicy(delays=(1,)), stateful=True)}
    event = notification()
    writer = sqlite3.connect(path, isolation_level=None)
    try:
        async with running(namespace, "notifier", routes, inbox=inbox) as (pub, topo, _):
            writer.execute("BEGIN IMMEDIATE")  # the store refuses writes
            await publish(pub, topo, event)

            async def held() -> None:
                holding = [r for r in caplog.records if "holding the delivery" in r.message]
                assert len(holding) >= 3  # through 1.4 s: past the 1 s retry tier

            await eventually(held, timeout=10)
            writer.execute("ROLLBACK")  # and takes them again

            async def settled() -> None:
                await assert_empty(namespace.amqp_url, [topo.queue])
                assert await inbox.lookup(event.id) is not None

            await eventually(settled, timeout=10)
            await assert_empty(namespace.amqp_url, [topo.retry_queue(1), topo.dead_letter_queue])
        assert await effects(engine) == [event.id]  # the refused tries rolled back
        assert len(calls) >= 2 and set(calls) == {event.id}  # tried again while held
        assert not any("retrying later" in r.message for r in caplog.records)
    finally:
        writer.close()
        inbox.close()
        await engine.dispose()


async def test_a_stateful_handler_that_gives_up_on_a_store_error_is_dead_lettered_not_held(
    namespace: Namespace, tmp_path: Path
) -> None:
    """A handler that raises PermanentError (here from a store error it judged hopeless)
    means it: dead-lettered at once, not held as an outage."""
    engine = open_store(f"sqlite+aiosqlite:///{tmp_path}/state.sqlite3")
    inbox = Inbox(engine, "notifier")
    await inbox.start()

    async def stateful(event: Envelope, conn: AsyncConnection) -> None:
        try:
            await conn.execute(text("INSERT INTO no_such_table VALUES (1)"))
        except Exception as exc:
            raise PermanentError("this store will never have that table") from exc

    routes = {"notification.requested": Route(stateful, RetryPolicy(delays=(1,)), stateful=True)}
    event = notification()
    try:
        async with running(namespace, "notifier", routes, inbox=inbox) as (pub, topo, _):
            await publish(pub, topo, event)
            [dead] = await take(namespace.amqp_url, topo.dead_letter_queue, 1, timeout=5)
            assert dead.message_id == event.id
            assert dead.headers[f.REASON] == "permanent"
    finally:
        inbox.close()
        await engine.dispose()


async def test_a_handler_whose_await_was_cancelled_elsewhere_is_retried_not_left_unsettled(
    namespace: Namespace, caplog: pytest.LogCaptureFixture
) -> None:
    """A cancellation that is not the delivery's own (the handler awaited a future another
    task gave up on) is the handler failing: retried, and said. It used to end the delivery's
    task with the message unacked and nothing logged, until the broker's consumer timeout."""
    calls: list[str] = []

    async def handler(event: Envelope) -> None:
        calls.append(event.id)
        if len(calls) == 1:
            shared: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            shared.cancel()
            await shared

    event = notification()
    async with running(namespace, "notifier", {"notification.requested": route(handler)}) as (
        pub,
        topo,
        _,
    ):
        await publish(pub, topo, event)

        async def handled_on_the_retry() -> None:
            assert calls == [event.id, event.id]
            await assert_empty(namespace.amqp_url, [topo.queue, topo.retry_queue(1)])

        await eventually(handled_on_the_retry, timeout=10)
        await assert_empty(namespace.amqp_url, [topo.dead_letter_queue])
    [retrying] = [r for r in caplog.records if "retrying later" in r.message]
    assert "HandlerCancelled" in retrying.__dict__["error"]


async def test_handlers_run_concurrently_up_to_the_prefetch(namespace: Namespace) -> None:
    started = asyncio.Event()
    running_now = 0
    peak = 0

    async def slow(event: Envelope) -> None:
        nonlocal running_now, peak
        running_now += 1
        peak = max(peak, running_now)
        if peak >= 4:
            started.set()
        await asyncio.wait_for(started.wait(), 5)
        running_now -= 1

    async with running(namespace, "notifier", {"notification.requested": route(slow)}) as (
        pub,
        topo,
        _,
    ):
        await asyncio.gather(*(publish(pub, topo, notification(str(i))) for i in range(4)))
        await asyncio.wait_for(started.wait(), 5)
    assert peak >= 4


async def test_a_redelivered_event_has_no_second_effect(namespace: Namespace) -> None:
    handler = Recorder()
    event = notification()
    routes = {"notification.requested": route(handler)}
    async with running(namespace, "notifier", routes) as (pub, topo, _):
        await publish(pub, topo, event)
        await publish(pub, topo, event)  # the same event id again, e.g. a redelivery

        async def both_settled() -> None:
            await assert_empty(namespace.amqp_url, [topo.queue])

        await eventually(both_settled)
    assert handler.calls == [event.id]
    await assert_empty(namespace.amqp_url, [topo.dead_letter_queue])


async def test_a_duplicate_in_flight_waits_for_the_original_instead_of_running_beside_it(
    namespace: Namespace,
) -> None:
    release = asyncio.Event()
    calls: list[str] = []

    async def slow(event: Envelope) -> None:
        calls.append(event.id)
        await asyncio.wait_for(release.wait(), 10)

    event = notification()
    async with running(namespace, "notifier", {"notification.requested": route(slow)}) as (
        pub,
        topo,
        _,
    ):
        await publish(pub, topo, event)
        await publish(pub, topo, event)  # delivered while the first is still in its handler

        async def both_delivered() -> None:
            assert await ready_messages(namespace.amqp_url, topo.queue) == 0

        await eventually(both_delivered)  # both unacked, held by the consumer (prefetch 8)
        await asyncio.sleep(0.2)
        assert calls == [event.id]
        release.set()

        async def both_settled() -> None:
            await assert_empty(namespace.amqp_url, [topo.queue])

        await eventually(both_settled)
    assert calls == [event.id]
    await assert_empty(namespace.amqp_url, [topo.dead_letter_queue])


async def test_half_a_prefetch_window_of_records_is_committed_without_the_commit_delay(
    namespace: Namespace,
) -> None:
    handler = Recorder()
    events = [notification(str(i)) for i in range(4)]  # half of the prefetch of 8
    store = tempfile.TemporaryDirectory()
    engine = open_store(f"sqlite+aiosqlite:///{store.name}/inbox.sqlite3")
    # A delay no test outlives; batches of half the prefetch of 8, as the runtime sizes them.
    inbox = Inbox(engine, "notifier", commit_delay=60, batch=4)
    await inbox.start()
    try:
        routes = {"notification.requested": route(handler)}
        async with running(namespace, "notifier", routes, inbox=inbox) as (pub, topo, _):
            await asyncio.gather(*(publish(pub, topo, event) for event in events))

            async def all_recorded_and_acked() -> None:
                for event in events:
                    assert isinstance(await inbox.lookup(event.id), Handled)
                await assert_empty(namespace.amqp_url, [topo.queue])

            await eventually(all_recorded_and_acked, timeout=10)
    finally:
        await engine.dispose()
        store.cleanup()


async def test_an_idempotent_route_skips_the_inbox_and_handles_a_repeat_again(
    namespace: Namespace,
) -> None:
    handler = Recorder()
    event = notification()
    idempotent = Route(handler, RetryPolicy(delays=(1,), immediate=0), idempotent=True)
    async with running(namespace, "notifier", {"notification.requested": idempotent}) as (
        pub,
        topo,
        _,
    ):
        await publish(pub, topo, event)

        await handler.called(event.id)
        await publish(pub, topo, event)  # a redelivery, a replay: its effect is idempotent

        await handler.called(event.id, event.id)
    await assert_empty(namespace.amqp_url, [topo.queue, topo.dead_letter_queue])


def test_a_route_cannot_be_both_stateful_and_idempotent() -> None:
    with pytest.raises(ValueError, match="stateful"):
        Route(Recorder(), RetryPolicy(delays=(1,)), stateful=True, idempotent=True)


async def test_a_duplicate_republishes_the_recorded_follow_ups(namespace: Namespace) -> None:
    submitted, processed = dataset_and_its_result()
    handler = Recorder(returns=[processed])
    routes = {"dataset.submitted": route(handler)}
    async with running(namespace, "processor", routes) as (pub, topo, _):
        await publish(pub, topo, submitted)
        await publish(pub, topo, submitted)
        follow_ups = await take(namespace.amqp_url, f"{namespace.name}.notifier", 2)
    # Handled once, but the follow-up is sent again (same id) in case the first send was lost.
    assert handler.calls == [submitted.id]
    assert [m.message_id for m in follow_ups] == [processed.id, processed.id]


async def test_a_stateful_handler_writes_its_state_with_the_inbox_record(
    namespace: Namespace, tmp_path: Path
) -> None:
    engine = open_store(f"sqlite+aiosqlite:///{tmp_path}/state.sqlite3")
    inbox = await inbox_with_effects(engine)

    async def stateful(event: Envelope, conn: AsyncConnection) -> None:
        await write_effect(conn, event)

    routes = {"notification.requested": Route(stateful, RetryPolicy(delays=(1,)), stateful=True)}
    event = notification()
    async with running(namespace, "notifier", routes, inbox=inbox) as (pub, topo, _):
        await publish(pub, topo, event)
        await publish(pub, topo, event)

        async def settled() -> None:
            await assert_empty(namespace.amqp_url, [topo.queue])
            assert await inbox.lookup(event.id) is not None

        await eventually(settled)
    written = await effects(engine)
    inbox.close()
    await engine.dispose()
    assert written == [event.id]


async def test_a_consumer_whose_queue_was_deleted_declares_it_and_consumes_again(
    namespace: Namespace,
) -> None:
    handler = Recorder()
    routes = {"notification.requested": route(handler)}
    async with running(namespace, "notifier", routes) as (pub, topo, consumer):
        connection = await aio_pika.connect(namespace.amqp_url)
        async with connection, connection.channel() as channel:
            await channel.queue_delete(topo.queue)  # the broker cancels the consumer
        event = notification()

        async def consuming_and_bound() -> None:
            assert consumer.consuming
            try:
                await publish(pub, topo, event)
            except Unroutable as exc:  # mandatory: refused while the queue has no binding
                raise AssertionError(exc) from exc

        await eventually(consuming_and_bound)

        await handler.called(event.id)


async def test_a_subscribe_that_fails_after_a_reconnect_is_tried_again(
    namespace: Namespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aio-pika drops the errors of its reopen callbacks: a consumer that failed to subscribe
    again would sit connected and idle. It says so and tries again."""
    settings = namespace.settings(retry_delays=(1,))
    topology = settings.topology("notifier")
    engine = open_store(f"sqlite+aiosqlite:///{tmp_path}/inbox.sqlite3")
    inbox = Inbox(engine, "notifier")
    await inbox.start()
    handler = Recorder()
    publisher = Publisher(namespace.amqp_url)
    await publisher.connect()
    async with TcpProxy("127.0.0.1", 5672) as proxy:
        url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
        connection = await aio_pika.connect_robust(url, reconnect_interval=0.2)
        consumer = Consumer(
            topology=topology,
            routes={"notification.requested": route(handler)},
            publisher=publisher,
            inbox=inbox,
            prefetch=8,
        )
        try:
            await declare_topology(connection, settings.all_topologies())
            await consumer.start(connection)
            subscribe, failed = consumer._subscribe, list[bool]()

            async def fails_once() -> None:
                if not failed:
                    failed.append(True)
                    raise ChannelInvalidStateError("the channel closed while subscribing")
                await subscribe()

            monkeypatch.setattr(consumer, "_subscribe", fails_once)
            proxy.reset_all()

            async def consuming_again() -> None:
                assert failed and consumer.consuming

            await eventually(consuming_again, timeout=15)
            event = notification()
            await publish(publisher, topology, event)
            await handler.called(event.id)
            assert await consumer.stop(drain_seconds=5)
        finally:
            await connection.close()
            await publisher.close()
            inbox.close()
            await engine.dispose()


@dataclass
class Reporting:
    """A status reporter that only sends when told (`sent`), and a queue its reports reach."""

    reporter: StatusReporter
    queue: str
    url: str

    async def sent(self) -> list[dict[str, Any]]:
        await self.reporter.flush()
        [message] = await take(self.url, self.queue, 1)
        transitions: list[dict[str, Any]] = orjson.loads(message.body)["data"]["transitions"]
        return transitions


@pytest.fixture
async def reporting(namespace: Namespace) -> AsyncIterator[Reporting]:
    publisher = Publisher(namespace.amqp_url)
    await publisher.connect()
    settings = namespace.settings(retry_delays=(1,))
    exchange = settings.topology("notifier").events_exchange
    queue = f"{namespace.name}.reports"
    connection = await aio_pika.connect(namespace.amqp_url)
    async with connection:
        channel = await connection.channel()
        await declare_topology(connection, settings.all_topologies())
        declared = await channel.declare_queue(queue, durable=True)
        await declared.bind(exchange, "status.reported")
        reporter = StatusReporter("notifier", publisher, exchange, interval=60)
        yield Reporting(reporter, queue, namespace.amqp_url)
        await channel.queue_delete(queue)
    await publisher.close()


@pytest.fixture
async def inbox_on_disk(tmp_path: Path) -> AsyncIterator[Inbox]:
    async with on_disk(tmp_path, "notifier", Inbox) as inbox:
        yield inbox


@pytest.mark.parametrize("stateful", [False, True], ids=["plain", "stateful"])
async def test_a_succeeded_report_is_stamped_as_its_inbox_record_tells_it_again(
    namespace: Namespace, inbox_on_disk: Inbox, reporting: Reporting, stateful: bool
) -> None:
    """`succeeded` is reported after the ack, and a crash in between takes the report: the
    record tells it again at the next start (`Inbox.recent`). The two must be one report to
    the gateway, which keeps a report once: same time, same attempt."""
    event = notification()
    handler = Recorder(failures=[ConnectionError("blip")])  # succeeds on the second attempt

    async def with_state(event: Envelope, conn: AsyncConnection) -> Sequence[Envelope]:
        return await handler(event)

    policy = RetryPolicy(delays=(1,), immediate=0)
    routes = {
        "notification.requested": Route(with_state, policy, stateful=True)
        if stateful
        else Route(handler, policy)
    }
    async with running(
        namespace, "notifier", routes, inbox=inbox_on_disk, reporter=reporting.reporter
    ) as (pub, topo, _):
        await publish(pub, topo, event)
        await handler.called(event.id, event.id)
        await eventually(lambda: assert_empty(namespace.amqp_url, [topo.queue]), timeout=10)
    [succeeded] = [t for t in await reporting.sent() if t["state"] == "succeeded"]
    [recorded] = await inbox_on_disk.unreported(None, 10)
    assert recorded == Outcome(event.id, event.type, "succeeded", recorded.at, 2)
    assert (datetime.fromisoformat(succeeded["at"]), succeeded["attempt"]) == (recorded.at, 2)


async def test_a_redelivery_of_a_handled_event_tells_its_success_again_beside_the_skip(
    namespace: Namespace, inbox_on_disk: Inbox, reporting: Reporting
) -> None:
    """The first handling's `succeeded` can be lost with its channel (a broker that died
    before the ack) while the process lives on, so no restart tells it again: the event showed
    `skipped_duplicate` alone. The skip tells it from the record: the same report."""
    event = notification()
    handler = Recorder()
    routes = {"notification.requested": route(handler)}
    async with running(
        namespace, "notifier", routes, inbox=inbox_on_disk, reporter=reporting.reporter
    ) as (pub, topo, _):
        await publish(pub, topo, event)
        await handler.called(event.id)
        await eventually(lambda: assert_empty(namespace.amqp_url, [topo.queue]), timeout=10)
        first = await reporting.sent()
        await publish(pub, topo, event)  # a redelivery, as the broker makes after a crash
        await eventually(lambda: assert_empty(namespace.amqp_url, [topo.queue]), timeout=10)
        again = await reporting.sent()
    assert handler.calls == [event.id]
    [succeeded] = [t for t in first if t["state"] == "succeeded"]
    assert [(t["state"], t.get("at"), t.get("attempt")) for t in again] == [
        ("succeeded", succeeded["at"], 1),
        ("skipped_duplicate", again[1]["at"], None),
    ]


async def test_a_cancelled_report_is_stamped_as_its_cancellation_tells_it_again(
    namespace: Namespace, inbox_on_disk: Inbox, reporting: Reporting
) -> None:
    event = notification()
    async with inbox_on_disk.transaction() as conn:
        await inbox_on_disk.cancel(conn, event.id)
    handler = Recorder()
    routes = {"notification.requested": route(handler)}
    async with running(
        namespace, "notifier", routes, inbox=inbox_on_disk, reporter=reporting.reporter
    ) as (pub, topo, _):
        await publish(pub, topo, event)
        await eventually(lambda: assert_empty(namespace.amqp_url, [topo.queue]), timeout=10)
    assert handler.calls == []
    [cancelled] = await reporting.sent()
    [noted] = await inbox_on_disk.unreported(None, 10)
    assert noted == Outcome(event.id, event.type, "cancelled", noted.at, None)
    assert (cancelled["state"], datetime.fromisoformat(cancelled["at"])) == ("cancelled", noted.at)


async def test_a_dead_letter_and_its_report_are_one_transition(
    namespace: Namespace, inbox_on_disk: Inbox, reporting: Reporting
) -> None:
    """The gateway shows `dead_lettered` from the letter and from the consumer's report,
    whichever comes first: they must be the same transition, or the history shows it twice."""
    event = notification()
    handler = Recorder(failures=[PermanentError("the recipient 'r' is unknown")])
    routes = {"notification.requested": route(handler)}
    async with running(
        namespace, "notifier", routes, inbox=inbox_on_disk, reporter=reporting.reporter
    ) as (pub, topo, _):
        await publish(pub, topo, event)
        [dead] = await take(namespace.amqp_url, topo.dead_letter_queue, 1)
    letter = read_dead_letter(
        namespace.name,
        body=dead.body,
        headers=dead.headers or {},
        message_id=dead.message_id,
        message_type=dead.type,
        correlation_id=dead.correlation_id,
    )
    from_letter = dead_lettered(letter, stored_at=datetime.now(UTC))
    assert from_letter is not None
    [reported] = [t for t in await reporting.sent() if t["state"] == "dead_lettered"]
    assert Transition.model_validate(reported) == from_letter
