"""Issue #6 end to end with real processes: an upload names notification targets; once the
processor analysed the file, the notifier delivers the analysis to a real webhook receiver
(signed) and a real SMTP server, both on 127.0.0.1 in the test process."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from services.notifier.signing import verify
from tests.conftest import Namespace
from tests.e2e.conftest import System
from tests.support.polling import eventually_sync
from tests.support.processes import base_url
from tests.support.smtp_server import SmtpServer
from tests.support.webhook_receiver import Received, WebhookReceiver

pytestmark = [pytest.mark.e2e, pytest.mark.broker]

SECRET = "e2e-webhook-signing-secret-0123456789abcdef"
CSV = b"sku,price,qty\na,10,1\nb,30,\nc,20,3\n"


@pytest.fixture
def receivers() -> Iterator[tuple[WebhookReceiver, SmtpServer]]:
    with WebhookReceiver().running() as webhook, SmtpServer().running() as smtp:
        yield webhook, smtp


@pytest.fixture
def notifying_system(
    namespace: Namespace, tmp_path: Path, receivers: tuple[WebhookReceiver, SmtpServer]
) -> Iterator[System]:
    _, smtp = receivers
    env = {
        "COURIER_WEBHOOK_SECRET": SECRET,
        "COURIER_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1",
        "COURIER_SMTP_HOST": smtp.host,
        "COURIER_SMTP_PORT": str(smtp.port),
        "COURIER_SMTP_STARTTLS": "false",  # the test server speaks plain SMTP on loopback
        "COURIER_SMTP_FROM": "Courier <courier@example.com>",
    }
    running = System(namespace, tmp_path, env).start()
    try:
        yield running
    finally:
        running.stop()


def test_a_processed_upload_is_announced_by_webhook_and_email(
    notifying_system: System, receivers: tuple[WebhookReceiver, SmtpServer]
) -> None:
    system, (webhook, smtp) = notifying_system, receivers
    gateway = base_url(system.gateway)
    response = httpx.post(
        f"{gateway}/v1/files",
        files={"file": ("prices.csv", CSV, "text/csv")},
        data={"notify": [f"webhook:{webhook.url('/hooks/files')}", "email:ops@example.com"]},
        headers={"x-correlation-id": "upload-42"},
        timeout=10,
    )
    assert response.status_code == 202, response.text
    file_id = response.json()["id"]

    def hooked() -> Received:
        requests = webhook.received
        assert len(requests) == 1, requests
        return requests[0]

    request = eventually_sync(hooked, timeout=40)
    assert request.path == "/hooks/files"
    assert verify(
        request.headers["courier-signature"], request.body, SECRET.encode(), now=time.time()
    )
    event: dict[str, Any] = orjson.loads(request.body)
    assert (event["type"], event["correlationid"]) == ("file.processed", "upload-42")
    assert event["data"]["file_id"] == file_id
    assert (event["data"]["analysis"]["record_count"], event["data"]["analysis"]["format"]) == (
        3,
        "csv",
    )
    assert request.headers["idempotency-key"] != event["id"]  # one key per target
    assert "notify" not in event["data"]  # receivers do not see each other

    def mailed() -> None:
        assert len(smtp.messages) == 1

    eventually_sync(mailed, timeout=20)
    [message] = smtp.messages
    assert message["Subject"] == "File 'prices.csv' processed"
    assert message["To"] == "ops@example.com"
    plain = message.get_body(preferencelist=("plain",))
    assert plain is not None and "3 records" in plain.get_content()

    found = httpx.get(f"{gateway}/v1/files/{file_id}", timeout=5).json()
    assert found["status"] == "succeeded"
    assert found["analysis"]["record_count"] == 3

    # The notifier's own status of the derived event reaches the gateway's tracking too.
    def notified() -> None:
        response = httpx.get(f"{gateway}/v1/events/{event['id']}", timeout=5)
        assert response.status_code == 200, response.text  # 404 until the first report
        status = response.json()
        assert status["services"]["notifier"]["state"] == "succeeded", status

    eventually_sync(notified, timeout=20)

    assert [service.terminate() for service in system.all] == [0, 0, 0], system.notifier.log()
    assert len(webhook.received) == 1 and len(smtp.messages) == 1  # once each
