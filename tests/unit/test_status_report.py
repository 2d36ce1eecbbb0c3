"""A status report is serialised straight from its records: it must still be a valid event."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from contracts.events import EVENT_ADAPTER
from contracts.tracking import StatusReported, StatusReportedData
from services.messaging.publisher import envelope_body

AT = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def test_a_serialised_batch_validates_as_the_status_reported_event() -> None:
    envelope = StatusReported.model_construct(
        source="urn:courier:processor", data=StatusReportedData.model_construct(transitions=[])
    )
    records: list[dict[str, Any]] = [
        {"event_id": "e1", "event_type": "dataset.submitted", "service": "processor",
         "state": "processing", "at": AT, "attempt": 1},
        {"event_id": "e1", "event_type": "dataset.submitted", "service": "processor",
         "state": "retrying", "at": AT, "attempt": 1, "next_attempt_at": AT + timedelta(seconds=5),
         "detail": "builtins.ConnectionError: refused"},
        {"event_id": "e2", "event_type": None, "service": "processor", "state": "dead_lettered",
         "at": AT, "attempt": 3, "reason": "permanent", "group": "g" * 16},
    ]  # fmt: skip

    event = EVENT_ADAPTER.validate_json(envelope_body(envelope, {"transitions": records}))

    assert isinstance(event, StatusReported)
    assert (event.id, event.source) == (envelope.id, "urn:courier:processor")
    retrying = event.data.transitions[1]
    assert (retrying.state, retrying.next_attempt_at) == ("retrying", AT + timedelta(seconds=5))
    assert [t.model_dump(exclude_none=True) for t in event.data.transitions] == [
        {k: v for k, v in r.items() if v is not None} for r in records
    ]
