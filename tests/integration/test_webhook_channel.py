"""The webhook channel against a real HTTP server on 127.0.0.1 (no broker needed)."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import logging
import re
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import httpx
import orjson
import pytest

from contracts.events import NotificationRequested, NotificationRequestedData
from services.messaging.errors import PermanentError
from services.messaging.logs import configure_logging
from services.notifier.breaker import TIMEOUTS_TO_OPEN, ReceiverCoolingDown
from services.notifier.channels import Notification
from services.notifier.signing import verify
from services.notifier.targets import TargetPolicy, TargetRefused
from services.notifier.webhook import (
    WebhookChannel,
    WebhookRejected,
    WebhookSecrets,
    WebhookUnavailable,
    webhook_client,
)
from tests.support.polling import eventually
from tests.support.processes import free_port
from tests.support.webhook_receiver import Reply, WebhookReceiver

SECRET = b"integration-webhook-secret-0123456789"
LOCAL = TargetPolicy.from_entries(["127.0.0.1"])


def notification(
    url: str,
    subject: str = "Deployed",
    event_id: str | None = None,
    callback_url: str | None = None,
) -> Notification:
    event = NotificationRequested(
        data=NotificationRequestedData(channel="webhook", recipient=url, subject=subject, body="v2")
    )
    if event_id is not None:
        event = event.model_copy(update={"id": event_id})
    if callback_url is not None:
        event = event.model_copy(update={"callbackurl": callback_url})
    return Notification(
        event_id=event.id,
        correlation_id=event.correlation(),
        channel="webhook",
        recipient=url,
        subject=subject,
        body="v2",
        event=event,
    )


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver().running() as running:
        yield running


async def channel_with(
    policy: TargetPolicy = LOCAL, secrets: WebhookSecrets | None = None, timeout: float = 5.0
) -> AsyncIterator[WebhookChannel]:
    async with webhook_client(
        policy, timeout=timeout, connect_timeout=2.0, max_connections=4
    ) as client:
        yield WebhookChannel(client, secrets or WebhookSecrets(SECRET, {}), timeout=timeout)


@pytest.fixture
async def channel() -> AsyncIterator[WebhookChannel]:
    async for c in channel_with():
        yield c


async def test_the_event_is_posted_as_signed_json_with_the_event_id_as_idempotency_key(
    channel: WebhookChannel, receiver: WebhookReceiver
) -> None:
    n = notification(receiver.url("/in?team=ops"))
    await channel.deliver(n)
    [request] = receiver.received
    assert (request.method, request.path) == ("POST", "/in?team=ops")
    assert request.headers["content-type"] == "application/json"
    assert request.headers["idempotency-key"] == n.event_id
    assert request.headers["user-agent"].startswith("Courier-Webhook/")
    assert verify(request.headers["courier-signature"], request.body, SECRET, now=time.time())
    assert not verify(request.headers["courier-signature"], request.body, b"other", now=time.time())
    body = orjson.loads(request.body)
    assert body["id"] == n.event_id and body["type"] == "notification.requested"
    assert body["data"] == {
        "channel": "webhook",
        "recipient": n.recipient,
        "subject": "Deployed",
        "body": "v2",
    }


async def test_the_submitters_callback_url_is_left_out_of_the_signed_body(
    channel: WebhookChannel, receiver: WebhookReceiver
) -> None:
    """The receiver is not the submitter: the callback URL (and its token) is not its to see."""
    n = notification(receiver.url(), callback_url="https://shop.example/hooks?token=s3cret")
    await channel.deliver(n)
    [request] = receiver.received
    assert b"s3cret" not in request.body
    assert "callbackurl" not in orjson.loads(request.body)
    assert verify(request.headers["courier-signature"], request.body, SECRET, now=time.time())


async def test_an_id_a_header_cannot_carry_is_sent_as_its_hash(
    channel: WebhookChannel, receiver: WebhookReceiver
) -> None:
    # httpx refuses non-ASCII header values: such an id was never sent, and retried as transient.
    n = notification(receiver.url(), event_id="commande-été-42")
    await channel.deliver(n)
    await channel.deliver(n)  # a retry carries the same key
    keys = [request.headers["idempotency-key"] for request in receiver.received]
    assert keys == [hashlib.sha256("commande-été-42".encode()).hexdigest()] * 2


async def test_connections_are_pooled(channel: WebhookChannel, receiver: WebhookReceiver) -> None:
    for _ in range(3):
        await channel.deliver(notification(receiver.url()))
    assert len(receiver.received) == 3
    assert len({request.peer for request in receiver.received}) == 1  # one kept-alive connection


async def test_a_per_host_secret_overrides_the_default(receiver: WebhookReceiver) -> None:
    per_host = b"per-host-secret-for-127.0.0.1-abcdef"
    async for channel in channel_with(secrets=WebhookSecrets(SECRET, {"127.0.0.1": per_host})):
        await channel.deliver(notification(receiver.url()))
    [request] = receiver.received
    assert verify(request.headers["courier-signature"], request.body, per_host, now=time.time())


async def test_a_host_without_a_secret_is_refused(receiver: WebhookReceiver) -> None:
    secrets = WebhookSecrets(None, {"hooks.example.org": SECRET})
    async for channel in channel_with(secrets=secrets):
        with pytest.raises(TargetRefused, match="no webhook signing secret"):
            await channel.deliver(notification(receiver.url()))
    assert receiver.received == []


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "localhost",
        "[::1]",
        "127.0.0.2",
        "0x7f000001",
        "2130706433",
        "127.1",
        "[::ffff:127.0.0.1]",
        "0.0.0.0",
    ],
)
async def test_webhook_refuses_private_targets_through_the_client(
    receiver: WebhookReceiver, host: str
) -> None:
    """No allow-list: the guarded client refuses loopback, also behind a name."""
    async for channel in channel_with(policy=TargetPolicy()):
        with pytest.raises(TargetRefused, match="non-public") as caught:
            await channel.deliver(notification(f"http://{host}:{receiver.port}/hook"))
    assert isinstance(caught.value, PermanentError)
    assert receiver.received == []


@pytest.mark.parametrize(
    "url", ["ftp://127.0.0.1/x", "http://user:pw@127.0.0.1/x", "ops@example.org"]
)
async def test_bad_urls_are_refused_before_connecting(channel: WebhookChannel, url: str) -> None:
    with pytest.raises(TargetRefused):
        await channel.deliver(notification(url))


async def test_a_refused_connection_is_transient(channel: WebhookChannel) -> None:
    with pytest.raises(httpx.ConnectError) as caught:
        await channel.deliver(notification(f"http://127.0.0.1:{free_port()}/hook"))
    assert not isinstance(caught.value, PermanentError)


async def test_a_refused_connection_names_the_host_it_tried(channel: WebhookChannel) -> None:
    # "All connection attempts failed" alone, in a dead letter or a status detail, did not say
    # which receiver was down.
    port = free_port()
    with pytest.raises(httpx.ConnectError, match=rf"^127\.0\.0\.1:{port}: "):
        await channel.deliver(notification(f"http://127.0.0.1:{port}/hook"))


async def test_a_slow_receiver_times_out_as_transient() -> None:
    import socket

    with socket.socket() as silent:  # accepts connections (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/hook"
        async for channel in channel_with(timeout=0.5):
            started = time.monotonic()
            with pytest.raises((httpx.TimeoutException, TimeoutError)):
                await channel.deliver(notification(url))
            assert time.monotonic() - started < 3


async def test_a_receiver_that_drips_its_answer_times_out_saying_so() -> None:
    # Each read gets a byte in time; the whole exchange's bound ends it. Its TimeoutError said
    # nothing, and a dead letter then read "builtins.TimeoutError: ".
    dripping: set[asyncio.Task[None]] = set()

    async def drip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if (task := asyncio.current_task()) is not None:
            dripping.add(task)
        try:
            await reader.read(65536)
            for byte in b"HTTP/1.1 200 OK\r\n" * 100:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.1)
        finally:
            writer.transport.abort()

    server = await asyncio.start_server(drip, "127.0.0.1", 0)
    try:
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/hook"
        async for channel in channel_with(timeout=1.0):
            with pytest.raises(TimeoutError, match=r"127\.0\.0\.1 did not answer within 1 s"):
                await channel.deliver(notification(url))
    finally:
        for task in dripping:
            task.cancel()
        await asyncio.gather(*dripping, return_exceptions=True)
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (Reply(503, {"Retry-After": "3"}, b"maintenance"), WebhookUnavailable),
        (Reply(429), WebhookUnavailable),
        (Reply(408), WebhookUnavailable),
        (Reply(400, body=b"bad payload"), WebhookRejected),
        (Reply(302, {"Location": "http://169.254.169.254/"}), WebhookRejected),
    ],
)
async def test_answers_are_classified(
    channel: WebhookChannel, reply: Reply, error: type[Exception]
) -> None:
    with WebhookReceiver([reply]).running() as receiver:
        with pytest.raises(error) as caught:
            await channel.deliver(notification(receiver.url()))
        assert len(receiver.received) == 1  # redirects are not followed
    assert f"webhook answered {reply.status}" in str(caught.value)
    if reply.status == 503:
        assert isinstance(caught.value, WebhookUnavailable) and caught.value.min_delay == 3
        assert "maintenance" in str(caught.value)


@asynccontextmanager
async def raw_receiver(answer: bytes, then: str) -> AsyncIterator[tuple[str, list[bytes]]]:
    """A receiver that reads a request, writes `answer` as it is, then stalls or resets."""
    requests: list[bytes] = []
    release = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests.append(await reader.read(65536))
        writer.write(answer)
        await writer.drain()
        if then == "reset":
            writer.transport.abort()
            return
        await release.wait()  # the rest of the body never comes
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/hook", requests
    finally:
        release.set()
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("then", ["stall", "reset"])
async def test_a_2xx_whose_body_then_stalls_or_breaks_is_delivered(then: str) -> None:
    # Counted as a failure, it was retried: the receiver, which had accepted it, got it twice.
    head = b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"ok":'
    async with raw_receiver(head, then) as (url, requests):
        async for channel in channel_with(timeout=1.0):
            await channel.deliver(notification(url))
    assert len(requests) == 1


@pytest.mark.parametrize("then", ["stall", "reset"])
async def test_a_refusal_whose_body_then_stalls_or_breaks_is_still_a_refusal(then: str) -> None:
    # It was retried through every delay tier as transient, for a 400 that cannot change.
    head = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 100\r\n\r\nunknown ho"
    async with raw_receiver(head, then) as (url, requests):
        async for channel in channel_with(timeout=1.0):
            with pytest.raises(WebhookRejected) as caught:
                await channel.deliver(notification(url))
    assert caught.value.status == 400 and "unknown ho" in str(caught.value)
    assert len(requests) == 1


async def test_a_refusal_is_not_decompressed_and_asks_for_no_compression() -> None:
    bomb = gzip.compress(b"A" * (64 << 20))  # 64 MiB inflated; ~64 KiB sent
    head = b"HTTP/1.1 500 Oops\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(bomb)
    async with raw_receiver(head + bomb, "stall") as (url, requests):
        async for channel in channel_with(timeout=2.0):
            with pytest.raises(WebhookUnavailable) as caught:
                await channel.deliver(notification(url))
    assert b"accept-encoding: identity" in requests[0].lower()
    assert "AAAA" not in str(caught.value)  # the body as sent, cut to MAX_ERROR_BODY


async def test_the_webhooks_url_stays_out_of_the_logs(
    channel: WebhookChannel, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A webhook is named by its host alone: its path and query often hold a token. httpx logs
    every request with its whole URL at INFO, the notifier's default level."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # configure_logging's, undone after
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    try:
        configure_logging("INFO", "notifier")  # its handler writes to the captured stderr
        with WebhookReceiver([Reply(200), Reply(503)]).running() as receiver:
            url = receiver.url("/in/path-t0ken?key=query-t0ken")
            await channel.deliver(notification(url))
            with pytest.raises(WebhookUnavailable):
                await channel.deliver(notification(url))
    finally:
        root.handlers[:], root.level = handlers, level
        logging.captureWarnings(False)
    logged = capsys.readouterr().err
    assert "t0ken" not in logged


# --- a receiver that does not answer ------------------------------------------------------------


class Silent:
    """A receiver on 127.0.0.1 that takes connections and requests, and answers `200` to a path
    with `/ok` in it, to the others only once `answering` is set; counts the requests that
    reached it."""

    def __init__(self) -> None:
        self.requests = 0
        self.answering = asyncio.Event()
        self._handlers: set[asyncio.Task[None]] = set()
        self.url = ""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if (task := asyncio.current_task()) is not None:
            self._handlers.add(task)
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                self.requests += 1
                length = re.search(rb"(?i)content-length: *(\d+)", head)
                await reader.readexactly(int(length[1]) if length else 0)
                if b"/ok" not in head.split(b"\r\n", 1)[0]:
                    await self.answering.wait()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.transport.abort()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Silent]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        try:
            yield self
        finally:
            for task in self._handlers:
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            server.close()
            await server.wait_closed()


async def cooling_channel(cooldown: float) -> AsyncIterator[WebhookChannel]:
    async with webhook_client(LOCAL, timeout=0.3, connect_timeout=2.0, max_connections=8) as client:
        yield WebhookChannel(client, WebhookSecrets(SECRET, {}), timeout=0.3, cooldown=cooldown)


async def times_out(channel: WebhookChannel, url: str, times: int = 1) -> None:
    """`times` deliveries to `url` at once, each timing out."""
    outcomes = await asyncio.gather(
        *(channel.deliver(notification(url)) for _ in range(times)), return_exceptions=True
    )
    assert all(isinstance(o, TimeoutError) for o in outcomes), outcomes


async def test_a_receiver_that_kept_timing_out_is_not_asked_again_while_it_cools_down(
    receiver: WebhookReceiver,
) -> None:
    # Each delivery to it held a place of the notifier's prefetch window for the whole timeout:
    # every other notification waited behind a few of them.
    async with Silent().running() as silent:
        async for channel in cooling_channel(cooldown=30):
            await times_out(channel, f"{silent.url}/hook", TIMEOUTS_TO_OPEN)
            started = time.monotonic()
            with pytest.raises(ReceiverCoolingDown) as cooling:
                await channel.deliver(notification(f"{silent.url}/hook"))
            assert time.monotonic() - started < 0.1
            assert silent.requests == TIMEOUTS_TO_OPEN
            assert 29 < cooling.value.min_delay <= 30  # retried once the cooldown is over
            assert "127.0.0.1:" in str(cooling.value)
            await channel.deliver(notification(receiver.url()))  # others are asked as ever
    assert len(receiver.received) == 1


async def test_a_receiver_that_answers_between_its_timeouts_is_not_held_back() -> None:
    # A host many receivers share: one URL of it hanging must not stop the others.
    async with Silent().running() as silent:
        async for channel in cooling_channel(cooldown=30):
            for _ in range(TIMEOUTS_TO_OPEN):
                await times_out(channel, f"{silent.url}/hang")
                await channel.deliver(notification(f"{silent.url}/ok"))
            await times_out(channel, f"{silent.url}/hang")  # asked still
    assert silent.requests == 2 * TIMEOUTS_TO_OPEN + 1


async def test_after_its_cooldown_one_delivery_tries_the_receiver_while_the_others_wait() -> None:
    async with Silent().running() as silent:
        url = f"{silent.url}/hook"
        async for channel in cooling_channel(cooldown=0.2):
            await times_out(channel, url, TIMEOUTS_TO_OPEN)
            await asyncio.sleep(0.25)
            trial = asyncio.create_task(channel.deliver(notification(url)))

            async def reached() -> None:
                assert silent.requests == TIMEOUTS_TO_OPEN + 1

            await eventually(reached, timeout=5)  # the trial is with the receiver
            with pytest.raises(ReceiverCoolingDown):
                await channel.deliver(notification(url))
            silent.answering.set()
            await trial
            await channel.deliver(notification(url))  # it answered: asked as ever
    assert silent.requests == TIMEOUTS_TO_OPEN + 2


async def test_a_trial_that_times_out_too_starts_another_cooldown() -> None:
    async with Silent().running() as silent:
        url = f"{silent.url}/hook"
        async for channel in cooling_channel(cooldown=0.2):
            await times_out(channel, url, TIMEOUTS_TO_OPEN)
            await asyncio.sleep(0.25)
            await times_out(channel, url)
            with pytest.raises(ReceiverCoolingDown):
                await channel.deliver(notification(url))
    assert silent.requests == TIMEOUTS_TO_OPEN + 1


async def test_without_a_cooldown_a_receiver_is_asked_whatever_it_did_before() -> None:
    async with Silent().running() as silent:
        async for channel in cooling_channel(cooldown=0):
            await times_out(channel, f"{silent.url}/hook", TIMEOUTS_TO_OPEN)
            await times_out(channel, f"{silent.url}/hook")
    assert silent.requests == TIMEOUTS_TO_OPEN + 1


async def test_a_refused_connection_does_not_hold_a_receiver_back(
    channel: WebhookChannel,
) -> None:
    # It fails at once: it holds no place of the window, and its retries ask it again.
    url = f"http://127.0.0.1:{free_port()}/hook"
    for _ in range(TIMEOUTS_TO_OPEN + 1):
        with pytest.raises(httpx.ConnectError):
            await channel.deliver(notification(url))
