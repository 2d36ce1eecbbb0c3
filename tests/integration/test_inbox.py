"""The inbox on both stores: SQLite (the default) and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import pytest
from sqlalchemy import Column, Connection, DateTime, MetaData, String, Table, inspect, text, update
from sqlalchemy.ext.asyncio import AsyncEngine

from contracts.envelope import derived_event_id
from contracts.events import (
    DatasetProcessed,
    DatasetProcessedData,
    NotificationRequested,
    NotificationRequestedData,
)
from services.messaging.inbox import Cancelled, Handled, Inbox
from services.messaging.publisher import event_body
from services.messaging.status import Outcome
from services.messaging.store import open_store, store_unavailable, store_url


@pytest.fixture(params=["sqlite", "postgresql"])
async def engine(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    if request.param == "sqlite":
        url = store_url(None, tmp_path, "svc")
    else:
        url = store_url(request.getfixturevalue("postgres_database"), tmp_path, "svc")
    store = open_store(url)
    yield store
    await store.dispose()


REPORTED = {"notification.requested"}  # `an_event`'s type: its outcomes owe reports


@pytest.fixture
async def inbox(engine: AsyncEngine) -> AsyncIterator[Inbox]:
    box = Inbox(engine, "svc", reported_types=REPORTED)
    await box.start()
    yield box
    box.close()


def an_event() -> NotificationRequested:
    return NotificationRequested(data=NotificationRequestedData(recipient="r", subject="s"))


async def test_an_unknown_event_is_not_in_the_inbox(inbox: Inbox) -> None:
    assert await inbox.lookup("nope") is None


async def test_a_recorded_event_is_found_with_its_follow_ups(inbox: Inbox) -> None:
    event = an_event()
    follow_up = DatasetProcessed(
        id=derived_event_id(event.id, "dataset.processed"),
        data=DatasetProcessedData(dataset_id=event.id, name="n", record_count=0, fields={}),
    )
    async with inbox.transaction() as conn:
        assert await inbox.record(conn, event, [event_body(follow_up)])
    handled = await inbox.lookup(event.id)
    assert isinstance(handled, Handled)
    assert handled.follow_ups == (follow_up,)


async def test_look_ups_made_together_each_get_their_own_answer(inbox: Inbox) -> None:
    handled, cancelled, unknown = an_event(), an_event(), an_event()
    async with inbox.transaction() as conn:
        await inbox.record(conn, handled, [])
        await inbox.cancel(conn, cancelled.id)
    found = await asyncio.gather(
        *(inbox.lookup(e.id) for e in (handled, cancelled, unknown, handled))
    )
    assert [type(f) for f in found] == [Handled, Cancelled, type(None), Handled]
    assert found[0] is not None and found[0].event_id == handled.id


async def test_events_remembered_together_are_committed_with_their_follow_ups(
    inbox: Inbox,
) -> None:
    events = [an_event() for _ in range(5)]
    follow_up = DatasetProcessed(
        id=derived_event_id(events[0].id, "dataset.processed"),
        data=DatasetProcessedData(dataset_id=events[0].id, name="n", record_count=0, fields={}),
    )
    remembered = await asyncio.gather(
        *(inbox.remember(e, [event_body(follow_up)] if e is events[0] else []) for e in events)
    )
    assert remembered[0] is not None and remembered == [remembered[0]] * 5  # one commit
    found = [await inbox.lookup(e.id) for e in events]
    assert all(isinstance(f, Handled) for f in found)
    assert [f.follow_ups for f in found if isinstance(f, Handled)][:2] == [(follow_up,), ()]


async def test_remembering_an_event_handled_meanwhile_elsewhere_refuses_only_that_one(
    inbox: Inbox,
) -> None:
    elsewhere, ours = an_event(), an_event()
    async with inbox.transaction() as conn:  # another process recorded it in the meantime
        assert await inbox.record(conn, elsewhere, [])
    remembered = await asyncio.gather(inbox.remember(elsewhere, []), inbox.remember(ours, []))
    assert (remembered[0], type(remembered[1])) == (None, datetime)
    assert isinstance(await inbox.lookup(ours.id), Handled)


async def test_recording_twice_is_refused_and_rolls_back_only_the_duplicate(
    inbox: Inbox, engine: AsyncEngine
) -> None:
    async with engine.begin() as conn:
        await conn.execute(text("CREATE TABLE effects (event_id VARCHAR(64))"))
    event = an_event()
    for _ in range(2):
        async with inbox.transaction() as conn:
            await conn.execute(text("INSERT INTO effects VALUES (:id)"), {"id": event.id})
            if not await inbox.record(conn, event, []):
                await conn.rollback()
    async with engine.connect() as conn:
        assert (await conn.execute(text("SELECT count(*) FROM effects"))).scalar() == 1


async def test_starting_again_keeps_the_records(inbox: Inbox, engine: AsyncEngine) -> None:
    event = an_event()
    async with inbox.transaction() as conn:
        await inbox.record(conn, event, [])
    again = Inbox(engine, "svc")
    await again.start()
    assert await again.lookup(event.id) is not None


async def test_old_records_are_pruned(inbox: Inbox, engine: AsyncEngine) -> None:
    event = an_event()
    async with inbox.transaction() as conn:
        await inbox.record(conn, event, [])
    assert await inbox.prune(timedelta(hours=1)) == 0
    assert await inbox.prune(timedelta(seconds=-1)) == 1
    assert await inbox.lookup(event.id) is None


async def test_a_large_prune_commits_in_batches_so_records_made_meanwhile_do_not_wait_for_it(
    inbox: Inbox, engine: AsyncEngine
) -> None:
    # The hourly prune deleted every old record in one transaction: on SQLite it held the
    # file's write lock throughout (3 million records: 24 s), and the records of the events
    # handled meanwhile failed as `database is locked` after the 10 s busy timeout.
    month_ago = datetime.now(UTC) - timedelta(days=30)
    old = [
        {"event_id": f"old-{i}", "event_type": "t", "handled_at": month_ago} for i in range(30_000)
    ]
    async with engine.begin() as conn:
        await conn.execute(_records.insert(), old)

    async def old_left() -> int:
        async with engine.connect() as conn:
            query = text("SELECT count(*) FROM svc_inbox WHERE event_id LIKE 'old-%'")
            return int(await conn.scalar(query) or 0)

    pruning = asyncio.create_task(inbox.prune(timedelta(days=7)))
    seen_after_a_record = set()
    while not pruning.done():
        assert await inbox.remember(an_event(), []) is not None
        seen_after_a_record.add(await old_left())
    assert await pruning == len(old)
    assert await old_left() == 0
    # Records were committed while part of the old ones was gone and part still there.
    assert seen_after_a_record - {0, len(old)}


async def test_a_cancellation_is_durable_and_recorded_once(
    inbox: Inbox, engine: AsyncEngine
) -> None:
    event = an_event()
    async with inbox.transaction() as conn:
        assert await inbox.cancel(conn, event.id)
    async with inbox.transaction() as conn:
        assert not await inbox.cancel(conn, event.id)
    again = Inbox(engine, "svc")
    await again.start()
    assert isinstance(await again.lookup(event.id), Cancelled)


# --- records as status reports ------------------------------------------------------------------

_records = Table(
    "svc_inbox",
    MetaData(),
    Column("event_id", String(128), primary_key=True),
    Column("event_type", String(128)),
    Column("handled_at", DateTime(timezone=True)),
)


async def handled_at(engine: AsyncEngine, times: dict[str, datetime]) -> None:
    """Set when records were made (times the test controls)."""
    async with engine.begin() as conn:
        for event_id, at in times.items():
            await conn.execute(
                update(_records).where(_records.c.event_id == event_id).values(handled_at=at)
            )


def told(outcomes: list[Outcome]) -> list[dict[str, str]]:
    """The transitions of a status report that told `outcomes`."""
    return [{"event_id": o.event_id, "state": o.state} for o in outcomes]


async def test_a_record_owes_its_report_with_its_time_and_the_attempt_that_succeeded(
    inbox: Inbox,
) -> None:
    remembered, in_transaction = an_event(), an_event()
    at = await inbox.remember(remembered, [], attempt=3)
    async with inbox.transaction() as conn:
        at_too = await inbox.record(conn, in_transaction, [], attempt=2)
    assert at is not None and at_too is not None
    assert await inbox.unreported(None, 10) == sorted(
        [
            Outcome(remembered.id, remembered.type, "succeeded", at, 3),
            Outcome(in_transaction.id, in_transaction.type, "succeeded", at_too, 2),
        ],
        key=lambda outcome: outcome.at,
    )


async def test_a_reported_outcome_is_owed_no_more(inbox: Inbox) -> None:
    reported, not_yet = an_event(), an_event()
    await inbox.remember(reported, [])
    await inbox.remember(not_yet, [])
    owed = await inbox.unreported(None, 10)
    await inbox.reported(told([o for o in owed if o.event_id == reported.id]))
    assert [o.event_id for o in await inbox.unreported(None, 10)] == [not_yet.id]


async def test_a_report_of_another_state_settles_no_outcome(inbox: Inbox) -> None:
    event = an_event()
    await inbox.remember(event, [])
    other_states = ["processing", "cancelled"]  # a record's outcome is `succeeded`
    await inbox.reported([{"event_id": event.id, "state": state} for state in other_states])
    assert [o.event_id for o in await inbox.unreported(None, 10)] == [event.id]


async def test_owed_outcomes_come_oldest_first_settled_before_the_moment_asked_at_most_the_limit(
    inbox: Inbox, engine: AsyncEngine
) -> None:
    events = [an_event() for _ in range(4)]
    for event in events:
        await inbox.remember(event, [])
    t = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    await handled_at(engine, {e.id: t - timedelta(seconds=i) for i, e in enumerate(events)})
    # events[3] is the oldest, events[0] the newest, settled at t: not before it.
    owed = await inbox.unreported(t, 2)
    assert [(o.event_id, o.at) for o in owed] == [
        (events[3].id, t - timedelta(seconds=3)),
        (events[2].id, t - timedelta(seconds=2)),
    ]
    assert len(await inbox.unreported(t, 10)) == 3


async def test_records_of_types_whose_outcomes_are_not_reported_owe_nothing(
    engine: AsyncEngine,
) -> None:
    inbox = Inbox(engine, "svc", reported_types={"dataset.submitted"})
    await inbox.start()
    event = an_event()  # a notification.requested
    await inbox.remember(event, [])
    async with inbox.transaction() as conn:
        await inbox.cancel(conn, event.id)
    assert await inbox.unreported(None, 10) == []
    inbox.close()


async def test_an_empty_inbox_owes_nothing(inbox: Inbox) -> None:
    assert await inbox.unreported(None, 10) == []


async def test_a_store_from_before_outcomes_gains_their_columns_and_old_records_owe_nothing(
    inbox: Inbox, engine: AsyncEngine
) -> None:
    before, cancelled_before = an_event(), an_event()
    async with engine.begin() as conn:  # the store as the version before outcomes left it
        await conn.execute(text("DROP INDEX ix_svc_inbox_owed"))
        await conn.execute(text("DROP INDEX ix_svc_cancellations_owed"))
        for table, column in [
            ("svc_inbox", "attempt"),
            ("svc_inbox", "unreported"),
            ("svc_cancellations", "skipped_at"),
            ("svc_cancellations", "event_type"),
            ("svc_cancellations", "unreported"),
        ]:
            await conn.execute(text(f"ALTER TABLE {table} DROP COLUMN {column}"))
        await conn.execute(
            text("UPDATE courier_migrations SET version = 2 WHERE component = 'svc.inbox'")
        )
    async with inbox.transaction() as conn:
        await conn.execute(
            text(
                "INSERT INTO svc_inbox (event_id, event_type, handled_at) VALUES (:id, :type, :at)"
            ),
            {"id": before.id, "type": before.type, "at": datetime.now(UTC)},
        )
        await inbox.cancel(conn, cancelled_before.id)
    upgraded = Inbox(engine, "svc", reported_types=REPORTED)
    await upgraded.start()
    indexes = await upgraded_indexes(engine)
    assert {"ix_svc_inbox_owed", "ix_svc_cancellations_owed"} <= indexes
    after = an_event()
    await upgraded.remember(after, [], attempt=1)
    await upgraded.skipped(cancelled_before)  # after the record: last
    owed = await upgraded.unreported(None, 10)
    # The old record's report went by the earlier rule: not owed.
    assert [(o.event_id, o.state) for o in owed] == [
        (after.id, "succeeded"),
        (cancelled_before.id, "cancelled"),
    ]
    assert isinstance(await upgraded.lookup(before.id), Handled)
    upgraded.close()


async def test_a_store_from_before_owed_outcomes_owes_what_its_restart_would_have_told(
    inbox: Inbox, engine: AsyncEngine
) -> None:
    """A version before owed outcomes told again, at each start, the outcomes settled within
    COURIER_STATUS_RECOVERY_SECONDS of its newest one (the reports a crash may have taken).
    Killed, then started as the upgrade, it no longer would: those outcomes owe their reports
    (the gateway keeps a repeated report once), the ones before the window do not."""
    recent, old, cancelled = an_event(), an_event(), an_event()
    async with engine.begin() as conn:  # the store as the version before owed outcomes left it
        await conn.execute(text("DROP INDEX ix_svc_inbox_owed"))
        await conn.execute(text("DROP INDEX ix_svc_cancellations_owed"))
        for table in ("svc_inbox", "svc_cancellations"):
            await conn.execute(text(f"ALTER TABLE {table} DROP COLUMN unreported"))
        await conn.execute(
            text("UPDATE courier_migrations SET version = 5 WHERE component = 'svc.inbox'")
        )
    now = datetime.now(UTC)
    async with inbox.transaction() as conn:
        for event, at in ((recent, now), (old, now - timedelta(hours=1))):
            await conn.execute(
                text(
                    "INSERT INTO svc_inbox (event_id, event_type, handled_at, attempt) "
                    "VALUES (:id, :type, :at, 1)"
                ),
                {"id": event.id, "type": event.type, "at": at},
            )
        await conn.execute(
            text(
                "INSERT INTO svc_cancellations (event_id, cancelled_at, skipped_at, event_type) "
                "VALUES (:id, :at, :at, :type)"
            ),
            {"id": cancelled.id, "type": cancelled.type, "at": now - timedelta(seconds=5)},
        )
    # Killed before its last reports went out, and started again as the upgrade.
    upgraded = Inbox(engine, "svc", reported_types=REPORTED)
    await upgraded.start()
    owed = await upgraded.unreported(None, 10)
    assert [(o.event_id, o.state, o.attempt) for o in owed] == [
        (cancelled.id, "cancelled", None),
        (recent.id, "succeeded", 1),
    ]
    upgraded.close()


async def upgraded_indexes(engine: AsyncEngine) -> set[str]:
    def names(sync: Connection) -> set[str]:
        found = inspect(sync)
        tables = ("svc_inbox", "svc_cancellations")
        return {str(i["name"]) for table in tables for i in found.get_indexes(table)}

    async with engine.connect() as conn:
        return await conn.run_sync(names)


async def test_a_skipped_cancellation_owes_its_report_stamped_once(inbox: Inbox) -> None:
    cancelled, never_delivered = an_event(), an_event()
    async with inbox.transaction() as conn:
        await inbox.cancel(conn, cancelled.id)
        await inbox.cancel(conn, never_delivered.id)
    at = await inbox.skipped(cancelled)
    assert await inbox.skipped(cancelled) == at  # a redelivery skipped again: same report
    owed = await inbox.unreported(None, 10)
    assert owed == [Outcome(cancelled.id, cancelled.type, "cancelled", at, None)]
    await inbox.reported(told(owed))
    assert await inbox.unreported(None, 10) == []


async def test_skips_noted_together_each_get_their_own_time(inbox: Inbox) -> None:
    events = [an_event() for _ in range(3)]
    async with inbox.transaction() as conn:
        for event in events:
            await inbox.cancel(conn, event.id)
    earlier = await inbox.skipped(events[0])
    times = await asyncio.gather(*(inbox.skipped(event) for event in events))
    assert times[0] == earlier
    assert times[1] == times[2] > earlier  # one commit for the two new ones


async def test_owed_outcomes_of_either_kind_come_in_the_order_they_were_settled(
    inbox: Inbox, engine: AsyncEngine
) -> None:
    handled, cancelled = an_event(), an_event()
    await inbox.remember(handled, [])
    async with inbox.transaction() as conn:
        await inbox.cancel(conn, cancelled.id)
    await inbox.skipped(cancelled)
    await handled_at(engine, {handled.id: datetime.now(UTC) + timedelta(seconds=5)})
    owed = await inbox.unreported(None, 10)
    assert [(o.event_id, o.state) for o in owed] == [
        (cancelled.id, "cancelled"),
        (handled.id, "succeeded"),
    ]
    assert [o.event_id for o in await inbox.unreported(None, 1)] == [cancelled.id]


async def test_a_database_closed_to_connections_is_an_outage_not_a_failure(
    postgres_url: str, postgres_database: str, tmp_path: Path
) -> None:
    """As for maintenance: the inbox's look-ups fail, and the consumer must hold its
    deliveries (an outage), not spend their attempts on returns to the queue."""
    store = open_store(store_url(postgres_database, tmp_path, "svc"))
    box = Inbox(store, "svc")
    await box.start()
    name = postgres_database.rsplit("/", 1)[1]
    admin = await asyncpg.connect(postgres_url)
    try:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
        )
        with pytest.raises(Exception, match="not currently accepting connections") as refused:
            await box.lookup(an_event().id)
        assert store_unavailable(refused.value)
    finally:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await admin.close()
        box.close()
        await store.dispose()
