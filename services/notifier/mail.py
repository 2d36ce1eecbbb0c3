"""The email channel: one message per notification over SMTP (aiosmtplib).

The message has a plain-text part and an HTML alternative (the body, escaped), `From` from the
settings, `To` = the recipient, and a `Message-ID` derived from the event id, so a retried send
carries the same id and mail systems can recognise the duplicate.

How the server's answer is classified:

* 5xx (sender, recipient or message refused; authentication failed), a server that lacks an
  extension the message needs (SMTPUTF8), a server that does not offer STARTTLS when it is
  required (the message is never sent in clear; only a setting changes that), and one that
  takes no login while a username is set → permanent
  (`EmailRejected`): dead-lettered at once;
* 4xx (try again later), connection errors and timeouts → transient: retried.
"""

from __future__ import annotations

import hashlib
import html
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from email.errors import MessageError
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr
from typing import Final

import aiosmtplib

from services.messaging.errors import CourierError, PermanentError
from services.notifier.channels import Notification

_DOT_ATOM: Final = re.compile(
    r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*$"
)


class EmailRejected(PermanentError):
    """The SMTP server refused for good (5xx), or the message cannot be built (bad address)."""


class EmailDeferred(CourierError):
    """The SMTP server asked to try later (4xx): transient."""


@dataclass(frozen=True)
class SmtpConfig:
    host: str
    port: int
    sender: str
    username: str | None = None
    password: str | None = None
    starttls: bool = True
    """Require STARTTLS on a plain connection (port 587)."""
    tls: bool = False
    """Implicit TLS from the first byte (port 465)."""
    timeout: float = 30.0


def parse_address(value: str, what: str, *, display_name: bool = False) -> Address:
    """One plain address (`a@example.org`), or with `display_name`, `Name <a@example.org>`."""
    if "\r" in value or "\n" in value:
        raise EmailRejected(f"the {what} address contains a line break")
    name, addr = parseaddr(value)
    local, at, domain = addr.rpartition("@")
    plain = addr == value.strip()
    if not (local and at and domain) or not (plain or (display_name and name)):
        raise EmailRejected(f"{value!r} is not a valid {what} address")
    try:
        return Address(display_name=name if display_name else "", addr_spec=addr)
    except (ValueError, MessageError) as exc:  # "a b@x", ".a@x", "é@x", "a@x..y": never valid
        raise EmailRejected(f"{value!r} is not a valid {what} address: {exc}") from exc


def message_id(event_id: str, domain: str) -> str:
    """`<event-id@domain>`; an id that is not a valid left-hand side is hashed instead."""
    left = event_id if _DOT_ATOM.match(event_id) else hashlib.sha256(event_id.encode()).hexdigest()
    return f"<{left}@{domain}>"


def html_body(subject: str, body: str) -> str:
    paragraphs = "\n".join(
        f"<p>{'<br>'.join(html.escape(line) for line in block.splitlines())}</p>"
        for block in re.split(r"\n\s*\n", body.strip())
        if block.strip()
    )
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
        f"<title>{html.escape(subject)}</title></head>\n<body>\n{paragraphs}\n</body></html>\n"
    )


def build_message(notification: Notification, sender: str, now: datetime) -> EmailMessage:
    sender_address = parse_address(sender, "sender", display_name=True)
    recipient = parse_address(notification.recipient, "recipient")
    message = EmailMessage()
    message["From"] = sender_address
    message["To"] = recipient
    message["Subject"] = " ".join(notification.subject.split())  # no header folding tricks
    message["Date"] = format_datetime(now)
    message["Message-ID"] = message_id(notification.event_id, sender_address.domain)
    message.set_content(notification.body or notification.subject)
    message.add_alternative(html_body(notification.subject, notification.body), subtype="html")
    return message


def _no_starttls(config: SmtpConfig) -> EmailRejected:
    return EmailRejected(
        f"the SMTP server {config.host}:{config.port} does not offer STARTTLS, which "
        "COURIER_SMTP_STARTTLS requires (on unless COURIER_SMTP_TLS): set COURIER_SMTP_TLS=true "
        "for a server that speaks TLS from the start, or COURIER_SMTP_STARTTLS=false to send "
        "in clear (a local relay only)"
    )


def _starttls_missing(exc: aiosmtplib.SMTPException) -> bool:
    # aiosmtplib raises a bare SMTPException for it, told apart by its message only
    # (pinned by the email channel's test against a server without STARTTLS).
    return type(exc) is aiosmtplib.SMTPException and "STARTTLS extension not supported" in str(exc)


def _no_auth(config: SmtpConfig) -> EmailRejected:
    return EmailRejected(
        f"the SMTP server {config.host}:{config.port} takes no login (no AUTH extension), which "
        "COURIER_SMTP_USERNAME asks for: unset it for a relay that takes mail without one, or "
        "use the server's submission port (often with COURIER_SMTP_TLS, where AUTH is offered)"
    )


def _auth_missing(exc: aiosmtplib.SMTPException) -> bool:
    # A bare SMTPException as well, told apart by its message only.
    return type(exc) is aiosmtplib.SMTPException and "AUTH extension is not supported" in str(exc)


def _code(exc: aiosmtplib.SMTPException) -> int | None:
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        codes = [refused.code for refused in exc.recipients]
        return max(codes) if codes else None
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return exc.code
    return None


class EmailChannel:
    def __init__(self, config: SmtpConfig) -> None:
        self._config = config

    async def deliver(self, notification: Notification) -> None:
        config = self._config
        message = build_message(notification, config.sender, datetime.now(UTC))
        try:
            await aiosmtplib.send(
                message,
                sender=parse_address(config.sender, "sender", display_name=True).addr_spec,
                recipients=[notification.recipient],
                hostname=config.host,
                port=config.port,
                username=config.username,
                password=config.password,
                use_tls=config.tls,
                start_tls=config.starttls and not config.tls,
                timeout=config.timeout,
            )
        except aiosmtplib.SMTPNotSupported as exc:
            # The message needs an extension the server lacks (SMTPUTF8): retrying cannot help.
            raise EmailRejected(f"SMTP server: {exc}") from exc
        except aiosmtplib.SMTPException as exc:
            # Configuration problems: no retry changes them.
            if _starttls_missing(exc):
                raise _no_starttls(config) from exc
            if _auth_missing(exc):
                raise _no_auth(config) from exc
            code = _code(exc)
            if code is not None and 500 <= code < 600:
                raise EmailRejected(f"SMTP server refused ({code}): {exc}") from exc
            if code is not None and 400 <= code < 500:
                raise EmailDeferred(f"SMTP server deferred ({code}): {exc}") from exc
            raise  # connection lost, timeout: transient
