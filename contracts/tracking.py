"""Events about events: status transitions the services report, cancellation requests, and
callback requests.

Each consuming service reports what happens to every event it handles (`status.reported`,
batched); the gateway keeps the projection that answers `GET /v1/events/{id}`. A
`cancellation.requested` reaches every consuming service's control queue, ahead of its work. A
`callback.requested` asks the notifier to post an event's final status to the URL its client
gave (`callbackurl`), once every service that works on the event finished with it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Final, Literal

from pydantic import Field, StrictInt, StringConstraints

from contracts.envelope import ID_PATTERN, CallbackUrl, Envelope, Payload, derived_event_id

State = Literal[
    "pending",
    "processing",
    "succeeded",
    "retrying",
    "dead_lettered",
    "replayed",
    "cancelled",
    "skipped_duplicate",
]
MAX_DETAIL: Final = 1000
"""Characters of a transition's detail (an error summary) kept."""
MAX_LABEL: Final = 64
"""Characters of a transition's reason and group (short labels ops filter by)."""
FINAL_STATES: Final[frozenset[str]] = frozenset({"succeeded", "dead_lettered", "cancelled"})

# Timestamps accept ISO strings even in strict payloads (JSON has no datetime type).
Timestamp = Annotated[datetime, Field(strict=False)]
EventIdField = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=ID_PATTERN)]
ServiceName = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class Transition(Payload):
    event_id: EventIdField
    event_type: Annotated[str, StringConstraints(max_length=128)] | None = None
    service: ServiceName
    state: State
    at: Timestamp
    attempt: StrictInt | None = Field(default=None, ge=1)
    next_attempt_at: Timestamp | None = None
    reason: Annotated[str, StringConstraints(max_length=MAX_LABEL)] | None = None
    group: Annotated[str, StringConstraints(max_length=MAX_LABEL)] | None = None
    detail: Annotated[str, StringConstraints(max_length=MAX_DETAIL)] | None = None


MAX_TRANSITIONS: Final = 1000


class StatusReportedData(Payload):
    transitions: Annotated[list[Transition], Field(min_length=1, max_length=MAX_TRANSITIONS)]


class StatusReported(Envelope):
    """A service reports what happened to events it handled (a batch of transitions)."""

    type: Literal["status.reported"] = "status.reported"
    dataschema: str | None = "urn:courier:schema:status.reported:1"
    data: StatusReportedData


class CancellationRequestedData(Payload):
    event_id: EventIdField


class CancellationRequested(Envelope):
    """A client asked that an event not be processed by any service that has not done so yet."""

    type: Literal["cancellation.requested"] = "cancellation.requested"
    dataschema: str | None = "urn:courier:schema:cancellation.requested:1"
    data: CancellationRequestedData


# --- callback.requested -------------------------------------------------------------------------

CallbackOutcome = Literal["succeeded", "dead_lettered"]
"""What a callback reports: dead-lettered if any service dead-lettered the event, else
succeeded (an event only cancelled gets no callback)."""

MAX_SERVICES: Final = 32


class ServiceOutcome(Payload):
    """One service's final state of the event, as `GET /v1/events/{id}` shows it."""

    state: State
    attempt: StrictInt | None = Field(default=None, ge=1)
    reason: Annotated[str, StringConstraints(max_length=MAX_LABEL)] | None = None
    group: Annotated[str, StringConstraints(max_length=MAX_LABEL)] | None = None
    detail: Annotated[str, StringConstraints(max_length=MAX_DETAIL)] | None = None
    updated_at: Timestamp


class CallbackRequestedData(Payload):
    event_id: EventIdField
    event_type: Annotated[str, StringConstraints(max_length=128)] | None = None
    outcome: CallbackOutcome
    settled_at: Timestamp = Field(description="when the last service reached its final state")
    callback_url: CallbackUrl
    services: Annotated[
        dict[ServiceName, ServiceOutcome], Field(min_length=1, max_length=MAX_SERVICES)
    ]


class CallbackRequested(Envelope):
    """The gateway asks for an event's final status to be posted to its client's callback URL.

    Its id derives from the event's id and the outcome, so the same settlement found twice (a
    redelivered status report) is the same request."""

    type: Literal["callback.requested"] = "callback.requested"
    dataschema: str | None = "urn:courier:schema:callback.requested:1"
    data: CallbackRequestedData


def callback_id(event_id: str, outcome: str) -> str:
    """The id of an event's `callback.requested` for an outcome (and the POST's
    `Idempotency-Key`): one request per event and outcome, so the same settlement found twice
    (a redelivered report, or a later report after a publish whose mark was lost) is the same
    request, which the notifier and the receiver dedup."""
    return derived_event_id(event_id, f"callback:{outcome}")
