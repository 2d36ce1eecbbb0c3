"""How a store of the status projection reaches the current schema (`tracking.py`).

Stores of earlier versions keyed the projection's three tables by event id (`tracking_*`).
Event ids are random (clients' UUIDs), so every event's history and state rows landed on B-tree
pages of their own, and each status report dirtied a page per event and table: about four times
the write cost of keys in arrival order. The current tables (`status_*`) number events as they
arrive (`seq`) and key history and states by that number; only the event table keeps an index
by id.

The steps replay the schema's history from the start, so a new store and an old one go through
the same steps (a new one creates the old tables empty, then moves to the new ones).
"""

from __future__ import annotations

from sqlalchemy import (
    Column,
    Connection,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    insert,
    select,
    text,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from services.messaging.store import Migration, add_missing_columns

# --- the tables of versions 1-5, as they were ---------------------------------------------------

legacy = MetaData()
legacy_events = Table(
    "tracking_events",
    legacy,
    Column("event_id", String(128), primary_key=True),
    Column("event_type", String(128), nullable=True),
    Column("accepted_at", DateTime(timezone=True), nullable=True),
    Column("cancel_requested_at", DateTime(timezone=True), nullable=True),
    Column("callback_url", String(2048), nullable=True),
    Column("callback_outcome", String(16), nullable=True),
    Column("callback_settled_at", DateTime(timezone=True), nullable=True),
    Index(
        "ix_tracking_callbacks_open",
        "event_id",
        sqlite_where=text("callback_url IS NOT NULL AND callback_outcome IS NULL"),
        postgresql_where=text("callback_url IS NOT NULL AND callback_outcome IS NULL"),
    ),
    Index("ix_tracking_events_accepted", "accepted_at"),
)
legacy_states = Table(
    "tracking_states",
    legacy,
    Column("event_id", String(128), primary_key=True),
    Column("service", String(64), primary_key=True),
    Column("state", String(32), nullable=False),
    Column("attempt", Integer, nullable=True),
    Column("next_attempt_at", DateTime(timezone=True), nullable=True),
    Column("reason", String(64), nullable=True),
    Column("group_key", String(64), nullable=True),
    Column("detail", Text, nullable=True),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)
legacy_history = Table(
    "tracking_history",
    legacy,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("event_id", String(128), nullable=False),
    Column("service", String(64), nullable=False),
    Column("state", String(32), nullable=False),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("attempt", Integer, nullable=True),
    Column("reason", String(64), nullable=True),
    Column("detail", Text, nullable=True),
    Index("ux_tracking_history", "event_id", "service", "state", "at", unique=True),
)
LEGACY_CALLBACK_COLUMNS = ("callback_url", "callback_outcome", "callback_settled_at")


def steps(current: MetaData) -> list[Migration]:
    """Versions 1-9 of the `gateway.tracking` component; `current` holds today's tables."""

    async def create(conn: AsyncConnection) -> None:
        await conn.run_sync(legacy.create_all)

    async def unique_history(conn: AsyncConnection) -> None:
        await conn.run_sync(_create_indexes, legacy_history)

    async def callback_columns(conn: AsyncConnection) -> None:
        await conn.run_sync(_add_callback_columns)

    async def accepted_index(conn: AsyncConnection) -> None:
        await conn.run_sync(_create_indexes, legacy_events)

    async def drop_redundant_history_index(conn: AsyncConnection) -> None:
        await conn.execute(text("DROP INDEX IF EXISTS ix_tracking_history_event"))

    async def sequential_keys(conn: AsyncConnection) -> None:
        await conn.run_sync(_move_to_sequential_keys, current)

    async def results_index(conn: AsyncConnection) -> None:
        await conn.run_sync(_create_indexes, current.tables["dataset_results"])

    def events_column(name: str) -> Migration:
        """A nullable column of `status_events` (a store created after it has it already:
        `create_all` made the tables as they are now)."""

        async def add(conn: AsyncConnection) -> None:
            await conn.run_sync(add_missing_columns, current.tables["status_events"], [name])

        return add

    return [
        create,
        unique_history,
        callback_columns,
        accepted_index,
        drop_redundant_history_index,
        sequential_keys,
        events_column("noted_at"),  # 7: when a callback URL was noted
        # 8: the correlation id a callback carries on (rows noted before it have none: their
        # callbacks go without one, as before)
        events_column("callback_correlation"),
        results_index,  # 9: what retention looks for results by
    ]


def _create_indexes(sync: Connection, table: Table) -> None:
    for index in table.indexes:
        index.create(sync, checkfirst=True)


def _add_callback_columns(sync: Connection) -> None:
    """Version 3: nullable columns without a default, on SQLite and PostgreSQL alike."""
    add_missing_columns(sync, legacy_events, LEGACY_CALLBACK_COLUMNS)
    _create_indexes(sync, legacy_events)


def _move_to_sequential_keys(sync: Connection, current: MetaData) -> None:
    """Version 6: the `status_*` tables, filled from the `tracking_*` ones, which go. Events are
    numbered in the order they were accepted; history keeps its order."""
    current.create_all(sync)
    events, states, history = (
        current.tables[name] for name in ("status_events", "status_states", "status_history")
    )
    moved = [c.name for c in legacy_events.columns]
    sync.execute(
        insert(events).from_select(
            moved,
            select(*legacy_events.columns).order_by(
                legacy_events.c.accepted_at, legacy_events.c.event_id
            ),
        )
    )
    numbered = events.c.event_id == legacy_states.c.event_id
    state_columns = [c for c in legacy_states.columns if c.name != "event_id"]
    sync.execute(
        insert(states).from_select(
            ["event_seq", *(c.name for c in state_columns)],
            select(events.c.seq, *state_columns).join_from(legacy_states, events, numbered),
        )
    )
    step_columns = [c for c in legacy_history.columns if c.name not in ("id", "event_id")]
    sync.execute(
        insert(history).from_select(
            ["event_seq", *(c.name for c in step_columns)],
            select(events.c.seq, *step_columns)
            .join_from(legacy_history, events, events.c.event_id == legacy_history.c.event_id)
            .order_by(legacy_history.c.id),
        )
    )
    for table in (legacy_history, legacy_states, legacy_events):
        table.drop(sync)
