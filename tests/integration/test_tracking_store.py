"""The status projection (`services.gateway.tracking`) on both stores: SQLite and PostgreSQL.

First `Tracking` itself against a real engine from `open_store` (what `GET /v1/events/{id}`
and `GET /v1/datasets/{id}` read), then the routes that read and feed it, through an in-process
gateway on a real broker. `IdempotencyKeys` is in test_idempotency.py.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import aio_pika
import httpx
import pytest
from sqlalchemy import inspect, select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

from contracts.envelope import Envelope, derived_event_id
from contracts.events import (
    EVENT_ADAPTER,
    DatasetProcessed,
    DatasetProcessedData,
    DatasetSubmitted,
    DatasetSubmittedData,
    FieldSummary,
    NotificationRequested,
    NotificationRequestedData,
    ResultsReported,
    ResultsReportedData,
)
from contracts.topology import (
    WORKERS,
    control_queue,
    dead_letter_queue,
    events_exchange,
    work_queue,
)
from contracts.tracking import (
    MAX_TRANSITIONS,
    CancellationRequested,
    State,
    StatusReported,
    StatusReportedData,
    Transition,
)
from services.gateway import routes as routes_module
from services.gateway.tracking import SEQ_LOOKUP_CHUNK, Tracking, metadata, states_of
from services.gateway.tracking import _write as write_status
from services.gateway.tracking_migrations import (
    legacy_events,
    legacy_history,
    legacy_states,
    steps,
)
from services.messaging.dead_letters import group_key
from services.messaging.failure import EXCEPTION_MESSAGE, FINGERPRINT, Failure
from services.messaging.logs import Throttle
from services.messaging.publisher import Publisher
from services.messaging.store import ROWS_PER_STATEMENT, migrate, open_store, store_url
from tests.conftest import Namespace
from tests.integration.conftest import OPS_TOKEN, gateway_client, gateway_settings
from tests.support.plans import query_plan
from tests.support.polling import eventually
from tests.support.queues import take

NOTIFICATION: dict[str, Any] = {
    "type": "notification.requested",
    "data": {"recipient": "r@example.org", "subject": "hi"},
}


@pytest.fixture(params=["sqlite", "postgresql"])
async def engine(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    database_url = None if request.param == "sqlite" else request.getfixturevalue("module_database")
    store = open_store(store_url(database_url, tmp_path, "gateway"))
    yield store
    await store.dispose()


@pytest.fixture
async def tracking(engine: AsyncEngine) -> AsyncIterator[Tracking]:
    projection = Tracking(engine)
    await projection.start()
    yield projection
    await projection.close()


def notification() -> NotificationRequested:
    return NotificationRequested(data=NotificationRequestedData(recipient="r", subject="s"))


def dataset() -> DatasetSubmitted:
    return DatasetSubmitted(data=DatasetSubmittedData(name="prices", records=[{"price": 10}]))


def step(event_id: str, service: str, state: State, at: datetime, **detail: Any) -> Transition:
    return Transition(
        event_id=event_id,
        event_type="notification.requested",
        service=service,
        state=state,
        at=at,
        **detail,
    )


async def status_of(tracking: Tracking, event_id: str) -> dict[str, Any]:
    found = await tracking.status(event_id)
    assert found is not None, event_id
    return found


async def accepted_then(tracking: Tracking, event: Envelope) -> datetime:
    """Accept `event`; a moment just after its accept, for the transitions that follow."""
    tracking.accepted(event)
    accepted_at: datetime = (await status_of(tracking, event.id))["accepted_at"]
    return accepted_at + timedelta(milliseconds=10)


def history_states(status: dict[str, Any], service: str) -> list[str]:
    return [h["state"] for h in status["services"][service]["history"]]


# --- Tracking -----------------------------------------------------------------------------------


async def test_an_unknown_event_has_no_status(tracking: Tracking) -> None:
    assert await tracking.status("nope") is None
    assert await tracking.result("nope") is None


async def test_an_accepted_event_is_pending_for_every_service_that_consumes_it(
    tracking: Tracking,
) -> None:
    before = datetime.now(UTC)
    note, data = notification(), dataset()
    tracking.accepted(note)
    tracking.accepted(data)
    status = await status_of(tracking, note.id)  # visible at once, without waiting for the writer
    assert status["id"] == note.id and status["type"] == "notification.requested"
    assert before <= status["accepted_at"] <= datetime.now(UTC)
    assert status["cancel_requested_at"] is None
    assert states_of(status) == {"notifier": "pending"}
    assert states_of(await status_of(tracking, data.id)) == {"processor": "pending"}


async def test_an_accept_stores_no_pending_rows_yet_a_reporting_service_shows_pending_first(
    tracking: Tracking, engine: AsyncEngine
) -> None:
    event = dataset()
    tracking.accepted(event)
    accepted = (await status_of(tracking, event.id))["accepted_at"]
    async with engine.connect() as conn:
        for table in ("status_states", "status_history"):
            rows = await conn.scalar(text(f"SELECT count(*) FROM {table}"))  # noqa: S608
            assert rows == 0, table
    t = accepted + timedelta(milliseconds=5)
    await tracking.apply([step(event.id, "processor", "processing", t, attempt=1)])
    history = (await status_of(tracking, event.id))["services"]["processor"]["history"]
    assert [(h["state"], h["at"]) for h in history] == [("pending", accepted), ("processing", t)]


async def test_pending_rows_stored_by_an_earlier_version_are_shown_once(
    tracking: Tracking,
) -> None:
    event = notification()
    tracking.accepted(event)
    accepted = (await status_of(tracking, event.id))["accepted_at"]
    # What earlier versions wrote with every accept.
    await tracking.apply([step(event.id, "notifier", "pending", accepted)])
    status = await status_of(tracking, event.id)
    assert states_of(status) == {"notifier": "pending"}
    assert history_states(status, "notifier") == ["pending"]
    t = accepted + timedelta(milliseconds=5)
    await tracking.apply([step(event.id, "notifier", "processing", t, attempt=1)])
    status = await status_of(tracking, event.id)
    assert states_of(status) == {"notifier": "processing"}
    assert history_states(status, "notifier") == ["pending", "processing"]


async def test_accepts_of_more_rows_than_one_statement_takes_are_all_written(
    tracking: Tracking,
) -> None:
    events = [notification() for _ in range(ROWS_PER_STATEMENT * 2 + 1)]
    for event in events:
        tracking.accepted(event)
    for event in (events[0], events[ROWS_PER_STATEMENT], events[-1]):
        assert states_of(await status_of(tracking, event.id)) == {"notifier": "pending"}


@asynccontextmanager
async def accept_records_refused(engine: AsyncEngine) -> AsyncGenerator[None, None]:
    """The store refuses accept records (their table is gone) until the block ends."""
    async with engine.begin() as conn:
        await conn.execute(text("ALTER TABLE status_events RENAME TO status_events_away"))
    try:
        yield
    finally:
        async with engine.begin() as conn:
            await conn.execute(text("ALTER TABLE status_events_away RENAME TO status_events"))


async def test_accepts_the_store_refuses_are_kept_and_written_once_it_takes_them(
    tracking: Tracking, engine: AsyncEngine
) -> None:
    events = [notification() for _ in range(5)]
    async with accept_records_refused(engine):
        for event in events:
            tracking.accepted(event)
        await asyncio.sleep(0.3)  # the writer tried, and failed, several times
        assert tracking.accept_backlog == len(events)
    for event in events:
        assert states_of(await status_of(tracking, event.id)) == {"notifier": "pending"}
    assert tracking.accept_backlog == 0


async def test_accepts_kept_for_a_refusing_store_are_bounded_dropping_the_oldest(
    engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    tracking = Tracking(engine, accept_backlog=100)
    await tracking.start()
    try:
        events = [notification() for _ in range(250)]
        async with accept_records_refused(engine):
            for event in events:
                tracking.accepted(event)
                assert tracking.accept_backlog <= 110
        assert any("dropped the oldest" in r.message for r in caplog.records)
        assert await tracking.status(events[0].id) is None
        kept = await status_of(tracking, events[-1].id)
        assert kept["accepted_at"] is not None
    finally:
        await tracking.close()


async def test_a_refusing_store_is_tried_less_and_less_often(
    tracking: Tracking, engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    async with accept_records_refused(engine):
        tracking.accepted(notification())
        await asyncio.sleep(1.6)
    failures = [r for r in caplog.records if "could not record accepted" in r.message]
    # Every 200 ms that would be 8 tries; backing off from 400 ms doubling, at most 5.
    assert 1 <= len(failures) <= 5


async def test_transitions_move_forward_with_a_timestamped_history(tracking: Tracking) -> None:
    event = notification()
    tracking.accepted(event)
    accepted = (await status_of(tracking, event.id))["accepted_at"]
    t = accepted + timedelta(milliseconds=10)
    retry_at = t + timedelta(seconds=5)
    await tracking.apply([step(event.id, "notifier", "processing", t, attempt=1)])
    assert states_of(await status_of(tracking, event.id)) == {"notifier": "processing"}
    await tracking.apply(
        [
            step(
                event.id,
                "notifier",
                "retrying",
                t + timedelta(milliseconds=1),
                attempt=1,
                next_attempt_at=retry_at,
                detail="ConnectionError: down",
            )
        ]
    )
    retrying = (await status_of(tracking, event.id))["services"]["notifier"]
    assert retrying["state"] == "retrying"
    assert retrying["attempt"] == 1
    assert retrying["next_attempt_at"] == retry_at
    assert retrying["detail"] == "ConnectionError: down"
    await tracking.apply(
        [
            step(event.id, "notifier", "processing", t + timedelta(seconds=5), attempt=2),
            step(event.id, "notifier", "succeeded", t + timedelta(seconds=6), attempt=2),
        ]
    )
    status = await status_of(tracking, event.id)
    notifier = status["services"]["notifier"]
    assert (notifier["state"], notifier["attempt"]) == ("succeeded", 2)
    assert notifier["updated_at"] == t + timedelta(seconds=6)
    assert history_states(status, "notifier") == [
        "pending",
        "processing",
        "retrying",
        "processing",
        "succeeded",
    ]
    times = [h["at"] for h in notifier["history"]]
    assert times == sorted(times) and times[0] == accepted


async def test_a_store_keyed_by_event_id_moves_to_numbered_events_keeping_every_status(
    fresh_engine: AsyncEngine,
) -> None:
    """Stores of earlier versions keyed history and states by event id; start-up moves them to
    the tables keyed by the event's number, every status as it was, and drops the old ones."""
    await migrate(fresh_engine, "gateway.tracking", steps(metadata)[:5])  # a store of version 5
    waiting, done = notification().id, dataset().id
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    ms = timedelta(milliseconds=1)
    async with fresh_engine.begin() as conn:
        await conn.execute(
            legacy_events.insert(),
            [
                {"event_id": waiting, "event_type": "notification.requested", "accepted_at": t0},
                {"event_id": done, "event_type": "dataset.submitted", "accepted_at": t0 + ms},
            ],
        )
        await conn.execute(
            legacy_states.insert(),
            [
                {
                    "event_id": waiting, "service": "notifier", "state": "pending",
                    "attempt": None, "updated_at": t0,
                },
                {
                    "event_id": done, "service": "processor", "state": "succeeded",
                    "attempt": 1, "updated_at": t0 + 3 * ms,
                },
            ],
        )  # fmt: skip
        await conn.execute(
            legacy_history.insert(),
            [
                {
                    "event_id": waiting, "service": "notifier", "state": "pending",
                    "at": t0, "attempt": None,
                },
                {
                    "event_id": done, "service": "processor", "state": "pending",
                    "at": t0 + ms, "attempt": None,
                },
                {
                    "event_id": done, "service": "processor", "state": "processing",
                    "at": t0 + 2 * ms, "attempt": 1,
                },
                {
                    "event_id": done, "service": "processor", "state": "succeeded",
                    "at": t0 + 3 * ms, "attempt": 1,
                },
            ],
        )  # fmt: skip

    tracking = Tracking(fresh_engine)
    await tracking.start()
    try:
        status = await status_of(tracking, waiting)
        assert status["accepted_at"] == t0
        assert states_of(status) == {"notifier": "pending"}
        assert history_states(status, "notifier") == ["pending"]
        status = await status_of(tracking, done)
        processor = status["services"]["processor"]
        assert (processor["state"], processor["attempt"]) == ("succeeded", 1)
        assert processor["updated_at"] == t0 + 3 * ms
        assert [(h["state"], h["at"]) for h in processor["history"]] == [
            ("pending", t0 + ms),
            ("processing", t0 + 2 * ms),
            ("succeeded", t0 + 3 * ms),
        ]
        async with fresh_engine.connect() as conn:
            tables = await conn.run_sync(lambda sync: set(inspect(sync).get_table_names()))
        assert not tables & {"tracking_events", "tracking_states", "tracking_history"}
        await tracking.apply([step(waiting, "notifier", "processing", t0 + 10 * ms, attempt=1)])
        status = await status_of(tracking, waiting)
        assert states_of(status) == {"notifier": "processing"}
        assert history_states(status, "notifier") == ["pending", "processing"]
    finally:
        await tracking.close()


async def test_one_report_of_several_transitions_leaves_the_newest_with_all_in_history(
    tracking: Tracking,
) -> None:
    event = dataset()
    t = await accepted_then(tracking, event)
    await tracking.apply(
        [
            step(event.id, "processor", "succeeded", t + timedelta(milliseconds=3), attempt=2),
            step(event.id, "processor", "processing", t, attempt=1),
            step(event.id, "processor", "retrying", t + timedelta(milliseconds=1), attempt=1),
            step(event.id, "processor", "processing", t + timedelta(milliseconds=2), attempt=2),
        ]
    )
    status = await status_of(tracking, event.id)
    processor = status["services"]["processor"]
    assert (processor["state"], processor["attempt"]) == ("succeeded", 2)
    assert processor["updated_at"] == t + timedelta(milliseconds=3)
    assert history_states(status, "processor") == [
        "pending",
        "processing",
        "retrying",
        "processing",
        "succeeded",
    ]


async def test_a_report_about_more_events_than_one_look_up_takes_is_applied_in_full(
    tracking: Tracking,
) -> None:
    # Event numbers are looked up in chunks of SEQ_LOOKUP_CHUNK ids; a report holds up to
    # MAX_TRANSITIONS, each of another event (accepted or not).
    at = datetime.now(UTC)
    ids = [f"many-{n:04d}" for n in range(MAX_TRANSITIONS)]
    for event_id in ids[::2]:
        tracking.accepted(notification().model_copy(update={"id": event_id}))
    await tracking.apply([step(event_id, "notifier", "succeeded", at) for event_id in ids])
    for event_id in (ids[0], ids[SEQ_LOOKUP_CHUNK - 1], ids[SEQ_LOOKUP_CHUNK], ids[-1]):
        assert states_of(await status_of(tracking, event_id)) == {"notifier": "succeeded"}


async def test_a_late_report_does_not_move_a_state_backwards(tracking: Tracking) -> None:
    event = notification()
    t = await accepted_then(tracking, event)
    await tracking.apply([step(event.id, "notifier", "succeeded", t + timedelta(seconds=1))])
    await tracking.apply([step(event.id, "notifier", "processing", t)])  # arrives late
    status = await status_of(tracking, event.id)
    assert states_of(status) == {"notifier": "succeeded"}
    assert history_states(status, "notifier") == ["pending", "processing", "succeeded"]


async def test_a_skipped_duplicate_does_not_hide_the_success_shown(tracking: Tracking) -> None:
    """A redelivery of an event handled already (its ack lost in a crash) is skipped: the
    event still succeeded, which its state keeps saying; the skip stays in the history."""
    event = notification()
    t = await accepted_then(tracking, event)
    await tracking.apply([step(event.id, "notifier", "succeeded", t)])
    await tracking.apply(
        [step(event.id, "notifier", "skipped_duplicate", t + timedelta(seconds=1))]
    )
    status = await status_of(tracking, event.id)
    assert states_of(status) == {"notifier": "succeeded"}
    assert history_states(status, "notifier") == ["pending", "succeeded", "skipped_duplicate"]


async def test_a_success_told_again_beside_a_skipped_duplicate_is_the_state(
    tracking: Tracking,
) -> None:
    # After a crash: the inbox tells `succeeded` again, stamped when it was recorded, and the
    # redelivery's skip, newer, is in the same report.
    event = notification()
    t = await accepted_then(tracking, event)
    await tracking.apply([step(event.id, "notifier", "processing", t)])
    await tracking.apply(
        [
            step(event.id, "notifier", "skipped_duplicate", t + timedelta(seconds=2)),
            step(event.id, "notifier", "succeeded", t + timedelta(milliseconds=5)),
        ]
    )
    assert states_of(await status_of(tracking, event.id)) == {"notifier": "succeeded"}


async def test_a_success_told_after_the_skip_of_its_redelivery_is_the_state(
    tracking: Tracking,
) -> None:
    # Another replica skipped the redelivery at once; the one that handled it first tells its
    # success, stamped earlier, only when it starts again.
    event = notification()
    t = await accepted_then(tracking, event)
    await tracking.apply(
        [step(event.id, "notifier", "skipped_duplicate", t + timedelta(seconds=5))]
    )
    await tracking.apply([step(event.id, "notifier", "succeeded", t)])
    assert states_of(await status_of(tracking, event.id)) == {"notifier": "succeeded"}


async def test_a_copy_started_beside_the_success_does_not_take_it_back(
    tracking: Tracking,
) -> None:
    # Two replicas got one event id at once: the second looked it up just before the first
    # recorded it, reports `processing` after the first's success, then skips.
    event = notification()
    t = await accepted_then(tracking, event)
    await tracking.apply([step(event.id, "notifier", "succeeded", t + timedelta(seconds=1))])
    await tracking.apply([step(event.id, "notifier", "processing", t + timedelta(seconds=2))])
    assert states_of(await status_of(tracking, event.id)) == {"notifier": "succeeded"}
    await tracking.apply(
        [
            step(event.id, "notifier", "succeeded", t + timedelta(seconds=1)),
            step(event.id, "notifier", "skipped_duplicate", t + timedelta(seconds=3)),
        ]
    )
    status = await status_of(tracking, event.id)
    assert states_of(status) == {"notifier": "succeeded"}
    assert history_states(status, "notifier") == [
        "pending", "succeeded", "processing", "skipped_duplicate"
    ]  # fmt: skip


@pytest.mark.parametrize("together", [False, True], ids=["apart", "in-one-report"])
async def test_a_success_told_after_a_copys_newer_processing_is_the_state(
    tracking: Tracking, together: bool
) -> None:
    event = notification()
    t = await accepted_then(tracking, event)
    copy = step(event.id, "notifier", "processing", t + timedelta(seconds=2))
    success = step(event.id, "notifier", "succeeded", t + timedelta(seconds=1))
    for report in [[success, copy]] if together else [[copy], [success]]:
        await tracking.apply(report)
    assert states_of(await status_of(tracking, event.id)) == {"notifier": "succeeded"}


async def test_a_letter_replayed_after_its_events_success_leaves_the_success_shown(
    tracking: Tracking,
) -> None:
    # A replay that stopped between publishing a letter and marking it replayed left it dead
    # though its event then succeeded; replayed again, the consumer skips it.
    event = notification()
    t = await accepted_then(tracking, event)
    await tracking.apply([step(event.id, "notifier", "succeeded", t)])
    await tracking.apply([step(event.id, "notifier", "replayed", t + timedelta(seconds=5))])
    await tracking.apply(
        [
            step(event.id, "notifier", "succeeded", t),
            step(event.id, "notifier", "skipped_duplicate", t + timedelta(seconds=6)),
        ]
    )
    assert states_of(await status_of(tracking, event.id)) == {"notifier": "succeeded"}


async def test_a_replay_of_a_dead_letter_shows_until_its_outcome(tracking: Tracking) -> None:
    event = notification()
    t = await accepted_then(tracking, event)
    await tracking.apply([step(event.id, "notifier", "dead_lettered", t)])
    await tracking.apply([step(event.id, "notifier", "replayed", t + timedelta(seconds=5))])
    assert states_of(await status_of(tracking, event.id)) == {"notifier": "replayed"}
    await tracking.apply([step(event.id, "notifier", "succeeded", t + timedelta(seconds=6))])
    assert states_of(await status_of(tracking, event.id)) == {"notifier": "succeeded"}


async def test_a_skipped_duplicate_is_the_state_where_no_success_was_told(
    tracking: Tracking,
) -> None:
    event = notification()
    t = await accepted_then(tracking, event)
    await tracking.apply([step(event.id, "notifier", "processing", t)])
    await tracking.apply(
        [step(event.id, "notifier", "skipped_duplicate", t + timedelta(seconds=1))]
    )
    assert states_of(await status_of(tracking, event.id)) == {"notifier": "skipped_duplicate"}


async def test_a_detail_no_store_takes_is_escaped_not_the_report_refused(
    tracking: Tracking,
) -> None:
    """An exception message may hold a NUL, which PostgreSQL refuses: the whole report (up to
    1,000 transitions of other events) would fail with it."""
    event, other = notification(), notification()
    t = datetime.now(UTC)
    await tracking.apply(
        [
            step(other.id, "notifier", "succeeded", t, attempt=1),
            step(event.id, "notifier", "retrying", t, attempt=1, detail="ValueError: a\x00b\n"),
        ]
    )
    assert states_of(await status_of(tracking, other.id)) == {"notifier": "succeeded"}
    retrying = (await status_of(tracking, event.id))["services"]["notifier"]
    assert retrying["detail"] == "ValueError: a\\x00b\n"


async def test_dead_lettered_keeps_reason_and_group(tracking: Tracking) -> None:
    event = notification()
    t = await accepted_then(tracking, event)
    await tracking.apply(
        [
            step(
                event.id,
                "notifier",
                "dead_lettered",
                t,
                attempt=3,
                reason="retries_exhausted",
                group="0123456789abcdef",
                detail="ConnectionError: down",
            )
        ]
    )
    notifier = (await status_of(tracking, event.id))["services"]["notifier"]
    assert notifier["state"] == "dead_lettered"
    assert (notifier["reason"], notifier["group"], notifier["attempt"]) == (
        "retries_exhausted",
        "0123456789abcdef",
        3,
    )
    assert notifier["history"][-1]["reason"] == "retries_exhausted"


async def test_reports_through_the_status_reported_handler_create_the_event(
    tracking: Tracking, engine: AsyncEngine
) -> None:
    """A derived event (never accepted by the gateway) gets its status from the reports alone."""
    event_id = derived_event_id("some-input", "dataset.processed")
    now = datetime.now(UTC)
    steps: tuple[State, ...] = ("processing", "succeeded")
    report = StatusReported(
        source="urn:courier:notifier",
        data=StatusReportedData(
            transitions=[
                Transition(
                    event_id=event_id,
                    event_type="dataset.processed",
                    service="notifier",
                    state=state,
                    at=now + timedelta(milliseconds=i),
                )
                for i, state in enumerate(steps)
            ]
        ),
    )
    await tracking.apply_reported(report)
    status = await status_of(tracking, event_id)
    assert status["type"] == "dataset.processed"
    assert status["accepted_at"] is None
    assert states_of(status) == {"notifier": "succeeded"}


async def test_a_report_that_overtakes_the_accept_record_is_kept(tracking: Tracking) -> None:
    """The consumer's report can reach the projection before the gateway wrote `pending`."""
    event = notification()
    t = datetime.now(UTC) + timedelta(seconds=1)
    await tracking.apply([step(event.id, "notifier", "processing", t)])
    tracking.accepted(event)  # written after the report, with an older timestamp
    status = await status_of(tracking, event.id)
    assert status["type"] == "notification.requested"
    assert status["accepted_at"] is not None
    assert states_of(status) == {"notifier": "processing"}


async def test_work_finished_before_the_gateway_noted_the_accept_is_not_hidden_by_pending(
    tracking: Tracking,
) -> None:
    """The gateway takes the accept time after the broker's confirm reached it; a fast consumer
    may have processed the event (with earlier timestamps) by then. `pending` is the weakest
    state: it must never hide what a service reported."""
    event = notification()
    before_confirm_reached_the_gateway = datetime.now(UTC)
    tracking.accepted(event)
    await status_of(tracking, event.id)  # `pending` written, stamped after the work's times
    await tracking.apply(
        [
            step(event.id, "notifier", "processing", before_confirm_reached_the_gateway),
            step(
                event.id,
                "notifier",
                "succeeded",
                before_confirm_reached_the_gateway + timedelta(microseconds=1),
            ),
        ]
    )
    assert states_of(await status_of(tracking, event.id)) == {"notifier": "succeeded"}


async def test_accepting_the_same_event_id_again_does_not_reset_its_status(
    tracking: Tracking,
) -> None:
    """A client that resends an event (same id) must not turn a processed event back into
    `pending` or change the time it was first accepted."""
    event = notification()
    tracking.accepted(event)
    first = await status_of(tracking, event.id)
    t = first["accepted_at"] + timedelta(milliseconds=10)
    await tracking.apply(
        [
            step(event.id, "notifier", "processing", t),
            step(event.id, "notifier", "succeeded", t + timedelta(milliseconds=1)),
        ]
    )
    tracking.accepted(event)  # the same id, accepted again later
    again = await status_of(tracking, event.id)
    assert again["accepted_at"] == first["accepted_at"]
    assert states_of(again) == {"notifier": "succeeded"}


RETENTION = timedelta(days=30)


async def test_an_event_quiet_for_the_retention_is_forgotten_with_its_history(
    tracking: Tracking,
) -> None:
    old = datetime.now(UTC) - RETENTION - timedelta(days=1)
    event = notification()
    tracking.accepted(event, old)
    await tracking.apply([step(event.id, "notifier", "succeeded", old + timedelta(seconds=1))])
    assert await tracking.status(event.id) is not None
    assert await tracking.prune(RETENTION) >= 1
    assert await tracking.status(event.id) is None


async def test_an_old_event_with_recent_activity_is_kept(tracking: Tracking) -> None:
    """Accepted long ago, but a service moved it lately (a replay, a slow retry)."""
    now = datetime.now(UTC)
    event = notification()
    tracking.accepted(event, now - RETENTION - timedelta(days=1))
    await tracking.apply([step(event.id, "notifier", "succeeded", now)])
    await tracking.prune(RETENTION)
    assert states_of(await status_of(tracking, event.id)) == {"notifier": "succeeded"}


async def test_a_recent_event_is_kept(tracking: Tracking) -> None:
    event = notification()
    tracking.accepted(event)
    await tracking.prune(RETENTION)
    assert states_of(await status_of(tracking, event.id)) == {"notifier": "pending"}


async def test_pruning_goes_in_batches_until_nothing_is_left(tracking: Tracking) -> None:
    old = datetime.now(UTC) - RETENTION - timedelta(days=1)
    events = [notification() for _ in range(5)]
    for event in events:
        tracking.accepted(event, old)
    await status_of(tracking, events[0].id)  # written
    assert await tracking.prune(RETENTION, batch=2) >= 5
    assert [await tracking.status(e.id) for e in events] == [None] * 5


async def test_old_results_go_in_batches_so_writes_made_meanwhile_do_not_wait_for_them(
    tracking: Tracking, engine: AsyncEngine
) -> None:
    # They went in one statement: 500,000 old results held SQLite's write lock for 2-3 s,
    # and the accept records, status reports and results waited that long.
    prefix = f"old-{uuid.uuid4().hex}-"
    at = datetime.now(UTC) - RETENTION - timedelta(days=1)
    old = [
        {
            "dataset_id": f"{prefix}{i}",
            "event_id": f"{prefix}{i}",
            "processed_at": at,
            "summary": {},
        }
        for i in range(30_000)
    ]
    async with engine.begin() as conn:
        await conn.execute(metadata.tables["dataset_results"].insert(), old)

    async def old_left() -> int:
        async with engine.connect() as conn:
            query = text("SELECT count(*) FROM dataset_results WHERE dataset_id LIKE :prefix")
            return int(await conn.scalar(query, {"prefix": f"{prefix}%"}) or 0)

    pruning = asyncio.create_task(tracking.prune(RETENTION))
    seen_after_a_write = set()
    while not pruning.done():
        event = notification()
        tracking.accepted(event)
        assert await tracking.status(event.id) is not None  # its accept record written first
        seen_after_a_write.add(await old_left())
    await pruning
    assert await old_left() == 0
    # Accept records were written while part of the old results was gone and part still there.
    assert seen_after_a_write - {0, len(old)}


async def test_old_results_are_found_by_an_index(tmp_path: Path) -> None:
    engine = open_store(store_url(None, tmp_path, "gateway"))
    try:
        await Tracking(engine).start()
        results = metadata.tables["dataset_results"]
        query = select(results.c.dataset_id).where(results.c.processed_at < datetime.now(UTC))
        async with engine.connect() as conn:
            plan = await query_plan(conn, query)
    finally:
        await engine.dispose()
    assert any("INDEX ix_dataset_results_processed" in step for step in plan), plan


async def test_a_store_of_an_earlier_version_gains_the_results_index(engine: AsyncEngine) -> None:
    await Tracking(engine).start()
    async with engine.begin() as conn:  # the store as version 8 left it
        await conn.exec_driver_sql("DROP INDEX ix_dataset_results_processed")
        await conn.exec_driver_sql(
            "UPDATE courier_migrations SET version = 8 WHERE component = 'gateway.tracking'"
        )
    await Tracking(engine).start()
    async with engine.connect() as conn:
        indexes = await conn.run_sync(lambda sync: inspect(sync).get_indexes("dataset_results"))
    assert "ix_dataset_results_processed" in {index["name"] for index in indexes}


async def test_a_prune_beside_a_status_write_leaves_that_event_and_its_new_state(
    module_database: str, tmp_path: Path
) -> None:
    """PostgreSQL runs them side by side (SQLite one write at a time): the event quiet for the
    retention moves while the prune runs, and must not be removed from under its new state."""
    engine = open_store(store_url(module_database, tmp_path, "gateway"))
    tracking = Tracking(engine)
    await tracking.start()
    try:
        old = datetime.now(UTC) - RETENTION - timedelta(days=1)
        event = notification()
        tracking.accepted(event, old)
        await tracking.apply([step(event.id, "notifier", "processing", old)])
        async with engine.begin() as conn:  # a status report being written
            moved = [step(event.id, "notifier", "succeeded", datetime.now(UTC))]
            await conn.run_sync(write_status, moved, ())
            pruning = asyncio.create_task(tracking.prune(RETENTION))
            await asyncio.wait({pruning}, timeout=3)
        await pruning
        assert states_of(await status_of(tracking, event.id)) == {"notifier": "succeeded"}
    finally:
        await tracking.close()
        await engine.dispose()


async def test_a_result_older_than_the_retention_is_forgotten(
    tracking: Tracking, engine: AsyncEngine
) -> None:
    submitted = dataset()
    processed = DatasetProcessed(
        id=derived_event_id(submitted.id, "dataset.processed"),
        time=datetime.now(UTC) - RETENTION - timedelta(days=1),
        data=DatasetProcessedData(
            dataset_id=submitted.id, name="prices", record_count=0, fields={}
        ),
    )
    await tracking.record_result(processed)
    assert await tracking.result(submitted.id) is not None
    await tracking.prune(RETENTION)
    assert await tracking.result(submitted.id) is None


async def test_results_are_recorded_once_and_served(
    tracking: Tracking, engine: AsyncEngine
) -> None:
    submitted = dataset()
    processed = DatasetProcessed(
        id=derived_event_id(submitted.id, "dataset.processed"),
        data=DatasetProcessedData(
            dataset_id=submitted.id,
            name="prices",
            record_count=1,
            fields={
                "price": FieldSummary(
                    kind="number", count=1, nulls=0, min=10.0, max=10.0, mean=10.0
                )
            },
        ),
    )
    for _ in range(2):  # a redelivered result changes nothing
        await tracking.record_result(processed)
    result = await tracking.result(submitted.id)
    assert result is not None
    assert result["dataset_id"] == submitted.id and result["event_id"] == processed.id
    assert result["record_count"] == 1 and result["name"] == "prices"
    assert result["fields"]["price"]["mean"] == 10
    assert result["processed_at"] == processed.time


async def test_a_results_notify_target_is_not_served(tracking: Tracking) -> None:
    """`GET /v1/datasets/{id}` answers whoever knows the event id, such as the receiver of the
    event's callback, which is told that id: the `notify` webhook's URL (whose path or query
    often holds a token) is not its to see, as the webhook body and the callback leave it out."""
    submitted = dataset()
    target = "webhook:https://hooks.example.com/datasets/t0ken?key=s3cret"
    processed = DatasetProcessed(
        id=derived_event_id(submitted.id, "dataset.processed"),
        data=DatasetProcessedData(
            dataset_id=submitted.id, name="prices", record_count=0, fields={}, notify=target
        ),
    )
    await tracking.record_result(processed)
    result = await tracking.result(submitted.id)
    assert result is not None and result["name"] == "prices"
    assert "notify" not in result


async def test_results_arriving_together_are_each_recorded_and_the_first_one_wins(
    tracking: Tracking,
) -> None:
    submitted = [dataset() for _ in range(5)]

    def processed(of: DatasetSubmitted, name: str) -> DatasetProcessed:
        return DatasetProcessed(
            id=derived_event_id(of.id, "dataset.processed"),
            data=DatasetProcessedData(dataset_id=of.id, name=name, record_count=0, fields={}),
        )

    await asyncio.gather(
        *(tracking.record_result(processed(s, "first")) for s in submitted),
        tracking.record_result(processed(submitted[0], "second")),
    )
    for each in submitted:
        result = await tracking.result(each.id)
        assert result is not None and result["name"] == "first"


async def test_each_result_of_a_report_is_recorded(tracking: Tracking) -> None:
    submitted = [dataset() for _ in range(3)]
    report = ResultsReported(
        source="urn:courier:processor",
        data=ResultsReportedData(
            results=[
                DatasetProcessed(
                    id=derived_event_id(s.id, "dataset.processed"),
                    data=DatasetProcessedData(
                        dataset_id=s.id, name=f"set {i}", record_count=0, fields={}
                    ),
                )
                for i, s in enumerate(submitted)
            ]
        ),
    )
    await tracking.record_results(report)
    for i, each in enumerate(submitted):
        result = await tracking.result(each.id)
        assert result is not None and result["name"] == f"set {i}"


async def test_a_cancel_request_is_noted_once(tracking: Tracking) -> None:
    event = notification()
    tracking.accepted(event)
    await status_of(tracking, event.id)
    await tracking.request_cancel(event.id)
    first = (await status_of(tracking, event.id))["cancel_requested_at"]
    assert first is not None
    await tracking.request_cancel(event.id)
    assert (await status_of(tracking, event.id))["cancel_requested_at"] == first


async def test_concurrent_reports_for_one_event_are_all_kept(tracking: Tracking) -> None:
    event = notification()
    tracking.accepted(event)
    t = (await status_of(tracking, event.id))["accepted_at"]
    await asyncio.gather(
        *(
            tracking.apply([step(event.id, "notifier", "processing", t + timedelta(seconds=i))])
            for i in range(1, 11)
        )
    )
    status = await status_of(tracking, event.id)
    notifier = status["services"]["notifier"]
    assert len(notifier["history"]) == 11
    assert notifier["updated_at"] == t + timedelta(seconds=10)


# --- The projection behind the gateway's routes (an in-process gateway, a real broker) ---------


@asynccontextmanager
async def running_gateway(
    namespace: Namespace, data_dir: Path, database_url: str | None, **overrides: Any
) -> AsyncIterator[httpx.AsyncClient]:
    settings = gateway_settings(namespace, data_dir, database_url=database_url, **overrides)
    clients = cast(AsyncGenerator[httpx.AsyncClient, None], gateway_client(settings))
    client = await anext(clients)
    try:
        yield client
    finally:
        await clients.aclose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str | None:
    """A gateway's store: a database of its own (a store serves one namespace)."""
    if request.param == "sqlite":
        return None
    url: str = request.getfixturevalue("postgres_database")
    return url


@pytest.mark.broker
async def test_the_gateway_serves_status_and_results_before_any_service_ran(
    namespace: Namespace, tmp_path: Path, database_url: str | None
) -> None:
    async with running_gateway(namespace, tmp_path, database_url) as client:
        assert (await client.get("/v1/events/no-such-event")).status_code == 404
        assert (await client.get("/v1/datasets/no-such-dataset")).status_code == 404

        submitted = await client.post(
            "/v1/events",
            json={"type": "dataset.submitted", "data": {"name": "d", "records": [{"a": 1}]}},
        )
        assert submitted.status_code == 202
        dataset_id = submitted.json()["id"]
        status = await client.get(f"/v1/events/{dataset_id}")
        assert status.status_code == 200
        body = status.json()
        assert body["type"] == "dataset.submitted"
        assert body["accepted_at"] is not None
        assert body["result_url"] == f"/v1/datasets/{dataset_id}"
        assert {s: i["state"] for s, i in body["services"].items()} == {"processor": "pending"}
        assert [h["state"] for h in body["services"]["processor"]["history"]] == ["pending"]

        not_yet = await client.get(f"/v1/datasets/{dataset_id}")  # no processor runs here
        assert not_yet.status_code == 202
        assert not_yet.json()["id"] == dataset_id
        assert not_yet.json()["services"]["processor"]["state"] == "pending"

        note = await client.post("/v1/events", json=NOTIFICATION)
        note_id = note.json()["id"]
        assert (await client.get(f"/v1/datasets/{note_id}")).status_code == 404
        assert "result_url" not in (await client.get(f"/v1/events/{note_id}")).json()


@pytest.mark.broker
async def test_an_accepted_event_has_a_status_at_once(
    namespace: Namespace, tmp_path: Path, database_url: str | None
) -> None:
    """The `Location` a 202 points to answers right away, every time (not 404 while the accept
    record waits for the group commit)."""
    async with running_gateway(namespace, tmp_path, database_url) as client:
        missing = []
        for _ in range(60):
            accepted = await client.post("/v1/events", json=NOTIFICATION)
            assert accepted.status_code == 202
            status = await client.get(accepted.headers["location"])
            if status.status_code != 200:
                missing.append(status.status_code)
        assert missing == []


@pytest.mark.broker
async def test_a_cancel_request_reaches_every_workers_control_queue(
    namespace: Namespace, tmp_path: Path
) -> None:
    async with running_gateway(namespace, tmp_path, None) as client:
        assert (await client.delete("/v1/events/no-such-event")).status_code == 404
        assert (await client.post("/v1/events/no-such-event:cancel")).status_code == 404
        event_id = (await client.post("/v1/events", json=NOTIFICATION)).json()["id"]

        async def known() -> None:  # (see test_an_accepted_event_has_a_status_at_once)
            assert (await client.get(f"/v1/events/{event_id}")).status_code == 200

        await eventually(known)
        cancelled = await client.delete(f"/v1/events/{event_id}")
        assert cancelled.status_code == 202, cancelled.text
        assert cancelled.json() == {
            "id": event_id,
            "status": "cancellation_requested",
            "status_url": f"/v1/events/{event_id}",
        }
        again = await client.post(f"/v1/events/{event_id}:cancel")
        assert again.status_code == 202  # asking twice is harmless
        status = (await client.get(f"/v1/events/{event_id}")).json()
        assert status["cancel_requested_at"] is not None
        for worker in sorted(WORKERS):
            messages = await take(namespace.amqp_url, control_queue(namespace.name, worker), 2)
            requests = [EVENT_ADAPTER.validate_json(m.body) for m in messages]
            assert all(isinstance(r, CancellationRequested) for r in requests)
            assert {r.data.event_id for r in requests if isinstance(r, CancellationRequested)} == {
                event_id
            }


@asynccontextmanager
async def events_table_away(tmp_path: Path) -> AsyncIterator[None]:
    """The gateway's SQLite store without its events table while inside (a store away)."""
    engine = open_store(store_url(None, tmp_path, "gateway"))
    try:
        async with engine.begin() as conn:
            await conn.execute(text("ALTER TABLE status_events RENAME TO away"))
        yield
        async with engine.begin() as conn:
            await conn.execute(text("ALTER TABLE away RENAME TO status_events"))
    finally:
        await engine.dispose()


@pytest.mark.broker
async def test_a_store_away_is_a_503_to_retry_not_a_500(
    namespace: Namespace, tmp_path: Path
) -> None:
    async with running_gateway(namespace, tmp_path, None) as client:
        event_id = (await client.post("/v1/events", json=NOTIFICATION)).json()["id"]
        async with events_table_away(tmp_path):
            for method, path in (
                ("GET", f"/v1/events/{event_id}"),
                ("GET", f"/v1/datasets/{event_id}"),
                ("DELETE", f"/v1/events/{event_id}"),
            ):
                response = await client.request(method, path)
                assert response.status_code == 503, (path, response.text)
                assert response.headers["retry-after"] == "5"
        assert (await client.get(f"/v1/events/{event_id}")).status_code == 200


@pytest.mark.broker
async def test_status_polls_during_a_store_outage_are_not_a_traceback_each(
    namespace: Namespace,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Clients poll `GET /v1/events/{id}`: each poll answered 503 logged an ERROR with the
    store's whole traceback, every poll of every client, for as long as the outage lasted."""
    monkeypatch.setattr(routes_module, "_store_failures_logged", Throttle(), raising=False)
    async with running_gateway(namespace, tmp_path, None) as client:
        event_id = (await client.post("/v1/events", json=NOTIFICATION)).json()["id"]
        async with events_table_away(tmp_path):
            for _ in range(30):
                assert (await client.get(f"/v1/events/{event_id}")).status_code == 503
    lines = [r for r in caplog.records if r.getMessage() == "the store failed a request"]
    assert len(lines) == 1


@pytest.mark.broker
async def test_a_status_report_waits_for_the_store_instead_of_spending_its_retries(
    namespace: Namespace, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # With a short delay tier it was dead-lettered within seconds of an outage: its events'
    # statuses and callbacks stayed behind until an operator replayed it.
    async with running_gateway(namespace, tmp_path, None, retry_delays=(1,)) as client:
        event_id = (await client.post("/v1/events", json=NOTIFICATION)).json()["id"]
        assert (await client.get(f"/v1/events/{event_id}")).status_code == 200  # written
        engine = open_store(store_url(None, tmp_path, "gateway"))
        publisher = Publisher(namespace.amqp_url)
        await publisher.connect()
        try:
            async with engine.begin() as conn:
                await conn.execute(text("ALTER TABLE status_history RENAME TO away"))
            done = step(event_id, "notifier", "succeeded", datetime.now(UTC))
            report = StatusReported(
                source="urn:courier:notifier", data=StatusReportedData(transitions=[done])
            )
            await publisher.publish_event(report, exchange=events_exchange(namespace.name))

            async def held() -> None:
                # Ingest goes on meanwhile: the gateway stays ready (the broker keeps events).
                assert any("holding the delivery" in r.message for r in caplog.records)

            await eventually(held, timeout=15)
            async with engine.begin() as conn:
                await conn.execute(text("ALTER TABLE away RENAME TO status_history"))
        finally:
            await publisher.close()
            await engine.dispose()

        async def applied() -> None:
            status = (await client.get(f"/v1/events/{event_id}")).json()
            assert states_of(status) == {"notifier": "succeeded"}

        await eventually(applied, timeout=15)
        letters = await client.get(
            "/v1/ops/count",
            params={"status": "any"},
            headers={"Authorization": f"Bearer {OPS_TOKEN}"},
        )
        assert letters.json()["count"] == 0
        assert not any("retrying later" in r.message for r in caplog.records)


@pytest.mark.broker
async def test_a_published_cancellation_is_202_when_its_note_cannot_be_written(
    namespace: Namespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The broker has the cancellation, and it takes effect: a 500 (or a 503) would ask for a
    # retry that changes nothing.
    async def store_away(self: Tracking, event_id: str) -> None:
        raise OperationalError("UPDATE", {}, ConnectionRefusedError("the store went away"))

    async with running_gateway(namespace, tmp_path, None) as client:
        event_id = (await client.post("/v1/events", json=NOTIFICATION)).json()["id"]
        monkeypatch.setattr(Tracking, "request_cancel", store_away)
        cancelled = await client.delete(f"/v1/events/{event_id}")
        assert cancelled.status_code == 202, cancelled.text
        for worker in sorted(WORKERS):
            [message] = await take(namespace.amqp_url, control_queue(namespace.name, worker), 1)
            request = EVENT_ADAPTER.validate_json(message.body)
            assert isinstance(request, CancellationRequested)
            assert request.data.event_id == event_id


@pytest.mark.broker
async def test_a_message_the_broker_dead_letters_shows_as_dead_lettered(
    namespace: Namespace, tmp_path: Path
) -> None:
    """A delivery that keeps crashing its consumer is dead-lettered by the broker itself
    (`x-delivery-limit`, reason `delivery_limit`); the status must not stay `pending` or
    `processing` for ever. Here a bare consumer returns the message until the broker gives up."""
    async with running_gateway(namespace, tmp_path, None, delivery_limit=1) as client:
        event_id = (await client.post("/v1/events", json=NOTIFICATION)).json()["id"]
        returned = 0
        connection = await aio_pika.connect(namespace.amqp_url)
        async with connection:
            channel = await connection.channel()
            queue = await channel.get_queue(work_queue(namespace.name, "notifier"))
            while (message := await queue.get(fail=False)) is not None or returned == 0:
                if message is not None:
                    await message.nack(requeue=True)
                    returned += 1

        async def letter_stored() -> None:
            response = await client.get(
                "/v1/ops/dead-letters",
                params={"service": "notifier"},
                headers={"Authorization": f"Bearer {OPS_TOKEN}"},
            )
            letters = [(i["event_id"], i["reason"]) for i in response.json()["items"]]
            assert letters == [(event_id, "delivery_limit")]

        await eventually(letter_stored)

        async def dead_lettered() -> None:
            notifier = (await client.get(f"/v1/events/{event_id}")).json()["services"]["notifier"]
            assert (notifier["state"], notifier["reason"]) == ("dead_lettered", "delivery_limit")

        await eventually(dead_lettered, timeout=3)


@pytest.mark.broker
async def test_a_letter_a_consumer_made_shows_as_dead_lettered_from_the_letter_alone(
    namespace: Namespace, tmp_path: Path
) -> None:
    """The consumer acks once its letter is confirmed; it reports nothing more that a crash
    could take. The gateway shows the failure from the letter, as the consumer saw it: its
    attempt, reason, group, detail and time to the microsecond."""
    async with running_gateway(namespace, tmp_path, None) as client:
        event_id = (await client.post("/v1/events", json=NOTIFICATION)).json()["id"]
        failure = _failure(ValueError("the recipient 'r@example.org' bounced"), attempt=3)
        headers = failure.dead_letter_headers(
            {},
            reason="retries_exhausted",
            service="notifier",
            queue=work_queue(namespace.name, "notifier"),
            event_id=event_id,
            event_type="notification.requested",
        )
        connection = await aio_pika.connect(namespace.amqp_url)
        async with connection:
            channel = await connection.channel()
            await channel.default_exchange.publish(
                aio_pika.Message(b"{}", headers=headers, message_id=event_id),
                routing_key=dead_letter_queue(namespace.name, "notifier"),
            )

        async def dead_lettered() -> None:
            shown = (await client.get(f"/v1/events/{event_id}")).json()
            notifier = shown["services"]["notifier"]
            assert notifier["state"] == "dead_lettered"
            assert (notifier["attempt"], notifier["reason"]) == (3, "retries_exhausted")
            assert notifier["group"] == group_key(headers[FINGERPRINT], headers[EXCEPTION_MESSAGE])
            assert notifier["detail"] == failure.summary()
            assert datetime.fromisoformat(notifier["updated_at"]) == failure.at

        await eventually(dead_lettered, timeout=5)


def _failure(exc: Exception, attempt: int) -> Failure:
    try:
        raise exc
    except ValueError as raised:
        return Failure.of(raised, attempt)
