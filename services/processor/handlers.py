"""Processor handlers: plain async functions, dependencies as parameters, no transport code."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from contracts.envelope import Envelope, derived_event_id
from contracts.events import DatasetProcessed, DatasetProcessedData, DatasetSubmitted
from contracts.files import FileProcessed, FileProcessedData, FileUploaded
from services.blobs import BlobStore
from services.messaging.cpu import CpuPool
from services.processor.analysis import analyse_file
from services.processor.summary import summarise

INLINE_VALUES = 500
"""Datasets of at most this many values (fields over all records) are summarised on the event
loop: that takes up to ~0.25 ms, less than a round trip to the process pool (~0.4 ms, and CPU
on both sides), and most datasets are that small. Larger ones go to the pool."""


def _small(records: Sequence[Mapping[str, object]]) -> bool:
    return len(records) <= INLINE_VALUES and sum(map(len, records)) <= INLINE_VALUES


async def dataset_submitted(event: DatasetSubmitted, *, pool: CpuPool) -> Sequence[Envelope]:
    """Summarise the records (in a worker process unless they are few) and announce the result."""
    records = event.data.records
    fields = summarise(records) if _small(records) else await pool.run(summarise, records)
    processed = DatasetProcessed(
        id=derived_event_id(event.id, "dataset.processed"),
        source="urn:courier:processor",
        subject=event.id,
        data=DatasetProcessedData(
            dataset_id=event.id,
            name=event.data.name,
            record_count=len(event.data.records),
            fields=fields,
            notify=event.data.notify,
        ),
    )
    return [processed]


async def file_uploaded(
    event: FileUploaded, *, pool: CpuPool, blobs: BlobStore
) -> Sequence[Envelope]:
    """Analyse the stored file in a worker process (streaming it) and announce the analysis.

    A missing, changed or unreadable file raises `PermanentError` (from the worker) with the
    reason; it is dead-lettered, not retried.
    """
    data = event.data
    analysis = await pool.run(
        analyse_file, blobs, data.blob, data.content_type, data.size, data.sha256
    )
    processed = FileProcessed(
        id=derived_event_id(event.id, "file.processed"),
        source="urn:courier:processor",
        subject=event.id,
        data=FileProcessedData(
            file_id=data.file_id,
            name=data.name,
            declared_type=data.content_type,
            size=data.size,
            sha256=data.sha256,
            analysis=analysis,
            notify=data.notify,  # the notifier announces the analysis to these targets
        ),
    )
    return [processed]
