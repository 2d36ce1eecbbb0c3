"""A real SMTP server (aiosmtpd) on a free 127.0.0.1 port, for the email channel's tests.

It runs its own event loop in a thread (aiosmtpd's `Controller`), so async tests, sync e2e tests
and service processes can all send to it. It records every message it accepted, parsed, and can
be told to answer RCPT with a given reply (`"550 5.1.1 no such user"`, `"451 4.3.0 later"`),
always (`rcpt_reply`) or for the first few recipients only (`rcpt_replies`, then `250 OK`).
"""

from __future__ import annotations

import email
import email.policy
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from email.message import EmailMessage

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from tests.support.processes import free_port


class SmtpServer:
    def __init__(self, rcpt_reply: str | None = None, rcpt_replies: Sequence[str] = ()) -> None:
        self.rcpt_reply = rcpt_reply
        self._rcpt_replies = list(rcpt_replies)
        self.host = "127.0.0.1"
        self.port = free_port()
        self._messages: list[tuple[Envelope, EmailMessage]] = []
        self._lock = threading.Lock()

    @property
    def messages(self) -> list[EmailMessage]:
        with self._lock:
            return [message for _, message in self._messages]

    @property
    def envelopes(self) -> list[Envelope]:
        with self._lock:
            return [envelope for envelope, _ in self._messages]

    # aiosmtpd handler hooks ------------------------------------------------------------------

    async def handle_RCPT(  # aiosmtpd's hook names
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if self.rcpt_reply is not None:
            return self.rcpt_reply
        with self._lock:
            scripted = self._rcpt_replies.pop(0) if self._rcpt_replies else None
        if scripted is not None:
            return scripted
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.content
        assert isinstance(content, bytes)
        message = email.message_from_bytes(content, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        with self._lock:
            self._messages.append((envelope, message))
        return "250 Message accepted for delivery"

    @contextmanager
    def running(self) -> Iterator[SmtpServer]:
        controller = Controller(self, hostname=self.host, port=self.port)
        controller.start()
        try:
            yield self
        finally:
            controller.stop()
