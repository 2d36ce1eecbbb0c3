"""The inbox on both stores: SQLite (the default) and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from contracts.envelope import derived_event_id
from contracts.events import (
    DatasetProcessed,
    DatasetProcessedData,
    NotificationRequested,
    NotificationRequestedData,
)
from services.messaging.inbox import Cancelled, Handled, Inbox
from services.messaging.store import open_store, store_url


@pytest.fixture(params=["sqlite", "postgresql"])
async def engine(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    if request.param == "sqlite":
        url = store_url(None, tmp_path, "svc")
    else:
        url = store_url(request.getfixturevalue("postgres_database"), tmp_path, "svc")
    store = open_store(url)
    yield store
    await store.dispose()


@pytest.fixture
async def inbox(engine: AsyncEngine) -> AsyncIterator[Inbox]:
    box = Inbox(engine, "svc")
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
        assert await inbox.record(conn, event, [follow_up])
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
        *(inbox.remember(e, [follow_up] if e is events[0] else []) for e in events)
    )
    assert remembered == [True] * 5
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
    assert list(remembered) == [False, True]
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
