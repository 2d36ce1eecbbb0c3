"""Slow request bodies: a body behind the minimum rate, or paused too long, is ended with 408 at
the second sweep in a row that finds it so; a request answered before its body was read has its
connection closed; nothing else is touched."""

from __future__ import annotations

import asyncio
import time

import pytest
from starlette.exceptions import HTTPException
from starlette.types import Message, Receive, Send

from services.gateway.body_rate import SWEEP_SECONDS, BodyRate

GRACE = 5.0
RATE = 100.0
IDLE = 30.0


def scope(*headers: tuple[bytes, bytes]) -> dict[str, object]:
    return {"type": "http", "method": "POST", "path": "/", "headers": list(headers)}


WITH_BODY = scope((b"host", b"x"), (b"content-length", b"1000"))


class Client:
    """The connection's side: chunks the test sends, answers the app sends."""

    def __init__(self) -> None:
        self.chunks: asyncio.Queue[Message] = asyncio.Queue()
        self.sent: list[Message] = []

    def send_chunk(self, body: bytes, more: bool = True) -> None:
        self.chunks.put_nowait({"type": "http.request", "body": body, "more_body": more})

    async def receive(self) -> Message:
        return await self.chunks.get()

    async def send(self, message: Message) -> None:
        self.sent.append(message)

    def answer_headers(self) -> list[tuple[bytes, bytes]]:
        [start] = [m for m in self.sent if m["type"] == "http.response.start"]
        return list(start["headers"])


def watched(rate: BodyRate, client: Client, headers: dict[str, object] = WITH_BODY) -> Receive:
    receive, _ = rate.exchange(headers, client.receive, client.send)
    return receive


async def read_body(receive: Receive) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += bytes(message.get("body", b""))
        if not message.get("more_body", False):
            return body


async def one(receive: Receive) -> Message:
    return await receive()


async def settled() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


class Sweeps:
    """Sweeps on time, at the clock's `now` plus `ahead` seconds."""

    def __init__(self, rate: BodyRate) -> None:
        self.rate = rate
        self.at = time.monotonic()

    def next(self, ahead: float) -> int:
        self.at = max(self.at + SWEEP_SECONDS, time.monotonic() + ahead)
        return self.rate.end_slow(self.at)


async def test_a_body_behind_the_rate_after_its_grace_is_a_408_at_the_second_sweep() -> None:
    rate, client = BodyRate(RATE, GRACE, IDLE), Client()
    reader = asyncio.create_task(read_body(watched(rate, client)))
    client.send_chunk(b"x" * 10)
    await settled()
    sweeps = Sweeps(rate)
    assert sweeps.next(GRACE - 1) == 0  # still in its grace period
    assert sweeps.next(GRACE + 1) == 0  # behind: 10 bytes in 6 s, found once
    assert sweeps.next(GRACE + 1) == 1  # and again
    with pytest.raises(HTTPException) as refused:
        await reader
    assert refused.value.status_code == 408
    assert refused.value.detail == "the body arrived too slowly: slower than 100 bytes a second"


async def test_a_body_paused_longer_than_the_idle_limit_is_a_408() -> None:
    rate, client = BodyRate(0, GRACE, IDLE), Client()
    reader = asyncio.create_task(read_body(watched(rate, client)))
    client.send_chunk(b"x" * 100_000)  # far ahead of any rate
    await settled()
    sweeps = Sweeps(rate)
    assert sweeps.next(IDLE - 1) == 0
    assert sweeps.next(IDLE + 1) == 0
    assert sweeps.next(IDLE + 1) == 1
    with pytest.raises(HTTPException, match="too slowly: paused over 30 s"):
        await reader


async def test_a_body_keeping_the_rate_is_read_to_its_end() -> None:
    rate, client = BodyRate(RATE, GRACE, IDLE), Client()
    reader = asyncio.create_task(read_body(watched(rate, client)))
    client.send_chunk(b"x" * 1000)
    await settled()
    sweeps = Sweeps(rate)
    assert [sweeps.next(GRACE + 1), sweeps.next(GRACE + 1)] == [0, 0]  # 1000 bytes in 6 s
    client.send_chunk(b"y", more=False)
    assert await reader == b"x" * 1000 + b"y"
    assert rate.end_slow(time.monotonic() + 600) == 0


async def test_a_body_that_caught_up_after_a_stall_is_not_ended() -> None:
    # The event loop stood still (the first sweep after it runs before the loop reads what
    # arrived meanwhile): found behind once, the body then catches up and is read to its end.
    rate, client = BodyRate(RATE, GRACE, IDLE), Client()
    reader = asyncio.create_task(read_body(watched(rate, client)))
    await settled()
    sweeps = Sweeps(rate)
    assert sweeps.next(GRACE + 1) == 0
    client.send_chunk(b"x" * 1000, more=False)
    assert await reader == b"x" * 1000
    assert sweeps.next(GRACE + 2) == 0


async def test_a_late_sweep_only_notes_a_body_behind() -> None:
    rate, client = BodyRate(RATE, GRACE, IDLE), Client()
    reader = asyncio.create_task(read_body(watched(rate, client)))
    await settled()
    now = time.monotonic()
    assert rate.end_slow(now + GRACE + 1) == 0
    assert rate.end_slow(now + GRACE + 1 + 3 * SWEEP_SECONDS) == 0  # the loop stood still
    assert rate.end_slow(now + GRACE + 1 + 4 * SWEEP_SECONDS) == 1
    with pytest.raises(HTTPException):
        await reader


async def test_a_request_busy_with_its_chunk_is_never_cancelled() -> None:
    # Between reads the request works (writes a block to storage, say): a cancellation there
    # would land in that work, not in the read, so a slow body is ended at its next read.
    rate, client = BodyRate(RATE, GRACE, IDLE), Client()
    receive = watched(rate, client)
    working, done = asyncio.Event(), asyncio.Event()

    async def upload() -> None:
        while (await receive()).get("more_body"):
            working.set()
            await done.wait()

    reader = asyncio.create_task(upload())
    client.send_chunk(b"x")
    await working.wait()
    sweeps = Sweeps(rate)
    assert [sweeps.next(GRACE + 1), sweeps.next(GRACE + 1)] == [0, 0]
    done.set()
    await settled()
    assert [sweeps.next(GRACE + 1), sweeps.next(GRACE + 1)] == [0, 1]  # waiting now
    with pytest.raises(HTTPException):
        await reader


async def test_only_the_time_spent_waiting_for_the_body_counts() -> None:
    # While the request works on a chunk the client cannot send (uvicorn stops reading).
    rate, client = BodyRate(RATE, GRACE, IDLE), Client()
    receive = watched(rate, client)
    working, done = asyncio.Event(), asyncio.Event()

    async def upload() -> bytes:
        body = b""
        while True:
            message = await receive()
            body += bytes(message.get("body", b""))
            if not message.get("more_body"):
                return body
            working.set()
            await done.wait()  # a block written for minutes

    reader = asyncio.create_task(upload())
    client.send_chunk(b"x" * 1000)
    await working.wait()
    sweeps = Sweeps(rate)
    assert [sweeps.next(IDLE * 10), sweeps.next(IDLE * 10)] == [0, 0]  # busy, not waiting
    done.set()
    await settled()  # waiting again: 1000 bytes in the few seconds spent waiting
    sweeps = Sweeps(rate)
    assert [sweeps.next(GRACE + 1), sweeps.next(GRACE + 1)] == [0, 0]
    client.send_chunk(b"y", more=False)
    assert await reader == b"x" * 1000 + b"y"


async def test_the_cancellation_lands_in_the_task_that_waits() -> None:
    # Behind middleware, a later read may run in another task than the first.
    rate, client = BodyRate(RATE, GRACE, IDLE), Client()
    receive = watched(rate, client)
    client.send_chunk(b"x")
    await asyncio.create_task(one(receive))
    second = asyncio.create_task(one(receive))
    await settled()
    sweeps = Sweeps(rate)
    assert [sweeps.next(GRACE + 1), sweeps.next(GRACE + 1)] == [0, 1]
    with pytest.raises(HTTPException):
        await second


async def test_a_read_after_the_response_started_is_never_ended() -> None:
    # A streaming response waits for the client's disconnect with `receive`, mid-response.
    rate, client = BodyRate(RATE, GRACE, IDLE), Client()
    receive, send = rate.exchange(WITH_BODY, client.receive, client.send)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    listener = asyncio.create_task(one(receive))
    await settled()
    sweeps = Sweeps(rate)
    assert [sweeps.next(IDLE * 10), sweeps.next(IDLE * 10)] == [0, 0]
    client.chunks.put_nowait({"type": "http.disconnect"})
    assert (await listener)["type"] == "http.disconnect"


async def test_a_chunk_arriving_as_the_sweep_ends_the_body_is_still_a_408() -> None:
    rate, client = BodyRate(RATE, GRACE, IDLE), Client()
    reader = asyncio.create_task(read_body(watched(rate, client)))
    await settled()
    sweeps = Sweeps(rate)
    sweeps.next(GRACE + 1)
    client.send_chunk(b"x")  # the read's result is ready, the reader not yet resumed
    assert sweeps.next(GRACE + 1) == 1
    with pytest.raises(HTTPException):
        await reader


async def test_a_cancellation_from_elsewhere_stays_a_cancellation() -> None:
    rate, client = BodyRate(RATE, GRACE, IDLE), Client()
    reader = asyncio.create_task(read_body(watched(rate, client)))
    await settled()
    reader.cancel()  # shutdown, say
    with pytest.raises(asyncio.CancelledError):
        await reader
    assert rate.end_slow(time.monotonic() + 600) == 0


async def test_a_body_also_cancelled_elsewhere_is_cancelled_not_answered() -> None:
    rate, client = BodyRate(RATE, GRACE, IDLE), Client()
    reader = asyncio.create_task(read_body(watched(rate, client)))
    await settled()
    sweeps = Sweeps(rate)
    sweeps.next(GRACE + 1)
    assert sweeps.next(GRACE + 1) == 1
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader


@pytest.mark.parametrize(
    "headers",
    [WITH_BODY, scope((b"transfer-encoding", b"chunked"))],
    ids=["content-length", "chunked"],
)
async def test_a_request_answered_before_its_body_was_read_closes_its_connection(
    headers: dict[str, object],
) -> None:
    rate, client = BodyRate(RATE, GRACE, IDLE), Client()
    _, send = rate.exchange(headers, client.receive, client.send)
    await send({"type": "http.response.start", "status": 404, "headers": [(b"a", b"b")]})
    assert client.answer_headers() == [(b"a", b"b"), (b"connection", b"close")]


@pytest.mark.parametrize(
    "headers",
    [scope((b"host", b"x")), scope((b"content-length", b"0"))],
    ids=["no-body", "empty-body"],
)
async def test_a_request_without_a_body_keeps_its_connection(headers: dict[str, object]) -> None:
    rate, client = BodyRate(RATE, GRACE, IDLE), Client()
    _, send = rate.exchange(headers, client.receive, client.send)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    assert client.answer_headers() == []


async def test_a_request_whose_body_was_read_keeps_its_connection() -> None:
    rate, client = BodyRate(RATE, GRACE, IDLE), Client()
    receive, send = rate.exchange(WITH_BODY, client.receive, client.send)
    client.send_chunk(b"x" * 1000, more=False)
    assert await read_body(receive) == b"x" * 1000
    await send({"type": "http.response.start", "status": 202, "headers": []})
    assert client.answer_headers() == []
    assert rate.end_slow(time.monotonic() + 600) == 0


async def test_a_request_that_stopped_reading_is_forgotten_by_the_next_sweep() -> None:
    rate, client = BodyRate(RATE, GRACE, IDLE), Client()
    receive = watched(rate, client)
    client.send_chunk(b"x")

    async def one_chunk() -> None:
        await receive()  # then the request ends (a 413, say), the body left unread

    await asyncio.create_task(one_chunk())
    rate.end_slow(time.monotonic())
    assert rate._reading == set()


async def test_no_limits_watch_nothing_but_still_close_unread_bodies() -> None:
    rate, client = BodyRate(0, GRACE, 0), Client()
    receive, send = rate.exchange(WITH_BODY, client.receive, client.send)
    client.send_chunk(b"x")
    await receive()
    assert rate._reading == set()
    await send({"type": "http.response.start", "status": 413, "headers": []})
    assert client.answer_headers() == [(b"connection", b"close")]


def test_receive_and_send_have_the_asgi_types() -> None:
    rate, client = BodyRate(RATE, GRACE, IDLE), Client()
    receive, send = rate.exchange(WITH_BODY, client.receive, client.send)
    typed: tuple[Receive, Send] = (receive, send)
    assert all(callable(c) for c in typed)
