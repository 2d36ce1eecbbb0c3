"""The email channel against a real SMTP server (aiosmtpd on a free 127.0.0.1 port)."""

from __future__ import annotations

import aiosmtplib
import pytest

from contracts.events import NotificationRequested, NotificationRequestedData
from services.messaging.errors import PermanentError
from services.messaging.retry import RetryPolicy
from services.notifier.channels import Notification
from services.notifier.mail import EmailChannel, EmailDeferred, EmailRejected, SmtpConfig
from tests.support.processes import free_port
from tests.support.smtp_server import SmtpServer

SENDER = "Courier <courier@example.com>"


def notification(body: str = "Version 2 is live.\n\n<b>not bold</b> & done") -> Notification:
    event = NotificationRequested(
        data=NotificationRequestedData(
            channel="email", recipient="ops@example.org", subject="Deployed", body=body
        )
    )
    return Notification(
        event_id=event.id,
        correlation_id=event.correlation(),
        channel="email",
        recipient="ops@example.org",
        subject="Deployed",
        body=body,
        event=event,
    )


def channel(server: SmtpServer | None = None, port: int | None = None) -> EmailChannel:
    return EmailChannel(
        SmtpConfig(
            host="127.0.0.1",
            port=port or (server.port if server else free_port()),
            sender=SENDER,
            starttls=False,
            timeout=5,
        )
    )


async def test_the_email_arrives_with_its_message_id_and_both_parts() -> None:
    n = notification()
    with SmtpServer().running() as server:
        await channel(server).deliver(n)
        [message] = server.messages
        [envelope] = server.envelopes
    assert envelope.mail_from == "courier@example.com"
    assert envelope.rcpt_tos == ["ops@example.org"]
    assert message["Message-ID"] == f"<{n.event_id}@example.com>"
    assert message["From"] == SENDER and message["To"] == "ops@example.org"
    assert message["Subject"] == "Deployed"
    plain = message.get_body(preferencelist=("plain",))
    rich = message.get_body(preferencelist=("html",))
    assert plain is not None and rich is not None
    assert plain.get_content().replace("\r\n", "\n").rstrip("\n") == n.body
    assert "&lt;b&gt;not bold&lt;/b&gt; &amp; done" in rich.get_content()


async def test_a_5xx_refusal_is_permanent() -> None:
    with SmtpServer(rcpt_reply="550 5.1.1 no such mailbox").running() as server:
        with pytest.raises(EmailRejected, match="550") as caught:
            await channel(server).deliver(notification())
        assert server.messages == []
    assert isinstance(caught.value, PermanentError)


async def test_a_4xx_deferral_is_transient() -> None:
    with (
        SmtpServer(rcpt_reply="451 4.3.0 try again later").running() as server,
        pytest.raises(EmailDeferred, match="451") as caught,
    ):
        await channel(server).deliver(notification())
    assert not RetryPolicy(delays=(1,)).is_permanent(caught.value)


async def test_no_server_is_transient() -> None:
    with pytest.raises(aiosmtplib.SMTPConnectError) as caught:
        await channel(port=free_port()).deliver(notification())
    assert not RetryPolicy(delays=(1,)).is_permanent(caught.value)


async def test_required_starttls_is_never_skipped() -> None:
    """The server offers no STARTTLS: nothing is sent in clear."""
    with SmtpServer().running() as server:
        config = SmtpConfig(host="127.0.0.1", port=server.port, sender=SENDER, timeout=5)
        assert config.starttls
        with pytest.raises(EmailRejected):
            await EmailChannel(config).deliver(notification())
        assert server.messages == []


async def test_a_server_without_starttls_is_a_permanent_failure_naming_the_setting() -> None:
    """No retry makes the server offer STARTTLS: only the configuration can change."""
    with SmtpServer().running() as server:
        config = SmtpConfig(host="127.0.0.1", port=server.port, sender=SENDER, timeout=5)
        with pytest.raises(EmailRejected, match="COURIER_SMTP_STARTTLS") as caught:
            await EmailChannel(config).deliver(notification())
    assert RetryPolicy(delays=(1,)).is_permanent(caught.value)


async def test_credentials_for_a_server_that_takes_no_login_are_a_permanent_failure() -> None:
    """No retry makes the server offer AUTH: only the configuration can change."""
    with SmtpServer().running() as server:
        config = SmtpConfig(
            host="127.0.0.1",
            port=server.port,
            sender=SENDER,
            starttls=False,
            username="courier",
            password="secret",
            timeout=5,
        )
        with pytest.raises(EmailRejected, match="COURIER_SMTP_USERNAME") as caught:
            await EmailChannel(config).deliver(notification())
        assert server.messages == []
    assert RetryPolicy(delays=(1,)).is_permanent(caught.value)
