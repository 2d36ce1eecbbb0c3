"""Turning an HTTP request into typed events: the three CloudEvents HTTP modes and batches.

* plain JSON (`application/json`): `{"type": ..., "data": ..., other attributes optional}`;
* structured mode (`application/cloudevents+json`): the whole CloudEvent as the body;
* binary mode (`ce-*` headers): attributes in headers, the body is `data`.

Every function here is pure: bytes and headers in, events out, or an `IngestError` carrying the
HTTP status that describes what is wrong with the request.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Mapping, Sequence
from typing import Annotated, Any, Final
from urllib.parse import unquote_to_bytes

import orjson
from pydantic import Field, TypeAdapter, ValidationError

from contracts.envelope import MAX_ID_BYTES, EventId
from contracts.events import (
    INGEST_ADAPTER,
    INGEST_TYPES,
    DatasetSubmitted,
    IngestEvent,
    NotificationRequested,
)
from contracts.notify import CHANNELS, Channel, NotifyTarget, split_target
from services.messaging.errors import PermanentError
from services.notifier.recipients import recipient_problem
from services.notifier.targets import check_url

STRUCTURED: Final = "application/cloudevents+json"
BATCH: Final = "application/cloudevents-batch+json"
JSON: Final = "application/json"
SINGLE_TYPES: Final = frozenset({JSON, STRUCTURED})
BATCH_TYPES: Final = frozenset({JSON, BATCH})

# CloudEvents attributes that may arrive as `ce-<name>` headers in binary mode.
BINARY_ATTRIBUTES: Final = (
    "id", "source", "type", "specversion", "time", "subject", "dataschema",
    "correlationid", "causationid", "callbackurl",
)  # fmt: skip


@functools.cache
def _batch_adapter(max_events: int) -> TypeAdapter[list[IngestEvent]]:
    return TypeAdapter(Annotated[list[IngestEvent], Field(min_length=1, max_length=max_events)])


class IngestError(Exception):
    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def _invalid(exc: ValidationError) -> IngestError:
    errors = exc.errors(include_url=False, include_context=False, include_input=False)
    if any(error["type"] == "json_invalid" for error in errors):
        return IngestError(400, "malformed JSON body")
    for error in errors:
        if error["type"] in {"union_tag_invalid", "union_tag_not_found"}:
            # pydantic places it at the event itself ([] for a single event): it is the field's.
            error["loc"] = (*error["loc"], "type")
            error["msg"] = f"unknown or missing event type; known types: {sorted(INGEST_TYPES)}"
    return IngestError(422, errors)


def _utf8(value: str) -> str:
    """A header's value with raw UTF-8 bytes read as UTF-8 (the server gives every header as
    Latin-1: `café` came out `cafÃ©`); other bytes as the server read them."""
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return value


def _attribute(name: str, value: str) -> str:
    """A `ce-*` header's value: percent-decoded, as the CloudEvents HTTP binding has senders
    encode what is not printable ASCII (and space, `"` and `%`), then read as UTF-8 (raw
    UTF-8 bytes, which the server gave as Latin-1, read right too; other raw bytes stay as
    the server read them, as before)."""
    try:
        return unquote_to_bytes(value.encode("latin-1")).decode("utf-8")
    except UnicodeError as exc:
        if "%" not in value:
            return value
        raise IngestError(400, f"ce-{name} is not percent-encoded UTF-8") from exc


def _binary_body(headers: Mapping[str, str], body: bytes) -> bytes:
    """A structured-mode body from binary-mode headers plus the data body. A `ce-*` header
    naming no attribute Courier knows is refused, as the same extension is in structured mode
    (it was dropped without a word)."""
    unknown = sorted(
        name for name in headers if name.startswith("ce-") and name[3:] not in BINARY_ATTRIBUTES
    )
    if unknown:
        raise IngestError(
            422,
            [
                {
                    "type": "extra_forbidden",
                    "loc": ("header", name),
                    "msg": "Extra inputs are not permitted (a CloudEvents extension Courier "
                    "does not know)",
                }
                for name in unknown
            ],
        )
    attributes = {
        name: _attribute(name, headers[f"ce-{name}"])
        for name in BINARY_ATTRIBUTES
        if f"ce-{name}" in headers
    }
    if not body.strip():
        raise IngestError(400, "binary-mode CloudEvent without a data body")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise IngestError(400, "malformed JSON body") from exc
    return orjson.dumps({**attributes, "data": data})


_CORRELATION_ID: TypeAdapter[str] = TypeAdapter(EventId)


def correlation_header(value: str | None) -> str | None:
    """The `X-Correlation-ID` header as an event's correlation id (cut to 128 characters and
    255 bytes of UTF-8, what an id holds), checked as the body's would be: it becomes the
    message's correlation id. 422 if it is not a valid id."""
    if not value:
        return None
    value = _utf8(value)
    cut = value[:128].encode()[:MAX_ID_BYTES].decode(errors="ignore")  # no character split
    try:
        return _CORRELATION_ID.validate_python(cut)
    except ValidationError as exc:
        raise IngestError(422, f"X-Correlation-ID is not a valid id: {exc}") from exc


def _with_correlation(event: IngestEvent, correlation_id: str | None) -> IngestEvent:
    if correlation_id and event.correlationid is None:
        return event.model_copy(update={"correlationid": correlation_header(correlation_id)})
    return event


DOT_SEGMENTS: Final = frozenset({".", ".."})


def _addressable(event: IngestEvent, at: tuple[int, ...]) -> None:
    """Refuse an id its status URL could not name: `.` and `..` are dot segments, which URL
    parsers (browsers' escaped forms too) resolve to another path. Refused here, where a client
    submits, not in the contract, which events already queued are read with."""
    if event.id in DOT_SEGMENTS:
        why = "an event id may not be '.' or '..': its status URL could not name it"
        raise _refusal(event, at, ("id",), why)


def callback_url_problem(url: str, channels: Collection[Channel] = CHANNELS) -> str | None:
    """Why the notifier would refuse `url` for good (its own syntactic check, as for an
    upload's targets: a port 0, a host no DNS name spells), or None; or why it posts no
    callbacks at all (they are webhooks, and `channels` lack it). Checked where a client
    submits, not in the contract, which events already queued are read with: such a URL would
    be taken, then its callback dead-lettered."""
    if why := channel_problem("webhook", channels):
        return f"callbacks are posted as webhooks, and {why}"
    try:
        check_url(url)
    except PermanentError as exc:
        return str(exc).replace("the webhook URL", "the callback URL")
    return None


def channel_problem(channel: Channel, channels: Collection[Channel]) -> str | None:
    """Why nothing sent on `channel` would be delivered here (`COURIER_NOTIFY_CHANNELS`), or
    None: such a notification would be taken, then dead-lettered as not configured."""
    if channel in channels:
        return None
    return f"the notifier does not deliver on the {channel!r} channel here; it delivers on: " + (
        ", ".join(channels) or "none"
    )


def notify_target(raw: str, channels: Collection[Channel] = CHANNELS) -> NotifyTarget:
    """`<channel>:<recipient>` (an upload's `notify` field, a dataset's `notify` with a `:`)
    as a target the notifier would deliver to; `ValueError` saying why it would not: no `:`,
    an unknown channel or one it does not deliver on here (`channels`), a recipient that
    channel refuses."""
    split = split_target(raw)
    if split is None:
        raise ValueError("expected <channel>:<recipient>, e.g. email:ops@example.com")
    channel, recipient = split
    if channel not in CHANNELS:
        raise ValueError(f"unknown channel {channel!r}; use one of {', '.join(CHANNELS)}")
    try:
        target = NotifyTarget(channel=channel, recipient=recipient)
    except ValidationError as exc:
        raise ValueError("the recipient must be 1 to 2048 characters") from exc
    if why := channel_problem(target.channel, channels) or recipient_problem(
        target.channel, target.recipient
    ):
        raise ValueError(why)
    return target


def dataset_notify_problem(notify: str | None, channels: Collection[Channel]) -> str | None:
    """Why a dataset's `notify` names a target the notifier would not deliver to, or None. With
    a `:` it is `<channel>:<recipient>`, checked as an upload's target; without, a label for
    the log channel (the notifier reads it so too)."""
    if notify is None or split_target(notify) is None:
        return None
    try:
        notify_target(notify, channels)
    except ValueError as exc:
        return f"{exc} (a notify with ':' names <channel>:<recipient>; log:<label> for a label)"
    return None


def _refusal(
    event: IngestEvent, at: tuple[int, ...], field: tuple[str, ...], why: str
) -> IngestError:
    """A 422 located as pydantic locates an error in the same field: the batch index if any,
    the event's type (the union's tag), then the field's path."""
    return IngestError(422, [{"loc": [*at, event.type, *field], "msg": why, "type": "value_error"}])


def _deliverable(event: IngestEvent, at: tuple[int, ...], channels: Collection[Channel]) -> None:
    """Refuse what the notifier could never deliver: a callback URL it would refuse (or no
    webhook channel to post callbacks on), a notification (or a dataset's `notify` target)
    on a channel it does not deliver or to a recipient that channel refuses."""
    if event.callbackurl is not None and (why := callback_url_problem(event.callbackurl, channels)):
        raise _refusal(event, at, ("callbackurl",), why)
    if isinstance(event, NotificationRequested):
        data = event.data
        if why := channel_problem(data.channel, channels):
            raise _refusal(event, at, ("data", "channel"), why)
        if why := recipient_problem(data.channel, data.recipient):
            raise _refusal(event, at, ("data", "recipient"), why)
    elif isinstance(event, DatasetSubmitted) and (
        why := dataset_notify_problem(event.data.notify, channels)
    ):
        raise _refusal(event, at, ("data", "notify"), why)


def parse_event(
    content_type: str | None,
    headers: Mapping[str, str],
    body: bytes,
    channels: Collection[Channel] = CHANNELS,
) -> IngestEvent:
    kind = media_type(content_type)
    if kind not in SINGLE_TYPES:
        raise IngestError(415, f"use {JSON} or {STRUCTURED}, not {kind or 'no content type'!r}")
    if kind == JSON and "ce-specversion" in headers:
        body = _binary_body(headers, body)
        try:
            event = _checked(body, channels)
        except IngestError as exc:
            raise _in_binary_mode(exc) from exc
    else:
        event = _checked(body, channels)
    return _with_correlation(event, headers.get("x-correlation-id"))


def _checked(body: bytes, channels: Collection[Channel]) -> IngestEvent:
    """One event from a structured body: valid, addressable and deliverable."""
    try:
        event = INGEST_ADAPTER.validate_json(body)
    except ValidationError as exc:
        raise _invalid(exc) from exc
    _addressable(event, ())
    _deliverable(event, (), channels)
    return event


def _in_binary_mode(error: IngestError) -> IngestError:
    """A 422 of a binary-mode event located where the client put the value: an attribute's
    header (`["header", "ce-type"]`) or the body, which is the event's `data`
    (`["body", "recipient"]`), not the structured event the gateway made of them."""
    if error.status != 422 or not isinstance(error.detail, list):
        return error
    for problem in error.detail:
        loc = list(problem["loc"])
        if loc and loc[0] in INGEST_TYPES:  # the union's tag: the header names the type
            loc = loc[1:]
        if loc and loc[0] in BINARY_ATTRIBUTES:
            problem["loc"] = ("header", f"ce-{loc[0]}", *loc[1:])
        elif loc and loc[0] == "data":
            problem["loc"] = ("body", *loc[1:])
    return error


def parse_batch(
    content_type: str | None,
    headers: Mapping[str, str],
    body: bytes,
    max_events: int,
    channels: Collection[Channel] = CHANNELS,
) -> Sequence[IngestEvent]:
    kind = media_type(content_type)
    if kind not in BATCH_TYPES:
        raise IngestError(415, f"use {JSON} or {BATCH}, not {kind or 'no content type'!r}")
    try:
        events = _batch_adapter(max_events).validate_json(body)
    except ValidationError as exc:
        if any(e["type"] == "too_long" and not e["loc"] for e in exc.errors()):
            raise IngestError(413, f"a batch holds at most {max_events} events") from exc
        raise _invalid(exc) from exc
    first_at: dict[str, int] = {}
    for at, event in enumerate(events):
        _addressable(event, (at,))
        _deliverable(event, (at,), channels)
        if (earlier := first_at.setdefault(event.id, at)) != at:
            # Consumers take a second event under an id as a resend of the first and skip it.
            why = f"event {earlier} of this batch has the same id: one of them would be skipped"
            raise _refusal(event, (at,), ("id",), why)
    correlation = headers.get("x-correlation-id")
    return [_with_correlation(event, correlation) for event in events]
