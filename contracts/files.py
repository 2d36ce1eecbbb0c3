"""Files: an uploaded file (`file.uploaded`) and what the processor found in it (`file.processed`).

The gateway streams an upload into blob storage and publishes `file.uploaded` with a reference
to the blob (never the bytes); the processor reads the blob, analyses it and publishes
`file.processed`. Payloads are strict and bounded like every other event's.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

from pydantic import Field, StrictBool, StrictFloat, StrictInt, StringConstraints

from contracts.envelope import Envelope, IngestEnvelope, Payload
from contracts.notify import Notifying, NotifyTargets

MAX_COLUMNS: Final = 100
"""Columns reported per file (more are counted, not described)."""
MAX_NOTES: Final = 10

_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
BLOB_KEY_PATTERN: Final = rf"^{_SEGMENT}(/{_SEGMENT}){{0,3}}$"
MEDIA_TYPE_PATTERN: Final = r"^[a-z0-9][a-z0-9!#$&^_.+-]{0,126}/[a-z0-9][a-z0-9!#$&^_.+-]{0,126}$"

FileId = Annotated[str, StringConstraints(min_length=1, max_length=128)]
BlobKey = Annotated[str, StringConstraints(pattern=BLOB_KEY_PATTERN)]
"""A key in the blob store: relative, `/`-separated, no `.`-leading segment (so no `..`)."""
MediaType = Annotated[str, StringConstraints(pattern=MEDIA_TYPE_PATTERN)]
"""A lower-case `type/subtype` without parameters."""
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
FileName = Annotated[str, StringConstraints(min_length=1, max_length=255)]
Size = Annotated[StrictInt, Field(ge=0)]
Count = Annotated[StrictInt, Field(ge=0)]


# --- file.uploaded ----------------------------------------------------------------------------


class FileUploadedData(Notifying):
    file_id: FileId
    blob: BlobKey = Field(description="Key of the stored bytes in the blob store")
    name: FileName = Field(description="The client's file name, without any directory")
    content_type: MediaType = Field(description="The media type the client declared")
    size: Size = Field(description="Bytes stored")
    sha256: Sha256 = Field(description="Hex SHA-256 of the stored bytes")
    notify: NotifyTargets = Field(default_factory=list)


class FileUploaded(IngestEnvelope):
    """The gateway stored an uploaded file in blob storage.

    The upload's `callback_url` form field travels as `callbackurl`, as on events a client
    submits: the analysis' outcome (succeeded or dead-lettered) is posted there."""

    type: Literal["file.uploaded"] = "file.uploaded"
    dataschema: str | None = "urn:courier:schema:file.uploaded:1"
    data: FileUploadedData


# --- file.processed ---------------------------------------------------------------------------

FileFormat = Literal["csv", "jsonl", "json", "text", "binary"]
ColumnKind = Literal["number", "string", "boolean", "nested", "mixed", "null"]


class ColumnStats(Payload):
    name: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    kind: ColumnKind
    count: Count = Field(description="records with a value in this column")
    nulls: Count = Field(description="records where the column is missing, empty or null")
    min: StrictFloat | None = None
    max: StrictFloat | None = None
    mean: StrictFloat | None = None
    distinct: Count = Field(description="distinct values (a lower bound when distinct_capped)")
    distinct_capped: StrictBool = Field(
        default=False, description="the processor stopped tracking distinct values at its cap"
    )


class FileAnalysis(Payload):
    detected_type: MediaType = Field(description="The media type sniffed from the content")
    detected_extension: Annotated[str, StringConstraints(max_length=16)] | None = None
    format: FileFormat
    encoding: Literal["utf-8"] | None = None
    line_count: Count | None = None
    record_count: Count | None = None
    column_count: Count | None = None
    delimiter: Annotated[str, StringConstraints(min_length=1, max_length=1)] | None = None
    header: StrictBool | None = None
    columns: Annotated[list[ColumnStats], Field(max_length=MAX_COLUMNS)] = Field(
        default_factory=list
    )
    columns_truncated: StrictBool = Field(
        default=False, description="more columns exist than are described"
    )
    notes: Annotated[
        list[Annotated[str, StringConstraints(max_length=500)]], Field(max_length=MAX_NOTES)
    ] = Field(default_factory=list)


class FileProcessedData(Notifying):
    file_id: FileId
    name: FileName
    declared_type: MediaType
    size: Size
    sha256: Sha256
    analysis: FileAnalysis
    notify: NotifyTargets = Field(default_factory=list)
    """Copied from the `file.uploaded` it answers."""


class FileProcessed(Envelope):
    """The processor analysed an uploaded file."""

    type: Literal["file.processed"] = "file.processed"
    dataschema: str | None = "urn:courier:schema:file.processed:1"
    data: FileProcessedData
