"""The CloudEvents 1.0 envelope every event travels in.

Attribute names follow the CloudEvents spec (`id`, `source`, `type`, `specversion`, `time`,
`subject`, `datacontenttype`, `dataschema`, `data`) plus the `correlationid` and `causationid`
extensions. Concrete events narrow `type` to a literal and `data` to a typed payload. Events a
client submits (`IngestEnvelope`) may also carry the `callbackurl` extension.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
)

# CloudEvents requires non-empty strings; bounds keep headers and logs sane.
ID_PATTERN: Final = r"^[^\x00-\x1f\x7f]+$"
"""No ASCII control characters (U+0000 to U+001F, U+007F) in an id: ids key every store, and
PostgreSQL refuses a NUL in text."""
MAX_ID_BYTES: Final = 255
"""An id travels as an AMQP message or correlation id, a short string of at most 255 bytes:
128 characters can be 512 in UTF-8."""


def _fits_amqp(value: str) -> str:
    if len(value.encode()) > MAX_ID_BYTES:
        raise ValueError(f"at most {MAX_ID_BYTES} bytes in UTF-8")
    return value


EventId = Annotated[
    str,
    StringConstraints(min_length=1, max_length=128, strict=True, pattern=ID_PATTERN),
    AfterValidator(_fits_amqp),
    # What JSON Schema cannot say (it counts characters): said, so a client's check knows.
    Field(description=f"1-128 characters, at most {MAX_ID_BYTES} bytes in UTF-8"),
]
_EVENT_ID: TypeAdapter[str] = TypeAdapter(EventId)


def is_event_id(value: str) -> bool:
    """Whether `value` could be an event's id (an id from a URL path may be anything)."""
    try:
        _EVENT_ID.validate_python(value)
    except ValidationError:
        return False
    return True


Source = Annotated[str, StringConstraints(min_length=1, max_length=256, strict=True)]
Subject = Annotated[str, StringConstraints(min_length=1, max_length=256, strict=True)]

DEFAULT_SOURCE = "urn:courier:gateway"

MAX_CALLBACK_URL: Final = 2048


def http_url_problem(url: str) -> str | None:
    """Why `url` can never be posted to (a callback URL, a webhook target), or None: checked
    where it is submitted (422) rather than found when the notifier tries, retrying a delivery
    that cannot succeed. The notifier checks again, and guards the addresses the host resolves
    to, when it delivers. Spaces in the path or query are left to the HTTP client, which
    escapes them, as it always did for webhooks."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        return "must not contain control characters"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  # ValueError for a port that is not a number from 0 to 65535
    except ValueError as exc:
        return f"is not a valid URL: {exc}"
    if not parts.scheme:
        return "must be an absolute http or https URL (https://host/path), not a relative one"
    if parts.scheme not in ("http", "https"):
        return f"must be http or https, not {parts.scheme!r}"
    if "@" in parts.netloc:
        return "must not carry credentials"
    if " " in parts.netloc:
        return "must not contain spaces in its host"
    if not parts.hostname:
        return "has no host"
    return None


def _check_callback_url(url: str) -> str:
    # Spaces anywhere, as callback URLs always were: events already queued are read with this.
    if " " in url:
        raise ValueError("a callback URL must not contain spaces")
    if problem := http_url_problem(url):
        raise ValueError(f"a callback URL {problem}")
    return url


CallbackUrl = Annotated[
    str,
    StringConstraints(
        min_length=1, max_length=MAX_CALLBACK_URL, strict=True, pattern=r"^[hH][tT][tT][pP][sS]?://"
    ),
    AfterValidator(_check_callback_url),
]
"""An absolute http(s) URL without credentials, at most 2048 characters."""


def new_event_id() -> str:
    return str(uuid.uuid4())


def utcnow() -> datetime:
    return datetime.now(UTC)


def _utc_if_naive(at: datetime) -> datetime:
    # RFC 3339 (CloudEvents' `time`) has no time without an offset: one sent without (or a
    # plain date) is read as UTC, and travels on with its offset.
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at


EventTime = Annotated[datetime, AfterValidator(_utc_if_naive)]


def derived_event_id(input_id: str, event_type: str) -> str:
    """Id of an event a handler derives from an input: stable across redeliveries.

    A redelivered input therefore produces the same follow-up id, and downstream inboxes dedup it.
    """
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"courier:{input_id}:{event_type}"))


class Payload(BaseModel):
    """Base for event payloads: immutable, strict, no unknown fields."""

    model_config = ConfigDict(frozen=True, strict=True, extra="forbid")


def _type_is_required(schema: dict[str, Any]) -> None:
    """An event type's `type` has a default (a service builds its events without naming it),
    yet it is what picks the model of an event read: no event is valid without it."""
    required: list[str] = schema.setdefault("required", [])
    if "type" not in required:
        required.insert(0, "type")


class Envelope(BaseModel):
    """CloudEvents attributes shared by every event type."""

    model_config = ConfigDict(frozen=True, extra="forbid", json_schema_extra=_type_is_required)

    type: str
    specversion: Literal["1.0"] = "1.0"
    id: EventId = Field(default_factory=new_event_id)
    source: Source = DEFAULT_SOURCE
    time: EventTime = Field(default_factory=utcnow)
    subject: Subject | None = None
    datacontenttype: Literal["application/json"] = "application/json"
    dataschema: str | None = None
    correlationid: EventId | None = None
    causationid: EventId | None = None

    def correlation(self) -> str:
        """The correlation id for logs and follow-ups: an explicit one, else the event's own id."""
        return self.correlationid or self.id


class IngestEnvelope(Envelope):
    """The envelope of events a client submits, or the gateway builds from a client's request
    (`file.uploaded`): it may ask for the final status to be posted.

    `callbackurl` is a CloudEvents extension attribute (their names allow no underscore); JSON
    bodies may spell it `callback_url` too. It is serialised as `callbackurl`.
    """

    # Left out when absent: the event then serialises exactly as before the attribute existed,
    # so consumers of the previous version (which forbid unknown attributes) keep reading every
    # event that does not ask for a callback while a deployment is upgraded.
    callbackurl: CallbackUrl | None = Field(
        default=None,
        exclude_if=lambda url: url is None,
        validation_alias=AliasChoices("callbackurl", "callback_url"),
        description="Where the gateway has the final status posted (a signed webhook) once "
        "every service finished with the event: succeeded or dead-lettered.",
    )


def callback_url_of(event: Envelope) -> str | None:
    """The callback URL an event asks for, if it is one that may ask."""
    return event.callbackurl if isinstance(event, IngestEnvelope) else None
