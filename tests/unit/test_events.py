"""The event contracts: strict, bounded, discriminated by type."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from pydantic import ValidationError

from contracts.envelope import derived_event_id
from contracts.events import (
    EVENT_ADAPTER,
    INGEST_ADAPTER,
    MAX_DISTINCT_FIELDS,
    MAX_FIELDS,
    MAX_RECORDS,
    DatasetSubmitted,
    NotificationRequested,
)
from services.messaging.publisher import event_body


def notification(**data: object) -> dict[str, object]:
    return {
        "type": "notification.requested",
        "data": {"recipient": "a@example.org", "subject": "hi", **data},
    }


def test_an_event_gets_an_id_time_and_schema_when_absent() -> None:
    event = INGEST_ADAPTER.validate_python(notification())
    assert isinstance(event, NotificationRequested)
    assert event.id and event.time.tzinfo is not None
    assert event.specversion == "1.0"
    assert event.dataschema == "urn:courier:schema:notification.requested:1"


@pytest.mark.parametrize("sent", ["2026-03-01T12:00:00", "2026-03-01"])
def test_a_time_without_an_offset_is_read_as_utc_and_travels_with_one(sent: str) -> None:
    # It went on as sent, and RFC 3339 (CloudEvents' `time`) has no such time.
    event = INGEST_ADAPTER.validate_python({**notification(), "time": sent})
    assert event.time.utcoffset() == timedelta(0)
    assert json.loads(event_body(event))["time"].startswith("2026-03-01T")
    assert json.loads(event_body(event))["time"].endswith("Z")


def test_the_type_selects_the_payload_model() -> None:
    event = INGEST_ADAPTER.validate_json(
        b'{"type": "dataset.submitted", "data": {"records": [{"a": 1}]}}'
    )
    assert isinstance(event, DatasetSubmitted)
    assert event.data.records == [{"a": 1}]


def test_an_unknown_type_is_refused() -> None:
    with pytest.raises(ValidationError, match=r"union_tag_invalid|does not match any"):
        INGEST_ADAPTER.validate_python({"type": "order.placed", "data": {}})


def test_internal_events_cannot_be_ingested() -> None:
    processed = {
        "type": "dataset.processed",
        "data": {"dataset_id": "x", "name": "n", "record_count": 0, "fields": {}},
    }
    EVENT_ADAPTER.validate_python(processed)
    with pytest.raises(ValidationError):
        INGEST_ADAPTER.validate_python(processed)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("recipient", 5),
        ("subject", False),
        ("channel", "pigeon"),
        ("subject", ""),
        ("body", "x" * 10_001),
    ],
)
def test_payload_fields_are_strict_and_bounded(field: str, value: object) -> None:
    with pytest.raises(ValidationError):
        INGEST_ADAPTER.validate_python(notification(**{field: value}))


@pytest.mark.parametrize(
    "event",
    [
        {"type": "notification.requested", "data": {"recipient": "ops\x00team", "subject": "s"}},
        {"type": "dataset.submitted", "data": {"records": [{"a": 1}], "notify": "ops\x00team"}},
    ],
    ids=["recipient", "notify label"],
)
def test_a_notification_target_holding_a_nul_is_refused(event: dict[str, object]) -> None:
    # PostgreSQL cannot store it: the notification was sent, its record refused, and it was
    # sent again on every retry.
    with pytest.raises(ValidationError, match="pattern"):
        INGEST_ADAPTER.validate_python(event)


def test_unknown_payload_fields_are_refused() -> None:
    with pytest.raises(ValidationError, match="extra"):
        INGEST_ADAPTER.validate_python(notification(priority="high"))


def test_a_json_false_is_not_a_number() -> None:
    event = INGEST_ADAPTER.validate_json(
        b'{"type": "dataset.submitted", "data": {"records": [{"a": false, "b": 0}]}}'
    )
    assert isinstance(event, DatasetSubmitted)
    assert event.data.records[0]["a"] is False
    assert event.data.records[0]["b"] == 0


@pytest.mark.parametrize(
    "number", [b"9007199254740993", b"18446744073709551616", b"-1" + b"0" * 20]
)
def test_an_integer_a_double_cannot_hold_exactly_is_refused_not_rounded(number: bytes) -> None:
    # It was taken as a float: 18446744073709551616 went on as 1.8446744073709552e19.
    body = b'{"type": "dataset.submitted", "data": {"records": [{"n": %s}]}}' % number
    with pytest.raises(ValidationError, match="does not hold exactly"):
        INGEST_ADAPTER.validate_json(body)


def test_numbers_within_a_double_keep_their_type() -> None:
    body = (
        b'{"type": "dataset.submitted", "data": {"records": [{"i": 9007199254740992, "f": 1e300}]}}'
    )
    event = INGEST_ADAPTER.validate_json(body)
    assert isinstance(event, DatasetSubmitted)
    assert event.data.records[0] == {"i": 2**53, "f": 1e300}
    assert isinstance(event.data.records[0]["i"], int)


def test_dataset_size_is_bounded() -> None:
    too_many = {"type": "dataset.submitted", "data": {"records": [{"a": 1}] * (MAX_RECORDS + 1)}}
    with pytest.raises(ValidationError):
        INGEST_ADAPTER.validate_python(too_many)
    too_wide = {f"f{i}": i for i in range(MAX_FIELDS + 1)}
    with pytest.raises(ValidationError):
        INGEST_ADAPTER.validate_python(
            {"type": "dataset.submitted", "data": {"records": [too_wide]}}
        )
    with pytest.raises(ValidationError):
        INGEST_ADAPTER.validate_python({"type": "dataset.submitted", "data": {"records": []}})


def dataset_with_distinct_fields(count: int) -> dict[str, object]:
    names = [f"f{i}" for i in range(count)]
    records = [dict.fromkeys(names[at : at + MAX_FIELDS], 1) for at in range(0, count, MAX_FIELDS)]
    return {"type": "dataset.submitted", "data": {"records": records}}


def test_the_field_names_over_all_records_are_bounded_too() -> None:
    # Each is described in the summary: unbounded, a 1 MiB body made a ~9 MB result.
    event = INGEST_ADAPTER.validate_python(dataset_with_distinct_fields(MAX_DISTINCT_FIELDS))
    assert isinstance(event, DatasetSubmitted)
    with pytest.raises(ValidationError, match="distinct field names"):
        INGEST_ADAPTER.validate_python(dataset_with_distinct_fields(MAX_DISTINCT_FIELDS + 1))
    published = event.model_dump(mode="json")
    published["data"]["records"].append({"extra": 1})
    with pytest.raises(ValidationError, match="distinct field names"):
        EVENT_ADAPTER.validate_python(published)  # a consumer refuses it too (as `invalid`)


def test_events_round_trip_through_json() -> None:
    event = INGEST_ADAPTER.validate_python(notification(body="hello"))
    assert EVENT_ADAPTER.validate_json(EVENT_ADAPTER.dump_json(event)) == event


@pytest.mark.parametrize("callback", [None, "https://example.org/cb"])
@pytest.mark.parametrize(
    "payload",
    [notification(body="hello"), {"type": "dataset.submitted", "data": {"records": [{"a": 1}]}}],
)
def test_a_published_body_is_the_events_cloudevent_json(
    payload: dict[str, object], callback: str | None
) -> None:
    event = INGEST_ADAPTER.validate_python({**payload, "callbackurl": callback})
    assert event_body(event) == EVENT_ADAPTER.dump_json(event)


def test_derived_ids_are_stable_and_distinct_per_type() -> None:
    assert derived_event_id("abc", "dataset.processed") == derived_event_id(
        "abc", "dataset.processed"
    )
    assert derived_event_id("abc", "dataset.processed") != derived_event_id(
        "abd", "dataset.processed"
    )
    assert derived_event_id("abc", "dataset.processed") != derived_event_id("abc", "other")
