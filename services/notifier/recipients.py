"""Whether a channel could ever deliver to a recipient: the notifier's own syntactic checks,
which the gateway runs too, to refuse at ingest what would only be dead-lettered later."""

from __future__ import annotations

from contracts.notify import Channel
from services.messaging.errors import PermanentError
from services.notifier.mail import parse_address
from services.notifier.targets import check_url


def recipient_problem(channel: Channel, recipient: str) -> str | None:
    """Why the notifier would refuse `recipient` on `channel` for good (`check_url` for a
    webhook, `parse_address` for an email), or None. Whether a webhook host resolves to an
    allowed address is decided when it connects."""
    try:
        if channel == "webhook":
            check_url(recipient)
        elif channel == "email":
            parse_address(recipient, "recipient")
    except PermanentError as exc:
        return str(exc)
    return None
