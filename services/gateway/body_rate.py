"""Slow request bodies: a body that trickles in is answered `408`, and a connection whose body
was not read to its end is closed after the answer.

uvicorn waits for a body as long as the client keeps its connection open, so a client sending a
byte every few seconds holds a connection (and, uploading, a blob being written) for as long as
it likes, and a few thousand such clients take every file descriptor the gateway has. So, as
Kestrel's `MinRequestBodyDataRate` and nginx's `client_body_timeout` do, a body must average
at least `min_rate` bytes a second once its grace period is over, and may not pause longer than
`idle` seconds; one that falls behind is ended with `408` and its connection closed. Only the
time the request waits for its body counts (as Kestrel's): while it works on a chunk (writes a
block to storage) the client cannot send, since uvicorn stops reading a request that does not.
A request answered before its body was read (a `404`, a refusal on the declared length) is
closed after the answer too: uvicorn would otherwise keep reading and dropping what the client
sends, and every byte restarts its keep-alive timer.

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

    def _behind(self, reading: _Exchange, now: float) -> str | None:
        """Why a body being waited for is behind at `now`, if it is."""
        pause = now - reading.wait_began
        waited = reading.waited + pause  # the time spent waiting for the body, all told
        if self.min_rate > 0 and waited > self.grace and reading.received < self.min_rate * waited:
            return f"slower than {self.min_rate:g} bytes a second"
        if self.idle > 0 and pause > self.idle:
            return f"paused over {self.idle:g} s"
        return None

    def end_slow(self, now: float) -> int:
        """End the bodies behind at this sweep and the last (`now`: a `time.monotonic()`);
        how many."""
        on_time = self._swept_at is not None and now - self._swept_at <= 2 * SWEEP_SECONDS
        self._swept_at = now
        ended = 0
        for reading in list(self._reading):
            if reading.task is None or reading.task.done():  # ended without its whole body
                self._reading.discard(reading)
                continue
            why = self._behind(reading, now) if reading.waiting else None
            if why is None or reading.too_slow is not None:
                reading.suspect = False
            elif not (reading.suspect and on_time):
                reading.suspect = True  # the loop may not have read what arrived yet
            else:
                reading.too_slow = why
                reading.task.cancel()
                ended += 1
        return ended

    async def sweep(self) -> None:
        self.end_slow(time.monotonic())


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
        "_rate", "_receive", "_send", "answered", "received", "suspect", "task", "too_slow",
        "unread", "wait_began", "waited", "waiting",
    )  # fmt: skip

    def __init__(self, rate: BodyRate, receive: Receive, send: Send, unread: bool) -> None:
        self._rate = rate
        self._receive = receive
        self._send = send
        self.unread = unread
        """The request has a body not read to its end."""
        self.answered = False
        """The response has started: a read now (a wait for the client's disconnect while a
        response streams) is no longer the request's body being read."""
        self.task: asyncio.Task[Any] | None = None
        """The task of the latest wait for the body: the one a cancellation must land in."""
        self.received = 0
        self.waited = 0.0
        """Seconds spent waiting for the body, before the current wait."""
        self.wait_began = 0.0
        self.waiting = False
        """Suspended in `receive`: where a cancellation lands."""
        self.suspect = False
        """The previous sweep found it behind."""
        self.too_slow: str | None = None
        """Why the sweep ended it."""

    async def receive(self) -> Message:
        rate = self._rate
        if not self.unread or self.answered or not rate.enforced:
            message = await self._receive()  # nothing to watch: a wait for disconnect, say
        else:
            message = await self._wait(rate)
        if self.unread and (message["type"] != "http.request" or not message.get("more_body")):
            self.unread = False  # the last chunk, or the client gone
            rate._reading.discard(self)
        return message

    async def _wait(self, rate: BodyRate) -> Message:
        rate._reading.add(self)  # until the body is read, the response starts, or a 408
        self.task = asyncio.current_task()
        self.wait_began = time.monotonic()
        self.waiting = True
        try:
            message = await self._receive()
        except asyncio.CancelledError:
            # The sweep's, unless the task was cancelled besides (shutdown): either way it
            # lands on this wait, even when a chunk had arrived by then (the task throws it in
            # instead of resuming).
            if self.too_slow and self.task is not None and self.task.uncancel() == 0:
                rate._reading.discard(self)
                # Answered, then closed (`send`: the body was not read).
                raise HTTPException(408, f"the body arrived too slowly: {self.too_slow}") from None
            raise
        finally:
            self.waiting = False
        self.waited += time.monotonic() - self.wait_began
        self.received += len(message.get("body", b""))
        return message

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.answered = True
            self._rate._reading.discard(self)
            if self.unread:
                # Answered before the body was read: close the connection after the answer,
                # or uvicorn reads and drops the rest for as long as the client sends it.
                headers = [*message.get("headers", ()), (b"connection", b"close")]
                message = {**message, "headers": headers}
        await self._send(message)
