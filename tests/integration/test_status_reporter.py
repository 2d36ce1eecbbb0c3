"""The status reporter against a real broker: transitions go out batched, one report per round,
not one per confirmation round trip; and the final outcomes a report has not carried yet (a
crash, a refusal) stay owed in the inbox until one does."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest
from sqlalchemy import text

from contracts.events import DatasetSubmitted, DatasetSubmittedData
from contracts.topology import events_exchange
from services.messaging.inbox import Inbox
from services.messaging.publisher import Publisher
from services.messaging.status import StatusReporter
from services.messaging.store import open_store, store_url
from tests.conftest import Namespace
from tests.support.polling import eventually
from tests.support.queues import ready_messages, take

pytestmark = pytest.mark.broker


@pytest.fixture
async def exchange(namespace: Namespace) -> str:
    """The namespace's events exchange (deleted with the namespace), nothing bound to it."""
    name = events_exchange(namespace.name)
    connection = await aio_pika.connect(namespace.amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_exchange(name, aio_pika.ExchangeType.TOPIC, durable=True)
    return name


@pytest.fixture
async def reports(namespace: Namespace, exchange: str) -> AsyncIterator[str]:
    """A queue that receives the namespace's `status.reported` events."""
    name = f"{namespace.name}.reports"
    connection = await aio_pika.connect(namespace.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(name, durable=True)
        await queue.bind(exchange, "status.reported")
        yield name
        await channel.queue_delete(name)


@pytest.fixture
async def publisher(namespace: Namespace) -> AsyncIterator[Publisher]:
    publisher = Publisher(namespace.amqp_url, channels=1)
    await publisher.connect()
    yield publisher
    await publisher.close()


@pytest.fixture
def reporter(namespace: Namespace, publisher: Publisher) -> StatusReporter:
    return StatusReporter("processor", publisher, events_exchange(namespace.name))


def note(reporter: StatusReporter, *event_ids: str) -> None:
    for event_id in event_ids:
        reporter.report(event_id, "dataset.submitted", "succeeded", attempt=1)


async def test_transitions_noted_during_a_flush_wait_for_the_next_report(
    reporter: StatusReporter, reports: str, namespace: Namespace
) -> None:
    note(reporter, "a", "b", "c")
    flushing = asyncio.create_task(reporter.flush())
    await asyncio.sleep(0)  # the flush takes its batch and waits for the broker's confirm
    assert (reporter.pending, flushing.done()) == (0, False)
    note(reporter, "d", "e")

    await flushing

    assert reporter.pending == 2
    await reporter.flush()
    landed = await take(namespace.amqp_url, reports, 2)
    batches = [[t["event_id"] for t in orjson.loads(m.body)["data"]["transitions"]] for m in landed]
    assert batches == [["a", "b", "c"], ["d", "e"]]


async def test_a_backlog_goes_out_in_reports_of_at_most_the_batch_limit(
    reporter: StatusReporter, reports: str, namespace: Namespace
) -> None:
    note(reporter, *(f"e{i}" for i in range(2500)))

    await reporter.flush()

    assert reporter.pending == 0
    landed = await take(namespace.amqp_url, reports, 3)
    sizes = [len(orjson.loads(m.body)["data"]["transitions"]) for m in landed]
    assert sizes == [1000, 1000, 500]


# --- owed outcomes ------------------------------------------------------------------------------


@pytest.fixture
async def inbox(tmp_path: Path) -> AsyncIterator[Inbox]:
    engine = open_store(store_url(None, tmp_path, "processor"))
    box = Inbox(engine, "processor", reported_types={"dataset.submitted"})
    await box.start()
    yield box
    box.close()
    await engine.dispose()


def a_dataset() -> DatasetSubmitted:
    return DatasetSubmitted(data=DatasetSubmittedData(name="n", records=[{"v": 1}]))


async def handled(inbox: Inbox, *, ago: timedelta = timedelta(0)) -> tuple[str, datetime]:
    """A record made `ago` in the past: its id and time."""
    event = a_dataset()
    at = await inbox.remember(event, [], attempt=2)
    assert at is not None
    if ago:
        at -= ago
        async with inbox.transaction() as conn:
            await conn.execute(
                text("UPDATE processor_inbox SET handled_at = :at WHERE event_id = :id"),
                {"at": at, "id": event.id},
            )
    return event.id, at


def transitions(message: Any) -> list[dict[str, Any]]:
    told: list[dict[str, Any]] = orjson.loads(message.body)["data"]["transitions"]
    return told


async def test_a_confirmed_report_settles_the_outcomes_it_carried(
    publisher: Publisher, inbox: Inbox, reports: str, namespace: Namespace
) -> None:
    reporter = StatusReporter("processor", publisher, events_exchange(namespace.name), ledger=inbox)
    event_id, at = await handled(inbox)
    reporter.report(event_id, "dataset.submitted", "succeeded", at=at, attempt=2)

    assert await reporter.flush()

    assert await inbox.unreported(None, 10) == []


async def test_a_report_the_broker_did_not_take_leaves_its_outcomes_owed(
    publisher: Publisher, inbox: Inbox, exchange: str, namespace: Namespace
) -> None:
    """No queue is bound for `status.reported`: the broker returns the report."""
    reporter = StatusReporter("processor", publisher, events_exchange(namespace.name), ledger=inbox)
    event_id, at = await handled(inbox)
    reporter.report(event_id, "dataset.submitted", "succeeded", at=at, attempt=2)

    assert not await reporter.flush()

    assert [o.event_id for o in await inbox.unreported(None, 10)] == [event_id]


def sweeping(
    publisher: Publisher, namespace: Namespace, inbox: Inbox, recover_after: float = 60
) -> StatusReporter:
    """A running reporter that rounds every 50 ms and tells again what is owed for
    `recover_after` seconds (a minute)."""
    reporter = StatusReporter(
        "processor",
        publisher,
        events_exchange(namespace.name),
        interval=0.05,
        ledger=inbox,
        recover_after=recover_after,
    )
    reporter.start()
    return reporter


async def test_outcomes_owed_longer_than_the_recovery_age_are_reported_again_as_first_told(
    publisher: Publisher, inbox: Inbox, reports: str, namespace: Namespace
) -> None:
    """As when a crash took the report: any process of the service tells it again, once."""
    lost, lost_at = await handled(inbox, ago=timedelta(minutes=2))
    fresh, _ = await handled(inbox)  # its own process may still report it
    reporter = sweeping(publisher, namespace, inbox)
    try:
        [message] = await take(namespace.amqp_url, reports, 1)

        async def settled() -> None:
            assert [o.event_id for o in await inbox.unreported(None, 10)] == [fresh]

        await eventually(settled, timeout=5)
        await asyncio.sleep(0.3)  # rounds go by: it was told once
    finally:
        await reporter.close()
    [told] = transitions(message)
    assert (told["event_id"], told["state"], told["attempt"]) == (lost, "succeeded", 2)
    assert datetime.fromisoformat(told["at"]) == lost_at
    assert await ready_messages(namespace.amqp_url, reports) == 0


async def test_at_start_up_every_owed_outcome_is_reported_again_whatever_its_age(
    publisher: Publisher, inbox: Inbox, reports: str, namespace: Namespace
) -> None:
    owed = [(await handled(inbox, ago=timedelta(seconds=s)))[0] for s in (30, 0)]
    reporter = StatusReporter(
        "processor", publisher, events_exchange(namespace.name), ledger=inbox, recover_after=60
    )

    assert await reporter.recover() == 2
    await reporter.flush()

    [message] = await take(namespace.amqp_url, reports, 1)
    assert [t["event_id"] for t in transitions(message)] == owed
    assert await inbox.unreported(None, 10) == []


async def test_at_start_up_more_than_a_report_holds_is_told_a_batch_a_round_not_left_to_age(
    publisher: Publisher, inbox: Inbox, reports: str, namespace: Namespace
) -> None:
    owed = await asyncio.gather(*(handled(inbox) for _ in range(2500)))
    reporter = sweeping(publisher, namespace, inbox)  # an age of a minute
    try:
        assert await reporter.recover() == 1000

        async def all_told() -> None:
            assert await inbox.unreported(None, 10) == []

        await eventually(all_told, timeout=10)
    finally:
        await reporter.close()
    told = [
        t["event_id"] for m in await take(namespace.amqp_url, reports, 3) for t in transitions(m)
    ]
    assert sorted(told) == sorted(event_id for event_id, _ in owed)


async def test_owed_outcomes_are_not_piled_up_while_the_broker_refuses_reports(
    publisher: Publisher, inbox: Inbox, exchange: str, namespace: Namespace
) -> None:
    """Nothing is bound for the reports: each round's report comes back. The owed outcome is
    noted again once, not once a round. (The first round has nothing to send, which counts as
    gone out: it looks for what is owed.)"""
    await handled(inbox, ago=timedelta(minutes=2))
    # A look due every round (a quarter of 0.2 s is a round of 50 ms).
    reporter = sweeping(publisher, namespace, inbox, recover_after=0.2)
    try:
        seen = []
        for _ in range(50):  # ten rounds; a round's flush holds its batch while it publishes
            seen.append(reporter.pending)
            await asyncio.sleep(0.01)
        assert max(seen) == 1, seen
    finally:
        task = reporter._task  # stop the rounds; its close would report again
        assert task is not None
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
