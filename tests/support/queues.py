"""Reading what sits in a queue, for assertions (real broker, no mocks)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from services.messaging.settings import CourierSettings

TTL_SLACK = 0.1
"""Seconds a delay tier (a queue TTL) may release a message before its time by this process's
clock: seen 2 to 10 ms early on a loaded host (the broker's timers, its clock against ours)."""


async def take(
    url: str, queue: str, count: int, timeout: float = 10.0
) -> list[AbstractIncomingMessage]:
    """Consume and ack exactly `count` messages from `queue` within `timeout`, or fail."""
    taken: list[AbstractIncomingMessage] = []
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=max(count, 1))
        q = await channel.get_queue(queue, ensure=True)
        done = asyncio.Event()

        async def on_message(message: AbstractIncomingMessage) -> None:
            taken.append(message)
            await message.ack()
            if len(taken) >= count:
                done.set()

        tag = await q.consume(on_message)
        try:
            await asyncio.wait_for(done.wait(), timeout)
        except TimeoutError:
            raise AssertionError(
                f"expected {count} messages in {queue}, got {len(taken)} within {timeout}s"
            ) from None
        finally:
            await q.cancel(tag)
    return taken


async def assert_empty(url: str, queues: Sequence[str]) -> None:
    """None of `queues` holds a message (call it after a confirmed publish would have landed)."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        for name in queues:
            q = await channel.get_queue(name, ensure=True)
            message = await q.get(fail=False, timeout=5)
            assert message is None, f"{name} holds {message.body!r}"


async def ready_messages(url: str, queue: str) -> int:
    """Messages ready in `queue` (delivered, unacked ones excluded), read without consuming any:
    a `get` would count as a delivery."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.message_count or 0)


async def unbind_everyone(url: str, settings: CourierSettings, event_type: str) -> None:
    """Leave no queue of `settings`' services bound for `event_type`: a publish of it is
    returned as unroutable."""
    connection = await aio_pika.connect(url)
    async with connection, connection.channel() as channel:
        for topology in settings.all_topologies():
            for binding in topology.bindings():
                if binding.routing_key == event_type:
                    queue = await channel.get_queue(binding.queue)
                    await queue.unbind(binding.exchange, binding.routing_key)
