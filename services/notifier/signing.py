"""Webhook signatures: HMAC-SHA256 over `<timestamp>.<body>`, sent as
`Courier-Signature: t=<unix seconds>,v1=<hex digest>` (the scheme Stripe uses).

The timestamp is inside the signed text, so a receiver that rejects old timestamps also rejects
a captured request replayed later. A receiver may list several `v1=` entries (one per secret it
accepts) while it rotates secrets; `verify` accepts a header when any of them matches.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Final

SIGNATURE_HEADER: Final = "Courier-Signature"
SCHEME: Final = "v1"
DEFAULT_TOLERANCE_SECONDS: Final = 300
MAX_DIGITS: Final = 12
"""Digits of a timestamp `verify` reads (unix seconds have 10 until the year 2286)."""


def signature(secret: bytes, timestamp: int, body: bytes) -> str:
    """The hex HMAC-SHA256 of `<timestamp>.<body>` under `secret`."""
    signed = str(timestamp).encode("ascii") + b"." + body
    return hmac.new(secret, signed, hashlib.sha256).hexdigest()


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """The `Courier-Signature` header value for `body` sent at `timestamp`."""
    return f"t={timestamp},{SCHEME}={signature(secret, timestamp, body)}"


def verify(
    header: str,
    body: bytes,
    secret: bytes,
    *,
    now: float,
    tolerance: float = DEFAULT_TOLERANCE_SECONDS,
) -> bool:
    """Whether `header` signs `body` with `secret` at a time within `tolerance` of `now`.

    Any header, however malformed or hostile, is an answer (False), never an exception: the
    caller is a receiver's request handler, which should answer 401, not 500."""
    timestamp: int | None = None
    candidates: list[bytes] = []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        # ASCII digits only (`isdigit` also takes "²"), and few: an int of 400 digits would
        # overflow the float arithmetic with `now`.
        if key == "t" and value.isascii() and value.isdigit() and len(value) <= MAX_DIGITS:
            timestamp = int(value)
        elif key == SCHEME and value.isascii():  # compare_digest refuses non-ASCII str
            candidates.append(value.encode("ascii"))
    if timestamp is None or abs(now - timestamp) > tolerance:
        return False
    expected = signature(secret, timestamp, body).encode("ascii")
    return any(hmac.compare_digest(expected, candidate) for candidate in candidates)
