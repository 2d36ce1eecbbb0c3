"""A minimum data rate for request bodies: a client that trickles its body is answered `408`.

uvicorn waits for a body as long as the client keeps its connection open, so a client sending a
byte every few seconds holds a connection (and, uploading, a blob being written) for as long as
it likes, and a few thousand such clients take every file descriptor the gateway has. As with
Kestrel's `MinRequestBodyDataRate`, a body must average at least `min_rate` bytes a second once
its grace period is over; one that falls behind is ended with `408` and its connection closed.

A sweep once a second checks every body being read, rather than a timer per read (a timer costs
each request ~10 µs on the ingest path; the registry costs a dict entry). The sweep cancels a
reading only while it waits for the client, never while its request does other work, and the
reading turns that cancellation into the `408`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from typing import Any, Final

from services.gateway.ingest import IngestError

SWEEP_SECONDS: Final = 1.0


@dataclass(slots=True)
class _Reading:
    started: float
    received: int = 0
    waiting: bool = False
    """Suspended in the read of the next chunk: where a cancellation lands."""
    too_slow: bool = False


class BodyRate:
    def __init__(self, min_rate: float, grace: float) -> None:
        self.min_rate = min_rate
        """Bytes a second a body averages at least; 0 for no limit."""
        self.grace = grace
        """Seconds from the first read before the rate counts."""
        self._reading: dict[asyncio.Task[Any], _Reading] = {}

    def _behind(self, reading: _Reading, now: float) -> bool:
        elapsed = now - reading.started
        return elapsed > self.grace and reading.received < self.min_rate * elapsed

    def end_slow(self, now: float) -> int:
        """End the bodies that fell behind the rate by `now` (a `time.monotonic()`); how many."""
        ended = 0
        for task, reading in list(self._reading.items()):
            if task.done():  # its reader stopped early and was never finalised
                del self._reading[task]
            elif reading.waiting and not reading.too_slow and self._behind(reading, now):
                reading.too_slow = True
                task.cancel()
                ended += 1
        return ended

    async def sweep(self) -> None:
        self.end_slow(time.monotonic())

    async def chunks(self, body: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
        """`body`'s chunks as they arrive; `IngestError(408)` once it falls behind the rate."""
        task = asyncio.current_task()
        if self.min_rate <= 0 or task is None:
            async for chunk in body:
                yield chunk
            return
        reading = _Reading(time.monotonic())
        self._reading[task] = reading
        chunks = aiter(body)
        try:
            while True:
                reading.waiting = True
                try:
                    chunk = await anext(chunks)
                except StopAsyncIteration:
                    return
                except asyncio.CancelledError:
                    # Ours (the sweep's) unless the task was cancelled besides: shutdown, or
                    # the client gone. Either way it lands on this read, even when the chunk
                    # had arrived by then (the task throws it in instead of resuming).
                    if reading.too_slow and task.uncancel() == 0:
                        raise IngestError(
                            408,
                            f"the body arrived slower than {self.min_rate:g} bytes a second",
                            headers={"Connection": "close"},
                        ) from None
                    raise
                finally:
                    reading.waiting = False
                reading.received += len(chunk)
                yield chunk
        finally:
            self._reading.pop(task, None)
