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
from typing import Any, Final

from starlette.exceptions import HTTPException
from starlette.types import Message, Receive, Scope, Send

SWEEP_SECONDS: Final = 1.0


class BodyRate:
    def __init__(self, min_rate: float, grace: float, idle: float) -> None:
        self.min_rate = min_rate
        """Bytes a second a body averages at least once `grace` is over; 0 for no minimum."""
        self.grace = grace
        self.idle = idle
        """Seconds a body may pause between chunks; 0 for no limit."""
        self.enforced = min_rate > 0 or idle > 0
        self._reading: set[_Exchange] = set()
        """The requests whose body is being read."""
        self._swept_at: float | None = None

    def exchange(self, scope: Scope, receive: Receive, send: Send) -> tuple[Receive, Send]:
        """`receive` and `send` of one HTTP request, watched."""
        exchange = _Exchange(self, receive, send, _declares_body(scope))
        return exchange.receive, exchange.send

    def _behind(self, reading: _Exchange, now: float) -> bool:
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
            if reading.task is None or reading.task.done():  # ended without its whole body
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
    """One request's `receive` and `send`, and how the reading of its body goes (its own
    fields rather than another object: this runs for every request on the ingest path)."""

    __slots__ = (
        "_rate", "_receive", "_send", "last", "received", "started", "suspect", "task",
        "too_slow", "unread", "waiting",
    )  # fmt: skip

    def __init__(self, rate: BodyRate, receive: Receive, send: Send, unread: bool) -> None:
        self._rate = rate
        self._receive = receive
        self._send = send
        self.unread = unread
        """The request has a body not read to its end."""
        self.task: asyncio.Task[Any] | None = None
        """The request's task, once it reads a watched body."""
        self.started = self.last = 0.0
        """When the reading began, and when the last bytes came (the start, before any)."""
        self.received = 0
        self.waiting = False
        """Suspended in `receive`: where a cancellation lands."""
        self.suspect = False
        """The previous sweep found it behind."""
        self.too_slow = False

    async def receive(self) -> Message:
        if not self.unread:
            return await self._receive()  # no body, or all of it read: a wait for disconnect
        rate = self._rate
        if self.task is None and rate.enforced:
            self.task = asyncio.current_task()
            self.started = self.last = time.monotonic()
            rate._reading.add(self)
        self.waiting = True
        try:
            message = await self._receive()
        except asyncio.CancelledError:
            # The sweep's, unless the task was cancelled besides (shutdown): either way it
            # lands on this wait, even when a chunk had arrived by then (the task throws it in
            # instead of resuming).
            if self.too_slow and self.task is not None and self.task.uncancel() == 0:
                rate._reading.discard(self)
                raise rate._too_slow() from None  # answered, then closed (`send`)
            raise
        finally:
            self.waiting = False
        if message["type"] != "http.request" or not message.get("more_body", False):
            self.unread = False  # the last chunk, or the client gone
            rate._reading.discard(self)
        elif chunk := message.get("body"):
            self.received += len(chunk)
            self.last = time.monotonic()
        return message

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start" and self.unread:
            # Answered before the body was read: close the connection after the answer,
            # or uvicorn reads and drops the rest for as long as the client sends it.
            headers = [*message.get("headers", ()), (b"connection", b"close")]
            message = {**message, "headers": headers}
        await self._send(message)
