"""Event types: past-tense facts (`dataset.submitted`) and explicit requests
(`notification.requested`), each a CloudEvents envelope with a typed, bounded, strict payload.

The schema version of each type is its `dataschema` URN; a breaking change gets a new type name.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal, Self

from pydantic import (
    BeforeValidator,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StringConstraints,
    TypeAdapter,
    model_validator,
)

from contracts.envelope import ID_PATTERN, Envelope, IngestEnvelope, Payload
from contracts.files import FileProcessed, FileUploaded
from contracts.notify import Channel as Channel  # re-exported: it was defined here first
from contracts.notify import Recipient
from contracts.tracking import CallbackRequested, CancellationRequested, StatusReported


def schema_urn(event_type: str, version: int = 1) -> str:
    return f"urn:courier:schema:{event_type}:{version}"


# --- notification.requested -------------------------------------------------------------------


class NotificationRequestedData(Payload):
    channel: Channel = "log"
    recipient: Recipient
    subject: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    body: Annotated[str, StringConstraints(max_length=10_000)] = ""


class NotificationRequested(IngestEnvelope):
    """Someone asked for a notification to be delivered on a channel."""

    type: Literal["notification.requested"] = "notification.requested"
    dataschema: str | None = schema_urn("notification.requested")
    data: NotificationRequestedData


# --- dataset.submitted → dataset.processed ----------------------------------------------------

MAX_RECORDS: Final = 10_000
MAX_FIELDS: Final = 100
MAX_DISTINCT_FIELDS: Final = 1_000
"""Field names over all of a dataset's records. The summary describes each one: without a
bound, a 1 MiB body of ~90,000 distinct names made a ~9 MB result, built and serialised on
the processor's loop, stored in its inbox and the gateway's results, and sent on."""

FieldName = Annotated[str, StringConstraints(min_length=1, max_length=64)]
# Numbers stay within what a double represents exactly, and finite: a 400-digit integer or an
# infinity is refused at the gateway instead of failing (and retrying) deep in a handler.
SafeInt = Annotated[int, Field(strict=True, ge=-(2**53), le=2**53)]


def _not_an_integer(value: object) -> object:
    # A strict float still takes a JSON integer: one beyond SafeInt's bounds came here, and
    # would have been rounded (18446744073709551616 became 1.8446744073709552e19) in silence.
    if type(value) is int:  # not a bool (its own type), and cheaper than isinstance twice
        raise ValueError("an integer beyond ±2**53, which a double does not hold exactly")
    return value


FiniteFloat = Annotated[
    float,
    BeforeValidator(_not_an_integer),
    Field(
        strict=True,
        allow_inf_nan=False,
        description="Finite; an integer beyond ±2**53 is refused (a double would round it).",
    ),
]
ScalarText = Annotated[str, StringConstraints(max_length=1024)]
# Strict members of disjoint types, tried left to right (fewer tries than pydantic's "smart"
# mode), the float last: its check is a Python call, which then only floats pay (~0.35 µs
# each), not strings too. `None` is outside, where it costs nothing.
Scalar = (
    Annotated[StrictBool | SafeInt | ScalarText | FiniteFloat, Field(union_mode="left_to_right")]
    | None
)
Record = Annotated[dict[FieldName, Scalar], Field(max_length=MAX_FIELDS)]


class DatasetSubmittedData(Payload):
    name: Annotated[str, StringConstraints(min_length=1, max_length=200)] = "dataset"
    records: Annotated[
        list[Record],
        Field(
            min_length=1,
            max_length=MAX_RECORDS,
            description=f"At most {MAX_DISTINCT_FIELDS:,} distinct field names in all.",
        ),
    ]
    notify: Recipient | None = Field(
        default=None,
        description="Who hears of the summary: `<channel>:<recipient>` (`webhook:<url>`, "
        "`email:<address>`, `log:<label>`), or a plain label without `:` for the log channel; "
        'without it, "ops" on the log channel.',
    )

    @model_validator(mode="after")
    def _few_enough_fields(self) -> Self:
        names: set[str] = set()
        for record in self.records:
            names.update(record)
            if len(names) > MAX_DISTINCT_FIELDS:
                raise ValueError(
                    f"more than {MAX_DISTINCT_FIELDS:,} distinct field names over the records"
                )
        return self


class DatasetSubmitted(IngestEnvelope):
    """A client submitted a dataset for summarising."""

    type: Literal["dataset.submitted"] = "dataset.submitted"
    dataschema: str | None = schema_urn("dataset.submitted")
    data: DatasetSubmittedData


FieldKind = Literal["number", "string", "boolean", "mixed", "null"]


class FieldSummary(Payload):
    kind: FieldKind
    count: StrictInt = Field(ge=0, description="records where the field is present and not null")
    nulls: StrictInt = Field(ge=0, description="records where the field is missing or null")
    min: StrictFloat | None = None
    max: StrictFloat | None = None
    mean: StrictFloat | None = None
    distinct: StrictInt | None = Field(default=None, ge=0, description="distinct strings")


class DatasetProcessedData(Payload):
    dataset_id: Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=ID_PATTERN)]
    name: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    record_count: StrictInt = Field(ge=0)
    fields: Annotated[dict[FieldName, FieldSummary], Field(max_length=MAX_RECORDS * MAX_FIELDS)]
    notify: Recipient | None = Field(
        default=None, description="The submitted dataset's `notify`, as it was given."
    )


class DatasetProcessed(Envelope):
    """The processor summarised a submitted dataset."""

    type: Literal["dataset.processed"] = "dataset.processed"
    dataschema: str | None = schema_urn("dataset.processed")
    data: DatasetProcessedData


# --- results.reported ---------------------------------------------------------------------------

MAX_RESULTS: Final = 1000


class ResultsReportedData(Payload):
    results: Annotated[list[DatasetProcessed], Field(min_length=1, max_length=MAX_RESULTS)]


class ResultsReported(Envelope):
    """A service hands the gateway a batch of the results it keeps (`RESULT_TYPES`).

    Each result also travels as its own event to the services that subscribe to it; the gateway
    takes them batched, confirmed before the inputs that produced them are acknowledged, so a
    result is never lost and the gateway pays for one delivery a batch instead of one a result."""

    type: Literal["results.reported"] = "results.reported"
    dataschema: str | None = schema_urn("results.reported")
    data: ResultsReportedData


# --- unions -----------------------------------------------------------------------------------

Event = Annotated[
    NotificationRequested
    | DatasetSubmitted
    | DatasetProcessed
    | ResultsReported
    | StatusReported
    | CancellationRequested
    | FileUploaded
    | FileProcessed
    | CallbackRequested,
    Field(discriminator="type"),
]
"""Every event that travels on the broker."""

IngestEvent = Annotated[NotificationRequested | DatasetSubmitted, Field(discriminator="type")]
"""The events an upstream client may submit through the gateway."""

EVENT_ADAPTER: Final[TypeAdapter[Event]] = TypeAdapter(Event)
INGEST_ADAPTER: Final[TypeAdapter[IngestEvent]] = TypeAdapter(IngestEvent)

EVENT_MODELS: Final[dict[str, type[Envelope]]] = {
    "notification.requested": NotificationRequested,
    "dataset.submitted": DatasetSubmitted,
    "dataset.processed": DatasetProcessed,
    "results.reported": ResultsReported,
    "status.reported": StatusReported,
    "cancellation.requested": CancellationRequested,
    "file.uploaded": FileUploaded,
    "file.processed": FileProcessed,
    "callback.requested": CallbackRequested,
}
INGEST_TYPES: Final[frozenset[str]] = frozenset({"notification.requested", "dataset.submitted"})
