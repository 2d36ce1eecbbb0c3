"""Slow request bodies: a body that trickles in is answered `408`, and a connection whose body
was not read to its end is closed after the answer.

uvicorn waits for a body as long as the client keeps its connection open, so a client sending a
byte every few seconds holds a connection (and, uploading, a blob being written) for as long as
it likes, and a few thousand such clients take every file descriptor the gateway has. So, as
Kestrel's `MinRequestBodyDataRate` and nginx's `client_body_timeout` do, a body must average
at least `min_rate` bytes a second once its grace period is over, and may not pause longer than
`idle` seconds; one that falls behind is ended with `408` and its connection closed. A request
answered before its body was read (a `404`, a refusal on the declared length) is closed after
the answer too: uvicorn would otherwise keep reading and dropping what the client sends, and
every byte restarts its keep-alive timer.

Enforced on the ASGI `receive` of every request, so every route is covered, including those
whose body FastAPI reads before any check of the caller. A sweep once a second checks every body
being read, rather than a timer per read (a timer costs ~11 µs under uvloop; a request here
~3 µs). It cancels a reading only while it waits for the client, never while its request does
other work, and the reading turns that cancellation into the `408`. A reading must be found
behind by two sweeps in a row, the second on time: after the event loop stalled (a long GC
pause, an overloaded host) the first sweep runs before the loop has read what arrived meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Final

from starlette.exceptions import HTTPException
from starlette.types import Message, Receive, Scope, Send

SWEEP_SECONDS: Final = 1.0


@dataclass(slots=True, eq=False)  # kept in a set, by identity
class _Reading:
    task: asyncio.Task[Any]
    started: float
    last: float
    """When the last bytes came (the start, before any)."""
    received: int = 0
    waiting: bool = False
    """Suspended in `receive`: where a cancellation lands."""
    suspect: bool = False
    """The previous sweep found it behind."""
    too_slow: bool = False


class BodyRate:
    def __init__(self, min_rate: float, grace: float, idle: float) -> None:
        self.min_rate = min_rate
        """Bytes a second a body averages at least once `grace` is over; 0 for no minimum."""
        self.grace = grace
        self.idle = idle
        """Seconds a body may pause between chunks; 0 for no limit."""
        self._reading: set[_Reading] = set()
        self._swept_at: float | None = None

    @property
    def enforced(self) -> bool:
        return self.min_rate > 0 or self.idle > 0

    def exchange(self, scope: Scope, receive: Receive, send: Send) -> tuple[Receive, Send]:
        """`receive` and `send` of one HTTP request, watched."""
        exchange = _Exchange(self, receive, send, _declares_body(scope))
        return exchange.receive, exchange.send

    def _behind(self, reading: _Reading, now: float) -> bool:
        elapsed = now - reading.started
        slow = self.min_rate > 0 and elapsed > self.grace
        return (slow and reading.received < self.min_rate * elapsed) or (
            self.idle > 0 and now - reading.last > self.idle
        )

    def end_slow(self, now: float) -> int:
        """End the bodies behind at this sweep and the last (`now`: a `time.monotonic()`);
        how many."""
        on_time = self._swept_at is not None and now - self._swept_at <= 2 * SWEEP_SECONDS
        self._swept_at = now
        ended = 0
        for reading in list(self._reading):
            if reading.task.done():  # its request ended without finishing the body
                self._reading.discard(reading)
            elif not (reading.waiting and self._behind(reading, now)) or reading.too_slow:
                reading.suspect = False
            elif not (reading.suspect and on_time):
                reading.suspect = True  # the loop may not have read what arrived yet
            else:
                reading.too_slow = True
                reading.task.cancel()
                ended += 1
        return ended

    async def sweep(self) -> None:
        self.end_slow(time.monotonic())

    def _watch(self) -> _Reading | None:
        task = asyncio.current_task()
        if task is None or not self.enforced:
            return None
        now = time.monotonic()
        reading = _Reading(task, now, now)
        self._reading.add(reading)
        return reading

    def _forget(self, reading: _Reading | None) -> None:
        if reading is not None:
            self._reading.discard(reading)

    def _too_slow(self) -> HTTPException:
        limits = [f"{self.min_rate:g} bytes a second"] if self.min_rate > 0 else []
        limits += [f"no pause over {self.idle:g} s"] if self.idle > 0 else []
        return HTTPException(408, f"the body arrived too slowly (at least {', '.join(limits)})")


def _declares_body(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return value.strip() not in (b"0", b"")
        if name == b"transfer-encoding":
            return True
    return False


class _Exchange:
    __slots__ = ("_rate", "_reading", "_receive", "_send", "_unread")

    def __init__(self, rate: BodyRate, receive: Receive, send: Send, unread: bool) -> None:
        self._rate = rate
        self._receive = receive
        self._send = send
        self._unread = unread
        """The request has a body not read to its end."""
        self._reading: _Reading | None = None

    async def receive(self) -> Message:
        if not self._unread:
            return await self._receive()  # no body, or all of it read: a wait for disconnect
        reading = self._reading or self._rate._watch()
        if reading is None:
            message = await self._receive()
        else:
            self._reading = reading
            message = await self._wait(reading)
        if message["type"] != "http.request" or not message.get("more_body", False):
            self._unread = False  # the last chunk, or the client gone
            self._rate._forget(reading)
        return message

    async def _wait(self, reading: _Reading) -> Message:
        reading.waiting = True
        try:
            message = await self._receive()
        except asyncio.CancelledError:
            # The sweep's, unless the task was cancelled besides (shutdown): either way it
            # lands on this wait, even when a chunk had arrived by then (the task throws it in
            # instead of resuming).
            if reading.too_slow and reading.task.uncancel() == 0:
                self._rate._forget(reading)
                raise self._rate._too_slow() from None  # answered, then closed (`send`)
            raise
        finally:
            reading.waiting = False
        if chunk := message.get("body"):
            reading.received += len(chunk)
            reading.last = time.monotonic()
        return message

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start" and self._unread:
            # Answered before the body was read: close the connection after the answer,
            # or uvicorn reads and drops the rest for as long as the client sends it.
            headers = [*message.get("headers", ()), (b"connection", b"close")]
            message = {**message, "headers": headers}
        await self._send(message)
