"""Processor handlers: plain async functions, dependencies as parameters, no transport code."""

from __future__ import annotations

from collections.abc import Sequence

from contracts.envelope import Envelope, derived_event_id
from contracts.events import DatasetProcessed, DatasetProcessedData, DatasetSubmitted
from services.messaging.cpu import CpuPool
from services.processor.summary import summarise


async def dataset_submitted(event: DatasetSubmitted, *, pool: CpuPool) -> Sequence[Envelope]:
    """Summarise the records in a worker process and announce the result."""
    fields = await pool.run(summarise, event.data.records)
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
