"""A minimum body rate: a body that falls behind is ended with 408; nothing else is touched."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from services.gateway.body_rate import BodyRate
from services.gateway.ingest import IngestError

GRACE = 5.0
RATE = 100.0


class Trickle:
    """A request body the test feeds chunk by chunk; `None` ends it."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def chunks(self) -> AsyncIterator[bytes]:
        while (chunk := await self.queue.get()) is not None:
            yield chunk


async def read_all(rate: BodyRate, body: Trickle) -> bytes:
    return b"".join([chunk async for chunk in rate.chunks(body.chunks())])


async def settled() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_body_behind_the_rate_after_its_grace_is_a_408_that_closes_the_connection() -> None:
    rate, body = BodyRate(RATE, GRACE), Trickle()
    reader = asyncio.create_task(read_all(rate, body))
    body.queue.put_nowait(b"x" * 10)
    await settled()
    assert rate.end_slow(time.monotonic() + GRACE - 1) == 0  # still in its grace period
    assert rate.end_slow(time.monotonic() + GRACE + 1) == 1  # 10 bytes in 6 s: behind
    with pytest.raises(IngestError) as refused:
        await reader
    assert refused.value.status == 408
    assert refused.value.headers == {"Connection": "close"}
    assert "slower than 100 bytes a second" in str(refused.value.detail)


async def test_a_body_keeping_the_rate_is_read_to_its_end() -> None:
    rate, body = BodyRate(RATE, GRACE), Trickle()
    reader = asyncio.create_task(read_all(rate, body))
    body.queue.put_nowait(b"x" * 1000)
    await settled()
    assert rate.end_slow(time.monotonic() + GRACE + 1) == 0  # 1000 bytes in 6 s
    body.queue.put_nowait(b"y")
    body.queue.put_nowait(None)
    assert await reader == b"x" * 1000 + b"y"
    assert rate.end_slow(time.monotonic() + 60) == 0


async def test_a_request_busy_with_its_chunk_is_never_cancelled() -> None:
    # Between reads the request works (writes a block to storage, say): a cancellation there
    # would land in that work, not in the read, so a slow body is ended at its next read.
    rate, body = BodyRate(RATE, GRACE), Trickle()
    working = asyncio.Event()
    done = asyncio.Event()

    async def upload() -> None:
        async for _ in rate.chunks(body.chunks()):
            working.set()
            await done.wait()

    reader = asyncio.create_task(upload())
    body.queue.put_nowait(b"x")
    await working.wait()
    assert rate.end_slow(time.monotonic() + GRACE + 1) == 0
    done.set()
    await settled()
    assert rate.end_slow(time.monotonic() + GRACE + 1) == 1
    with pytest.raises(IngestError):
        await reader


async def test_a_chunk_arriving_as_the_sweep_ends_the_body_is_still_a_408() -> None:
    rate, body = BodyRate(RATE, GRACE), Trickle()
    reader = asyncio.create_task(read_all(rate, body))
    await settled()
    body.queue.put_nowait(b"x")  # the read's result is ready, the reader not yet resumed
    assert rate.end_slow(time.monotonic() + GRACE + 1) == 1
    with pytest.raises(IngestError):
        await reader


async def test_a_cancellation_from_elsewhere_stays_a_cancellation() -> None:
    rate, body = BodyRate(RATE, GRACE), Trickle()
    reader = asyncio.create_task(read_all(rate, body))
    await settled()
    reader.cancel()  # shutdown, say
    with pytest.raises(asyncio.CancelledError):
        await reader
    assert rate.end_slow(time.monotonic() + 60) == 0


async def test_a_body_also_cancelled_elsewhere_is_cancelled_not_answered() -> None:
    rate, body = BodyRate(RATE, GRACE), Trickle()
    reader = asyncio.create_task(read_all(rate, body))
    await settled()
    assert rate.end_slow(time.monotonic() + GRACE + 1) == 1
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader


async def test_a_reader_that_stopped_early_is_forgotten_by_the_next_sweep() -> None:
    rate, body = BodyRate(RATE, GRACE), Trickle()

    async def first_chunk_only() -> None:
        async for _ in rate.chunks(body.chunks()):
            raise IngestError(413, "too large")  # the generator is left suspended

    body.queue.put_nowait(b"x")
    with pytest.raises(IngestError):
        await asyncio.create_task(first_chunk_only())
    rate.end_slow(time.monotonic())
    assert rate._reading == {}


async def test_no_minimum_rate_reads_without_watching() -> None:
    rate, body = BodyRate(0, GRACE), Trickle()
    reader = asyncio.create_task(read_all(rate, body))
    body.queue.put_nowait(b"x")
    await settled()
    assert rate._reading == {}
    body.queue.put_nowait(None)
    assert await reader == b"x"
