"""The status reporter against a real broker: transitions go out batched, one report per round,
not one per confirmation round trip."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aio_pika
import orjson
import pytest

from contracts.topology import events_exchange
from services.messaging.publisher import Publisher
from services.messaging.status import StatusReporter
from tests.conftest import Namespace
from tests.support.queues import take

pytestmark = pytest.mark.broker


@pytest.fixture
async def reports(namespace: Namespace) -> AsyncIterator[str]:
    """A queue that receives the namespace's `status.reported` events."""
    name = f"{namespace.name}.reports"
    connection = await aio_pika.connect(namespace.amqp_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            events_exchange(namespace.name), aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(name, durable=True)
        await queue.bind(exchange, "status.reported")
        yield name
        await channel.queue_delete(name)


@pytest.fixture
async def reporter(namespace: Namespace) -> AsyncIterator[StatusReporter]:
    publisher = Publisher(namespace.amqp_url, channels=1)
    await publisher.connect()
    yield StatusReporter("processor", publisher, events_exchange(namespace.name))
    await publisher.close()


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
