"""The notifier as a real process on a real broker, delivering webhooks to a real local server.

Events are published straight to the namespace's events exchange (no gateway needed); the
receiver runs in the test process on 127.0.0.1, which the notifier allow-lists.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from contracts.envelope import Envelope
from contracts.events import (
    DatasetProcessed,
    DatasetProcessedData,
    FieldSummary,
    NotificationRequested,
    NotificationRequestedData,
)
from contracts.files import FileAnalysis, FileProcessed, FileProcessedData
from contracts.notify import NotifyTarget
from contracts.topology import ServiceTopology
from services.messaging import failure as f
from services.messaging.inbox import Inbox
from services.messaging.publisher import Publisher
from services.messaging.store import open_store
from services.notifier.channels import Notification
from services.notifier.deliveries import Deliveries, Delivery
from services.notifier.handlers import target_event_id
from tests.conftest import Namespace
from tests.support.polling import eventually
from tests.support.processes import ServiceProcess, consumer
from tests.support.queues import assert_empty, take
from tests.support.smtp_server import SmtpServer
from tests.support.webhook_receiver import Reply, WebhookReceiver

pytestmark = pytest.mark.broker

SECRET = "integration-webhook-secret-0123456789"
DELAYS = "1,2"


@dataclass
class Running:
    process: ServiceProcess
    publisher: Publisher
    topology: ServiceTopology
    deliveries: Deliveries
    inbox: Inbox

    async def publish(self, event: Envelope) -> None:
        await self.publisher.publish_event(event, exchange=self.topology.events_exchange)

    async def delivery(self, event_id: str) -> Delivery:
        found = await self.deliveries.get(event_id)
        assert found is not None, "no delivery recorded yet"
        return found


@asynccontextmanager
async def notifier(
    namespace: Namespace,
    workdir: Path,
    before_start: Any = None,
    extra_env: Mapping[str, str] | None = None,
) -> AsyncIterator[Running]:
    env = namespace.env(
        COURIER_RETRY_DELAYS=DELAYS,
        COURIER_IMMEDIATE_RETRIES="0",
        COURIER_WEBHOOK_SECRET=SECRET,
        COURIER_WEBHOOK_ALLOWED_HOSTS="127.0.0.1",
        COURIER_NOTIFY_LOG=str(workdir / "notifications.jsonl"),
        **(extra_env or {}),
    )
    process = consumer("notifier", env, workdir)
    store = workdir / "notifier-data"
    store.mkdir(parents=True, exist_ok=True)
    engine = open_store(f"sqlite+aiosqlite:///{store}/notifier.sqlite3")
    publisher = Publisher(namespace.amqp_url)
    try:
        deliveries = Deliveries(engine)
        await deliveries.start()
        inbox = Inbox(engine, "notifier")
        if before_start is not None:
            await before_start(deliveries)
        process.start()
        await asyncio.to_thread(process.wait_ready)
        await publisher.connect()
        topology = namespace.settings(retry_delays=DELAYS).topology("notifier")
        yield Running(process, publisher, topology, deliveries, inbox)
        assert process.terminate() == 0, process.log()
    finally:
        process.kill()
        await publisher.close()
        await engine.dispose()


def webhook(url: str) -> NotificationRequested:
    return NotificationRequested(
        data=NotificationRequestedData(channel="webhook", recipient=url, subject="Deployed")
    )


async def assert_settled(namespace: Namespace, topology: ServiceTopology) -> None:
    queues = [topology.queue, topology.dead_letter_queue]
    queues += [topology.retry_queue(d) for d in topology.retry_delays]
    await assert_empty(namespace.amqp_url, queues)


async def test_a_receiver_that_fails_twice_gets_the_webhook_once_after_retries(
    namespace: Namespace, tmp_path: Path
) -> None:
    with WebhookReceiver([Reply(503), Reply(503)]).running() as receiver:
        async with notifier(namespace, tmp_path) as running:
            event = webhook(receiver.url())
            await running.publish(event)

            async def delivered() -> Delivery:
                record = await running.delivery(event.id)
                assert record.outcome == "delivered", record
                return record

            record = await eventually(delivered, timeout=20)
            assert record.attempts == 3
            await assert_settled(namespace, running.topology)
        requests = receiver.received
    assert len(requests) == 3  # 503, 503 (each retried through a delay queue), then 200
    assert {r.headers["idempotency-key"] for r in requests} == {event.id}
    assert requests[1].at - requests[0].at >= 1.0
    assert requests[2].at - requests[1].at >= 2.0


async def test_a_receiver_that_refuses_dead_letters_the_notification_as_permanent(
    namespace: Namespace, tmp_path: Path
) -> None:
    reply = Reply(400, {"Content-Type": "application/json"}, b'{"error": "unknown hook"}')
    with WebhookReceiver(default=reply).running() as receiver:
        async with notifier(namespace, tmp_path) as running:
            event = webhook(receiver.url())
            await running.publish(event)
            [dead] = await take(namespace.amqp_url, running.topology.dead_letter_queue, 1)
            record = await running.delivery(event.id)
        assert len(receiver.received) == 1
    headers: dict[str, Any] = dict(dead.headers)
    assert headers[f.REASON] == "permanent"
    assert headers[f.EVENT_ID] == event.id
    assert headers[f.EXCEPTION_TYPE] == "services.notifier.webhook.WebhookRejected"
    assert headers[f.EXCEPTION_MESSAGE] == 'webhook answered 400: {"error": "unknown hook"}'
    assert (record.outcome, record.attempts) == ("rejected", 1)
    assert record.last_error is not None and "400" in record.last_error


async def test_retry_after_makes_the_retry_wait_at_least_that_long(
    namespace: Namespace, tmp_path: Path
) -> None:
    with WebhookReceiver([Reply(429, {"Retry-After": "2"})]).running() as receiver:
        async with notifier(namespace, tmp_path) as running:
            event = webhook(receiver.url())
            await running.publish(event)

            async def delivered() -> None:
                assert (await running.delivery(event.id)).outcome == "delivered"

            await eventually(delivered, timeout=20)
        first, second = receiver.received
    # The first tier is 1 s; Retry-After: 2 moves the retry to the 2 s tier.
    assert second.at - first.at >= 2.0


async def test_a_notification_delivered_before_a_crash_is_not_sent_again(
    namespace: Namespace, tmp_path: Path
) -> None:
    """An earlier run delivered (2xx, recorded) and died before its inbox commit."""
    with WebhookReceiver().running() as receiver:
        event = webhook(receiver.url())
        earlier = Notification(
            event_id=event.id,
            correlation_id=event.correlation(),
            channel="webhook",
            recipient=event.data.recipient,
            subject=event.data.subject,
            body=event.data.body,
            event=event,
        )

        async def delivered_earlier(deliveries: Deliveries) -> None:
            await deliveries.delivered(earlier)

        async with notifier(namespace, tmp_path, before_start=delivered_earlier) as running:
            await running.publish(event)

            async def handled() -> None:
                assert await running.inbox.lookup(event.id) is not None

            await eventually(handled, timeout=15)
            await assert_settled(namespace, running.topology)
            record = await running.delivery(event.id)
        assert receiver.received == []
    assert (record.outcome, record.attempts) == ("delivered", 1)
    assert "already delivered; not sending again" in running.process.log()


def smtp_env(smtp: SmtpServer) -> dict[str, str]:
    return {
        "COURIER_SMTP_HOST": smtp.host,
        "COURIER_SMTP_PORT": str(smtp.port),
        "COURIER_SMTP_STARTTLS": "false",
        "COURIER_SMTP_FROM": "Courier <courier@example.com>",
    }


async def test_an_smtp_server_without_required_starttls_dead_letters_the_email_at_once(
    namespace: Namespace, tmp_path: Path
) -> None:
    """A configuration problem, not a passing one: not retried through the delay tiers."""
    with SmtpServer().running() as smtp:
        env = smtp_env(smtp)
        del env["COURIER_SMTP_STARTTLS"]  # required, the default
        async with notifier(namespace, tmp_path, extra_env=env) as running:
            event = NotificationRequested(
                data=NotificationRequestedData(
                    channel="email", recipient="ops@example.com", subject="Deployed"
                )
            )
            await running.publish(event)
            [dead] = await take(namespace.amqp_url, running.topology.dead_letter_queue, 1)
        assert smtp.messages == []
    headers: dict[str, Any] = dict(dead.headers)
    assert (headers[f.REASON], headers[f.ATTEMPT]) == ("permanent", 1)
    assert "COURIER_SMTP_STARTTLS" in headers[f.EXCEPTION_MESSAGE]


def file_processed(*targets: NotifyTarget) -> FileProcessed:
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


async def test_a_file_notification_retried_for_its_email_does_not_repeat_its_webhook(
    namespace: Namespace, tmp_path: Path
) -> None:
    """Webhook accepted, email deferred (451): the event goes through a delay tier and comes
    back; only the email is sent again."""
    with (
        WebhookReceiver().running() as receiver,
        SmtpServer(rcpt_replies=["451 4.3.0 try again later"]).running() as smtp,
    ):
        async with notifier(namespace, tmp_path, extra_env=smtp_env(smtp)) as running:
            hook = NotifyTarget(channel="webhook", recipient=receiver.url("/files"))
            mail = NotifyTarget(channel="email", recipient="ops@example.com")
            event = file_processed(hook, mail)
            await running.publish(event)

            async def mailed() -> Delivery:
                record = await running.delivery(target_event_id(event.id, mail))
                assert record.outcome == "delivered", record
                return record

            mail_record = await eventually(mailed, timeout=20)
            hook_record = await running.delivery(target_event_id(event.id, hook))
            await assert_settled(namespace, running.topology)
        assert len(receiver.received) == 1
        assert len(smtp.messages) == 1
    assert (hook_record.outcome, hook_record.attempts) == ("delivered", 1)
    assert (mail_record.outcome, mail_record.attempts) == ("delivered", 2)


async def test_a_processed_file_without_targets_is_acked_without_effect(
    namespace: Namespace, tmp_path: Path
) -> None:
    async with notifier(namespace, tmp_path) as running:
        event = file_processed()
        await running.publish(event)

        async def handled() -> None:
            assert await running.inbox.lookup(event.id) is not None

        await eventually(handled, timeout=15)
        await assert_settled(namespace, running.topology)
    assert not (tmp_path / "notifications.jsonl").exists()


def dataset_processed(notify: str | None) -> DatasetProcessed:
    return DatasetProcessed(
        data=DatasetProcessedData(
            dataset_id="ds-1",
            name="prices",
            record_count=2,
            fields={"price": FieldSummary(kind="number", count=2, nulls=0, min=10.0, max=30.0)},
            notify=notify,
        )
    )


async def test_a_dataset_whose_notify_names_a_webhook_is_posted_there(
    namespace: Namespace, tmp_path: Path
) -> None:
    with WebhookReceiver().running() as receiver:
        async with notifier(namespace, tmp_path) as running:
            event = dataset_processed(f"webhook:{receiver.url('/ok/ds')}")
            await running.publish(event)

            async def delivered() -> None:
                assert (await running.delivery(event.id)).outcome == "delivered"

            await eventually(delivered, timeout=15)
        [request] = receiver.received
    assert request.path == "/ok/ds"
    assert request.headers["idempotency-key"] == event.id
    body = orjson.loads(request.body)
    assert body["type"] == "dataset.processed" and body["data"]["dataset_id"] == "ds-1"
    assert "notify" not in body["data"]  # who was to be told is not the receiver's business
    assert not (tmp_path / "notifications.jsonl").exists()


async def test_a_dataset_whose_notify_names_an_email_address_is_mailed_there(
    namespace: Namespace, tmp_path: Path
) -> None:
    with SmtpServer().running() as smtp:
        async with notifier(namespace, tmp_path, extra_env=smtp_env(smtp)) as running:
            event = dataset_processed("email:a@b.example")
            await running.publish(event)

            async def delivered() -> None:
                assert (await running.delivery(event.id)).outcome == "delivered"

            await eventually(delivered, timeout=15)
        [message] = smtp.messages
    assert message["To"] == "a@b.example"
    assert message["Subject"] == "Dataset 'prices' processed"
    assert not (tmp_path / "notifications.jsonl").exists()
