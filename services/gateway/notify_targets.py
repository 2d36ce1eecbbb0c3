"""Notification targets of an upload: the `notify` form fields of `POST /v1/files`.

Each value is `<channel>:<recipient>`: `webhook:https://example.com/hook`,
`email:ops@example.com`, `log:ops`. A value that the notifier could never deliver is refused
here (422), before the upload is announced, instead of being dead-lettered later: a channel it
does not deliver on (`COURIER_NOTIFY_CHANNELS`), or a recipient its own syntactic checks refuse
(`ingest.notify_target`, which checks a dataset's `notify` the same way).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Final

from contracts.notify import CHANNELS, MAX_NOTIFY_TARGETS, Channel, NotifyTarget
from services.gateway.ingest import IngestError, notify_target

NOTIFY_FIELD: Final = "notify"
MAX_VALUE_BYTES: Final = 8 * 1024
"""Longest `notify` (or `callback_url`) value read: well above any valid one (a channel, `:`,
2048 characters)."""


def _refused(raw: str, why: str) -> IngestError:
    return IngestError(422, f"notify target {raw[:100]!r}: {why}")


def parse_target(raw: str, channels: Collection[Channel] = CHANNELS) -> NotifyTarget:
    """`<channel>:<recipient>` as a target; `IngestError(422)` saying what is wrong. `channels`
    are those the notifier delivers on (`COURIER_NOTIFY_CHANNELS`)."""
    try:
        return notify_target(raw, channels)
    except ValueError as exc:
        raise _refused(raw, str(exc)) from exc


def decode_value(raw: bytes, what: str) -> str:
    """A form value's bytes as text; `IngestError(422)` naming `what` if too long or not UTF-8."""
    if len(raw) > MAX_VALUE_BYTES:
        raise IngestError(422, f"{what} is longer than {MAX_VALUE_BYTES} bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise IngestError(422, f"{what} is not valid UTF-8") from None


def add_target(
    targets: list[NotifyTarget], raw: str, channels: Collection[Channel] = CHANNELS
) -> None:
    """Parse `raw` into `targets`: a target named twice is kept once, at most the maximum."""
    target = parse_target(raw, channels)
    if target in targets:
        return
    if len(targets) >= MAX_NOTIFY_TARGETS:
        raise IngestError(422, f"at most {MAX_NOTIFY_TARGETS} notify targets per upload")
    targets.append(target)
