"""Consumer throughput: Courier's runtime against a bare aio-pika consume-and-ack loop.

Both drain the same number of preloaded persistent events from a quorum queue at the same
prefetch, interleaved over several rounds in one run (the machine is shared and noisy, so only
the ratio of the medians means something). Courier runs its real path: validation, the inbox
(SQLite file), status reporting, ack after success, with a no-op handler.

    python -m bench.consumer [--events 20000] [--prefetch 100] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path

import aio_pika
import uvloop
from aio_pika.abc import AbstractIncomingMessage

from bench.report import Result, print_table, save
from bench.system import AMQP_URL
from contracts.events import EVENT_ADAPTER, NotificationRequested, NotificationRequestedData
from services.messaging.consumer import Consumer, Route
from services.messaging.declare import declare_topology
from services.messaging.heap import freeze_start_up_heap
from services.messaging.inbox import Inbox
from services.messaging.publisher import Publisher
from services.messaging.retry import RetryPolicy
from services.messaging.settings import ConsumerSettings
from services.messaging.status import StatusReporter
from services.messaging.store import open_store


async def preload(url: str, queue: str, events: int) -> None:
    """Publish `events` persistent notifications straight into `queue`, confirmed, pipelined."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        window: list[Awaitable[object]] = []
        for i in range(events):
            event = NotificationRequested(
                data=NotificationRequestedData(recipient="r", subject=f"s{i}")
            )
            message = aio_pika.Message(
                EVENT_ADAPTER.dump_json(event),
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=event.id,
                type=event.type,
            )
            window.append(channel.default_exchange.publish(message, routing_key=queue))
            if len(window) >= 256:
                await asyncio.gather(*window)
                window.clear()
        await asyncio.gather(*window)


async def _until(done: asyncio.Event, count: Callable[[], int], total: int) -> float:
    started = time.perf_counter()
    await done.wait()
    assert count() == total
    return time.perf_counter() - started


async def bare(url: str, queue: str, total: int, prefetch: int) -> float:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        q = await channel.get_queue(queue)
        seen = 0
        done = asyncio.Event()

        async def on_message(message: AbstractIncomingMessage) -> None:
            nonlocal seen
            await message.ack()
            seen += 1
            if seen == total:
                done.set()

        await q.consume(on_message)
        return await _until(done, lambda: seen, total)


async def courier(url: str, namespace: str, total: int, prefetch: int, store: Path) -> float:
    settings = ConsumerSettings(amqp_url=url, namespace=namespace, prefetch=prefetch)
    topology = settings.topology("notifier")
    publisher = Publisher(url)
    await publisher.connect()
    connection = await aio_pika.connect_robust(url)
    engine = open_store(f"sqlite+aiosqlite:///{store}/{uuid.uuid4().hex}.sqlite3")
    inbox = Inbox(  # as services.messaging.runtime opens it
        engine,
        "notifier",
        commit_delay=settings.inbox_commit_delay_ms / 1000,
        batch=max(1, prefetch // 2),
        reported_types=topology.event_types,
    )
    await inbox.start()
    reporter = StatusReporter(
        "notifier",
        publisher,
        topology.events_exchange,
        ledger=inbox,
        recover_after=settings.status_recovery_seconds,
    )
    reporter.start()
    seen = 0
    done = asyncio.Event()

    async def handler(event: NotificationRequested) -> None:
        nonlocal seen
        seen += 1
        if seen == total:
            done.set()

    consumer = Consumer(
        topology=topology,
        routes={"notification.requested": Route(handler, RetryPolicy(delays=(5,)))},
        publisher=publisher,
        inbox=inbox,
        prefetch=prefetch,
        reporter=reporter,
    )
    try:
        async with AsyncExitStack() as heap:
            await consumer.start(connection)
            freeze_start_up_heap(heap)  # as services.messaging.runtime does once consuming
            elapsed = await _until(done, lambda: seen, total)
            await consumer.stop(10)  # the last acks
        return elapsed
    finally:
        await reporter.close()
        await connection.close()
        await publisher.close()
        inbox.close()
        await engine.dispose()


async def main(events: int, prefetch: int, rounds: int) -> None:
    namespace = f"bench{uuid.uuid4().hex[:8]}"
    settings = ConsumerSettings(amqp_url=AMQP_URL, namespace=namespace)
    connection = await aio_pika.connect(AMQP_URL)
    bare_queue = f"{namespace}.bare"
    times: dict[str, list[float]] = {"bare aio-pika": [], "courier": []}
    try:
        await declare_topology(connection, settings.all_topologies())
        channel = await connection.channel()
        await channel.declare_queue(bare_queue, durable=True, arguments={"x-queue-type": "quorum"})
        work_queue = settings.topology("notifier").queue
        with tempfile.TemporaryDirectory() as store:
            for round_ in range(rounds):
                await preload(AMQP_URL, bare_queue, events)
                times["bare aio-pika"].append(await bare(AMQP_URL, bare_queue, events, prefetch))
                await preload(AMQP_URL, work_queue, events)
                times["courier"].append(
                    await courier(AMQP_URL, namespace, events, prefetch, Path(store))
                )
                print(
                    f"round {round_ + 1}: bare {events / times['bare aio-pika'][-1]:.0f}/s, "
                    f"courier {events / times['courier'][-1]:.0f}/s"
                )
    finally:
        channel = await connection.channel()
        for topology in settings.all_topologies():
            for queue in topology.queues():
                await channel.queue_delete(queue.name)
        await channel.queue_delete(bare_queue)
        await channel.exchange_delete(f"{namespace}.events")
        await channel.exchange_delete(f"{namespace}.dlx")
        await connection.close()

    rates = {name: [events / t for t in ts] for name, ts in times.items()}
    results = [
        Result(name, "msgs/s", statistics.median(values), values) for name, values in rates.items()
    ]
    ratio = results[1].median / results[0].median
    print_table(f"Consumers: {events} events, prefetch {prefetch}, quorum queue", results)
    print(f"ratio courier / bare aio-pika: {ratio:.2f} (target >= 0.80)")
    target = "ratio courier / bare aio-pika >= 0.80"
    save(
        "consumer",
        results,
        {"events": events, "prefetch": prefetch, "ratio": ratio, "target": target},
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--prefetch", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    # The loop the services run on (services.messaging.runtime); the bare loop shares it.
    uvloop.run(main(args.events, args.prefetch, args.rounds))
