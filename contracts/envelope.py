"""The CloudEvents 1.0 envelope every event travels in.

Attribute names follow the CloudEvents spec (`id`, `source`, `type`, `specversion`, `time`,
`subject`, `datacontenttype`, `dataschema`, `data`) plus the `correlationid` and `causationid`
extensions. Concrete events narrow `type` to a literal and `data` to a typed payload.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

# CloudEvents requires non-empty strings; bounds keep headers and logs sane.
EventId = Annotated[str, StringConstraints(min_length=1, max_length=128, strict=True)]
Source = Annotated[str, StringConstraints(min_length=1, max_length=256, strict=True)]
Subject = Annotated[str, StringConstraints(min_length=1, max_length=256, strict=True)]

DEFAULT_SOURCE = "urn:courier:gateway"


def new_event_id() -> str:
    return str(uuid.uuid4())


def utcnow() -> datetime:
    return datetime.now(UTC)


def derived_event_id(input_id: str, event_type: str) -> str:
    """Id of an event a handler derives from an input: stable across redeliveries.

    A redelivered input therefore produces the same follow-up id, and downstream inboxes dedup it.
    """
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"courier:{input_id}:{event_type}"))


class Payload(BaseModel):
    """Base for event payloads: immutable, strict, no unknown fields."""

    model_config = ConfigDict(frozen=True, strict=True, extra="forbid")


class Envelope(BaseModel):
    """CloudEvents attributes shared by every event type."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: str
    specversion: Literal["1.0"] = "1.0"
    id: EventId = Field(default_factory=new_event_id)
    source: Source = DEFAULT_SOURCE
    time: datetime = Field(default_factory=utcnow)
    subject: Subject | None = None
    datacontenttype: Literal["application/json"] = "application/json"
    dataschema: str | None = None
    correlationid: EventId | None = None
    causationid: EventId | None = None

    def correlation(self) -> str:
        """The correlation id for logs and follow-ups: an explicit one, else the event's own id."""
        return self.correlationid or self.id
