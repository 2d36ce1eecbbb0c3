"""`file.processed` notifications through the real channels: a local webhook receiver, a local
SMTP server and the deliveries record (SQLite). Each target is delivered once, whatever fails."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import orjson
import pytest

from contracts.files import FileAnalysis, FileProcessed, FileProcessedData
from contracts.notify import NotifyTarget
from services.messaging.failure import EXCEPTION_MESSAGE, Failure
from services.messaging.retry import RetryPolicy
from services.messaging.store import open_store
from services.notifier.channels import Channels, LogChannel
from services.notifier.deliveries import Deliveries, Delivery
from services.notifier.handlers import RefusedEarlier, file_processed, target_event_id
from services.notifier.mail import EmailChannel, EmailDeferred, SmtpConfig
from services.notifier.targets import TargetPolicy
from services.notifier.webhook import (
    WebhookChannel,
    WebhookRejected,
    WebhookSecrets,
    WebhookUnavailable,
    webhook_client,
)
from tests.support.smtp_server import SmtpServer
from tests.support.webhook_receiver import Reply, WebhookReceiver

SECRET = b"integration-webhook-secret-0123456789"
MAIL = NotifyTarget(channel="email", recipient="ops@example.com")
LATER = "451 4.3.0 try again later"


def processed(*targets: NotifyTarget) -> FileProcessed:
    return FileProcessed(
        data=FileProcessedData(
            file_id="f-1",
            name="prices.csv",
            declared_type="text/csv",
            size=35,
            sha256="0" * 64,
            analysis=FileAnalysis(detected_type="text/csv", format="csv", record_count=3),
            notify=list(targets),
        )
    )


def hook(receiver: WebhookReceiver) -> NotifyTarget:
    return NotifyTarget(channel="webhook", recipient=receiver.url("/files"))


@pytest.fixture
async def deliveries(tmp_path: Path) -> AsyncIterator[Deliveries]:
    engine = open_store(f"sqlite+aiosqlite:///{tmp_path}/notifier.sqlite3")
    record = Deliveries(engine)
    await record.start()
    yield record
    record.close()
    await engine.dispose()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    policy = TargetPolicy.from_entries(["127.0.0.1"])
    async with webhook_client(policy, timeout=5, connect_timeout=2, max_connections=2) as c:
        yield c


def channels(
    client: httpx.AsyncClient, smtp: SmtpServer, deliveries: Deliveries, log: Path
) -> Channels:
    mail = SmtpConfig(
        host=smtp.host,
        port=smtp.port,
        sender="Courier <courier@example.com>",
        starttls=False,
        timeout=5,
    )
    return Channels(
        {
            "log": LogChannel(log),
            "webhook": WebhookChannel(client, WebhookSecrets(SECRET, {}), timeout=5),
            "email": EmailChannel(mail),
        },
        deliveries,
    )


async def record(deliveries: Deliveries, event: FileProcessed, target: NotifyTarget) -> Delivery:
    found = await deliveries.get(target_event_id(event.id, target))
    assert found is not None, f"no delivery recorded for {target}"
    return found


async def test_every_target_gets_one_notification(
    client: httpx.AsyncClient, deliveries: Deliveries, tmp_path: Path
) -> None:
    log = tmp_path / "log.jsonl"
    with WebhookReceiver().running() as receiver, SmtpServer().running() as smtp:
        target = hook(receiver)
        event = processed(target, MAIL, NotifyTarget(channel="log", recipient="ops"))
        await file_processed(event, channels=channels(client, smtp, deliveries, log))
        [request] = receiver.received
        [message] = smtp.messages
    assert request.headers["idempotency-key"] == target_event_id(event.id, target)
    assert orjson.loads(request.body)["id"] == event.id  # the file.processed event itself
    assert message["Subject"] == "File 'prices.csv' processed"
    assert message["Message-ID"] == f"<{target_event_id(event.id, MAIL)}@example.com>"
    [line] = log.read_bytes().splitlines()
    assert orjson.loads(line)["recipient"] == "ops"
    for each in event.data.notify:
        assert (await record(deliveries, event, each)).outcome == "delivered"


async def test_no_targets_no_effect(
    client: httpx.AsyncClient, deliveries: Deliveries, tmp_path: Path
) -> None:
    log = tmp_path / "log.jsonl"
    with SmtpServer().running() as smtp:
        await file_processed(processed(), channels=channels(client, smtp, deliveries, log))
        assert smtp.messages == []
    assert not log.exists()


async def test_a_retried_partial_failure_does_not_send_the_webhook_twice(
    client: httpx.AsyncClient, deliveries: Deliveries, tmp_path: Path
) -> None:
    with (
        WebhookReceiver().running() as receiver,
        SmtpServer(rcpt_replies=[LATER]).running() as smtp,
    ):
        target = hook(receiver)
        event = processed(target, MAIL)
        send = channels(client, smtp, deliveries, tmp_path / "log.jsonl")
        with pytest.raises(EmailDeferred):  # transient: the consumer retries the event
            await file_processed(event, channels=send)
        assert len(receiver.received) == 1 and smtp.messages == []
        assert (await record(deliveries, event, target)).outcome == "delivered"
        assert (await record(deliveries, event, MAIL)).outcome == "failed"

        await file_processed(event, channels=send)  # the retry
        assert len(receiver.received) == 1  # not again
        assert len(smtp.messages) == 1
    webhook, mail = await record(deliveries, event, target), await record(deliveries, event, MAIL)
    assert (webhook.outcome, webhook.attempts) == ("delivered", 1)
    assert (mail.outcome, mail.attempts) == ("delivered", 2)


async def test_a_failing_target_does_not_hold_back_the_next_one(
    client: httpx.AsyncClient, deliveries: Deliveries, tmp_path: Path
) -> None:
    with (
        WebhookReceiver([Reply(503)]).running() as receiver,
        SmtpServer().running() as smtp,
    ):
        event = processed(hook(receiver), MAIL)  # the webhook comes first, and fails
        with pytest.raises(WebhookUnavailable):
            await file_processed(
                event, channels=channels(client, smtp, deliveries, tmp_path / "log.jsonl")
            )
        assert len(smtp.messages) == 1


async def test_a_transient_failure_decides_over_a_permanent_one(
    client: httpx.AsyncClient, deliveries: Deliveries, tmp_path: Path
) -> None:
    """Retrying is what the transient target needs; only all-permanent failures dead-letter."""
    with (
        WebhookReceiver(default=Reply(400, body=b"unknown hook")).running() as receiver,
        SmtpServer(rcpt_reply=LATER).running() as smtp,
    ):
        send = channels(client, smtp, deliveries, tmp_path / "log.jsonl")
        event = processed(hook(receiver), MAIL)
        with pytest.raises(EmailDeferred) as caught:
            await file_processed(event, channels=send)
        assert any("WebhookRejected" in note for note in caught.value.__notes__)

        smtp.rcpt_reply = "550 5.1.1 no such user"
        with pytest.raises(WebhookRejected) as permanent:
            await file_processed(event, channels=send)
        assert any("EmailRejected" in note for note in permanent.value.__notes__)


async def test_a_retry_does_not_ask_again_a_target_that_refused_but_still_fails(
    client: httpx.AsyncClient, deliveries: Deliveries, tmp_path: Path
) -> None:
    with (
        WebhookReceiver(default=Reply(400, body=b"unknown hook")).running() as receiver,
        SmtpServer(rcpt_replies=[LATER]).running() as smtp,
    ):
        send = channels(client, smtp, deliveries, tmp_path / "log.jsonl")
        event = processed(hook(receiver), MAIL)
        with pytest.raises(EmailDeferred):  # retried for the mail
            await file_processed(event, channels=send)
        with pytest.raises(RefusedEarlier, match="unknown hook"):  # dead-lettered, not acked
            await file_processed(event, channels=send, attempt=2)
        assert len(receiver.received) == 1  # asked once, not on the retry
        assert len(smtp.messages) == 1


async def test_a_refusal_names_a_webhook_by_its_host_never_its_secret_url(
    client: httpx.AsyncClient, deliveries: Deliveries, tmp_path: Path
) -> None:
    # The URL went into the exception: logs, the dead letter's headers, the status detail.
    with (
        WebhookReceiver(default=Reply(400, body=b"unknown hook")).running() as receiver,
        SmtpServer().running() as smtp,
    ):
        send = channels(client, smtp, deliveries, tmp_path / "log.jsonl")
        secret = NotifyTarget(channel="webhook", recipient=receiver.url("/h/tok-s3cr3t"))
        event = processed(secret)
        with pytest.raises(WebhookRejected):
            await file_processed(event, channels=send)
        with pytest.raises(RefusedEarlier) as refused:
            await file_processed(event, channels=send, attempt=2)
    assert str(refused.value).startswith("webhook to 127.0.0.1: ")
    assert "tok-s3cr3t" not in str(refused.value) and "unknown hook" in str(refused.value)


async def test_a_target_that_refused_is_not_asked_again_within_the_same_attempt(
    client: httpx.AsyncClient, deliveries: Deliveries, tmp_path: Path
) -> None:
    """The consumer retries a transient failure at once, as the same attempt, where a refusal
    is not looked up: beside a refusal, the event waits for a delayed retry instead."""
    with (
        WebhookReceiver(default=Reply(400, body=b"unknown hook")).running() as receiver,
        SmtpServer(rcpt_reply=LATER).running() as smtp,
    ):
        send = channels(client, smtp, deliveries, tmp_path / "log.jsonl")
        event = processed(hook(receiver), MAIL)
        policy = RetryPolicy(delays=(5, 30), immediate=2)
        with pytest.raises(EmailDeferred) as caught:
            await policy.call(lambda: file_processed(event, channels=send))
        assert len(receiver.received) == 1
    assert not policy.is_permanent(caught.value)
    assert policy.next_delay(1, caught.value) == 5


async def test_a_replay_asks_a_target_that_refused_again(
    client: httpx.AsyncClient, deliveries: Deliveries, tmp_path: Path
) -> None:
    with (
        WebhookReceiver([Reply(400, body=b"unknown hook")]).running() as receiver,
        SmtpServer().running() as smtp,
    ):
        send = channels(client, smtp, deliveries, tmp_path / "log.jsonl")
        event = processed(hook(receiver))
        with pytest.raises(WebhookRejected):  # dead-lettered
            await file_processed(event, channels=send)
        await file_processed(event, channels=send, attempt=1)  # replayed once the hook exists
        assert len(receiver.received) == 2
    assert (await record(deliveries, event, hook(receiver))).outcome == "delivered"


async def test_each_failure_says_which_target_it_was(
    client: httpx.AsyncClient, deliveries: Deliveries, tmp_path: Path
) -> None:
    # With several targets, the dead letter said "webhook answered 503", and of the other
    # failure only its text: not whose answer either was.
    with (
        WebhookReceiver([Reply(503)]).running() as receiver,
        SmtpServer(rcpt_reply="550 5.1.1 no such user").running() as smtp,
    ):
        event = processed(hook(receiver), MAIL)
        with pytest.raises(WebhookUnavailable) as caught:
            await file_processed(
                event, channels=channels(client, smtp, deliveries, tmp_path / "log.jsonl")
            )
    said = Failure.of(caught.value, 1).dead_letter_headers(
        {}, reason="permanent", service="notifier", queue="q", event_id="e", event_type="t"
    )[EXCEPTION_MESSAGE]
    assert said.startswith("webhook answered 503; target: webhook to 127.0.0.1; ")
    assert "another target failed too: EmailRejected: " in said
    assert said.endswith("; target: email:ops@example.com")
