"""The email channel's message: headers, a plain and an escaped HTML part, safe addresses."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from contracts.events import NotificationRequested, NotificationRequestedData
from services.messaging.errors import PermanentError
from services.notifier.channels import Notification
from services.notifier.mail import EmailRejected, build_message, message_id

NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


def notification(
    recipient: str = "ops@example.org", body: str = "line one\nline two"
) -> Notification:
    event = NotificationRequested(
        data=NotificationRequestedData(
            channel="email", recipient=recipient, subject="Deployed <v2>", body=body
        )
    )
    return Notification(
        event_id=event.id,
        correlation_id=event.correlation(),
        channel="email",
        recipient=recipient,
        subject=event.data.subject,
        body=body,
        event=event,
    )


def test_headers_come_from_the_settings_and_the_notification() -> None:
    n = notification()
    message = build_message(n, "Courier <courier@example.com>", NOW)
    assert message["From"] == "Courier <courier@example.com>"
    assert message["To"] == "ops@example.org"
    assert message["Subject"] == "Deployed <v2>"
    assert message["Message-ID"] == f"<{n.event_id}@example.com>"
    assert message["Date"] == "Thu, 02 Jan 2025 03:04:05 +0000"


def test_the_message_has_a_plain_and_an_escaped_html_part() -> None:
    n = notification(body="<script>alert('x')</script> & more\n\nsecond paragraph")
    message = build_message(n, "courier@example.com", NOW)
    assert message.get_content_type() == "multipart/alternative"
    plain, rich = list(message.iter_parts())
    assert plain.get_content_type() == "text/plain"
    assert plain.get_content().rstrip("\n") == n.body
    assert rich.get_content_type() == "text/html"
    html = rich.get_content()
    assert "<script>" not in html
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; more" in html
    assert "<title>Deployed &lt;v2&gt;</title>" in html
    assert html.count("<p>") == 2


def test_the_message_id_is_derived_from_the_event_id() -> None:
    event_id = str(uuid.uuid4())
    assert message_id(event_id, "example.com") == f"<{event_id}@example.com>"
    odd = message_id("id with spaces <and> brackets", "example.com")
    assert odd == message_id("id with spaces <and> brackets", "example.com")
    assert odd.startswith("<") and " " not in odd and odd.count("<") == 1


@pytest.mark.parametrize(
    "recipient",
    [
        "not-an-address",
        "ops@example.org\r\nBcc: victim@example.org",
        "a@b.org, c@d.org",
        "@x.org",
        # Refused by the email package's own checks, which raised errors of their own: retried
        # through every delay tier, and a 500 instead of a 422 at the gateway.
        "a b@example.org",
        ".a@example.org",
        "é@example.org",
        "a@example..org",
    ],
)
def test_a_recipient_that_is_not_one_plain_address_is_permanent(recipient: str) -> None:
    with pytest.raises(EmailRejected) as caught:
        build_message(notification(recipient=recipient), "courier@example.com", NOW)
    assert isinstance(caught.value, PermanentError)
