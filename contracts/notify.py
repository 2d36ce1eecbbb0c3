"""Notification targets: where a notification goes (`channel`) and to whom (`recipient`).

`notification.requested` names one target; a file upload may name several (`notify`), carried
from `file.uploaded` into `file.processed`, where the notifier delivers one notification each.
A dataset's `notify` is one text value, carried from `dataset.submitted` into
`dataset.processed`: `<channel>:<recipient>` (`split_target`) or a label for the log channel.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal, get_args

from pydantic import Field, SerializerFunctionWrapHandler, StringConstraints, model_serializer

from contracts.envelope import Payload

Channel = Literal["log", "webhook", "email"]
CHANNELS: Final[tuple[Channel, ...]] = get_args(Channel)

NO_NUL: Final = r"^[^\x00]*$"
"""Text a store can hold: PostgreSQL refuses a NUL in text, and a notification sent but not
recorded would be sent again."""

Recipient = Annotated[str, StringConstraints(min_length=1, max_length=2048, pattern=NO_NUL)]
"""A log label, an http(s) URL (webhook) or one email address, by channel."""

MAX_NOTIFY_TARGETS: Final = 10


class NotifyTarget(Payload):
    channel: Channel
    recipient: Recipient


NotifyTargets = Annotated[
    list[NotifyTarget],
    Field(
        max_length=MAX_NOTIFY_TARGETS,
        description="Where to announce the outcome; one notification per target",
    ),
]


class Notifying(Payload):
    """Base of payloads that end with a `notify: NotifyTargets` field (empty by default).

    An empty list is left out of the serialized payload, so an event without targets is the same
    on the wire as before the field existed: a service that does not know `notify` yet (payloads
    refuse unknown fields) still reads it during a rolling upgrade.
    """

    @model_serializer(mode="wrap")
    def _omit_empty_notify(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        if isinstance(data, dict) and data.get("notify") == []:
            del data["notify"]
        return data


def split_target(value: str) -> tuple[str, str] | None:
    """`<channel>:<recipient>` cut at its first `:`, both parts trimmed, or None without a `:`:
    how an upload's `notify` fields and a dataset's `notify` name a target. Which channels
    exist, and which recipients they take, is the reader's to check."""
    channel, sep, recipient = value.strip().partition(":")
    return (channel, recipient.strip()) if sep else None
