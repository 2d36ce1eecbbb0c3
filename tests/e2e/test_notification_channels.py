"""End to end with real processes: POST /v1/events → gateway → broker → notifier → a real
webhook receiver and a real SMTP server, both on 127.0.0.1 in the test process."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from services.notifier.signing import verify
from tests.conftest import Namespace
from tests.support.polling import eventually_sync
from tests.support.processes import ServiceProcess, base_url, consumer, gateway
from tests.support.smtp_server import SmtpServer
from tests.support.webhook_receiver import Received, WebhookReceiver

pytestmark = [pytest.mark.e2e, pytest.mark.broker]

SECRET = "e2e-webhook-signing-secret-0123456789abcdef"


@pytest.fixture
def receivers() -> Iterator[tuple[WebhookReceiver, SmtpServer]]:
    with WebhookReceiver().running() as webhook, SmtpServer().running() as smtp:
        yield webhook, smtp


@pytest.fixture
def services(
    namespace: Namespace, tmp_path: Path, receivers: tuple[WebhookReceiver, SmtpServer]
) -> Iterator[tuple[ServiceProcess, ServiceProcess]]:
    _, smtp = receivers
    env = namespace.env(
        COURIER_NOTIFY_LOG=str(tmp_path / "notifications.jsonl"),
        COURIER_WEBHOOK_SECRET=SECRET,
        COURIER_WEBHOOK_ALLOWED_HOSTS="127.0.0.1",
        COURIER_SMTP_HOST=smtp.host,
        COURIER_SMTP_PORT=str(smtp.port),
        COURIER_SMTP_STARTTLS="false",  # the test server speaks plain SMTP on loopback
        COURIER_SMTP_FROM="Courier <courier@example.com>",
    )
    running = (gateway(env, tmp_path), consumer("notifier", env, tmp_path))
    try:
        for service in running:
            service.start()
        for service in running:
            service.wait_ready()
        yield running
    finally:
        for service in running:
            service.kill()


def post(gateway_process: ServiceProcess, data: dict[str, str]) -> str:
    response = httpx.post(
        f"{base_url(gateway_process)}/v1/events",
        json={"type": "notification.requested", "data": data},
        headers={"x-correlation-id": "release-7"},
        timeout=10,
    )
    assert response.status_code == 202, response.text
    event_id: str = response.json()["id"]
    return event_id


def test_webhook_and_email_notifications_reach_their_receivers(
    services: tuple[ServiceProcess, ServiceProcess],
    receivers: tuple[WebhookReceiver, SmtpServer],
) -> None:
    gateway_process, notifier_process = services
    webhook, smtp = receivers
    hook_id = post(
        gateway_process,
        {"channel": "webhook", "recipient": webhook.url("/hooks/deploys"), "subject": "Deployed"},
    )
    mail_id = post(
        gateway_process,
        {
            "channel": "email",
            "recipient": "ops@example.org",
            "subject": "Deployed",
            "body": "v2 is <live> & well",
        },
    )

    def hooked() -> Received:
        requests = webhook.received
        assert len(requests) == 1, requests
        return requests[0]

    request = eventually_sync(hooked, timeout=20)
    assert request.path == "/hooks/deploys"
    assert request.headers["idempotency-key"] == hook_id
    assert verify(
        request.headers["courier-signature"], request.body, SECRET.encode(), now=time.time()
    )
    event = orjson.loads(request.body)
    assert (event["id"], event["correlationid"]) == (hook_id, "release-7")
    assert event["data"]["subject"] == "Deployed"

    def mailed() -> None:
        assert len(smtp.messages) == 1

    eventually_sync(mailed, timeout=20)
    [message] = smtp.messages
    assert message["Message-ID"] == f"<{mail_id}@example.com>"
    assert message["To"] == "ops@example.org"
    html_part = message.get_body(preferencelist=("html",))
    assert html_part is not None and "v2 is &lt;live&gt; &amp; well" in html_part.get_content()

    assert [service.terminate() for service in services] == [0, 0], notifier_process.log()
    assert len(webhook.received) == 1 and len(smtp.messages) == 1  # once each
