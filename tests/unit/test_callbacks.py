"""When an event is settled, and with which outcome (`services.gateway.callbacks.settle`), for
an event type that two services work on (none of today's ingest types is, but a subscription
change must not make a callback go out while one service still works)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from contracts.tracking import ServiceOutcome, State, callback_id
from services.gateway import callbacks
from services.gateway.callbacks import settle

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


@pytest.fixture(autouse=True)
def two_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        callbacks, "workers_of", lambda t: ("processor", "notifier") if t == "x.both" else ()
    )


def outcome(state: State, seconds: int = 0) -> ServiceOutcome:
    return ServiceOutcome(state=state, updated_at=T0 + timedelta(seconds=seconds))


@pytest.mark.parametrize(
    ("processor", "notifier"),
    [("succeeded", "processing"), ("dead_lettered", "retrying"), ("succeeded", "pending"),
     ("replayed", "succeeded")],
)  # fmt: skip
def test_an_event_is_not_settled_while_a_worker_is_not_done(
    processor: State, notifier: State
) -> None:
    assert (
        settle("x.both", {"processor": outcome(processor), "notifier": outcome(notifier)}) is None
    )


def test_an_event_is_not_settled_before_every_worker_reported() -> None:
    assert settle("x.both", {"processor": outcome("succeeded")}) is None
    assert settle("x.unknown", {"processor": outcome("succeeded")}) is None
    assert settle(None, {"processor": outcome("succeeded")}) is None


@pytest.mark.parametrize(
    ("processor", "notifier", "expected"),
    [
        ("succeeded", "succeeded", "succeeded"),
        ("skipped_duplicate", "succeeded", "succeeded"),
        ("succeeded", "cancelled", "succeeded"),
        ("dead_lettered", "succeeded", "dead_lettered"),
        ("cancelled", "dead_lettered", "dead_lettered"),
        ("cancelled", "cancelled", "cancelled"),
    ],
)
def test_the_outcome_is_the_worst_final_state_at_the_last_one(
    processor: State, notifier: State, expected: str
) -> None:
    services = {"processor": outcome(processor, 1), "notifier": outcome(notifier, 7)}
    assert settle("x.both", services) == (expected, T0 + timedelta(seconds=7))


def test_the_callback_id_is_stable_per_event_and_outcome() -> None:
    first = callback_id("e-1", "succeeded")
    assert first == callback_id("e-1", "succeeded")
    assert first != callback_id("e-1", "dead_lettered")
    assert first != callback_id("e-2", "succeeded")
