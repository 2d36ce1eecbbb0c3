"""The inbox: which events this service has handled, so a redelivery has no second effect.

At-least-once delivery redelivers a message whose ack was lost (a crash between effect and
ack). The consumer records the event id in the service's store once the handler succeeded,
in the same transaction as the handler's own state when the handler has state. A redelivered
event is then recognised, its recorded follow-up events are published again (their ids are
derived from the input, so downstream dedups them too) and it is acked without a second effect.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from pydantic import TypeAdapter
from sqlalchemy import (
    Column,
    Connection,
    DateTime,
    LargeBinary,
    MetaData,
    String,
    Table,
    delete,
    select,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql.dml import Insert

from contracts.envelope import Envelope
from contracts.events import Event
from services.messaging.batching import Batcher
from services.messaging.store import BatchRunner, Migration, insert_for, migrate

_FOLLOW_UPS: TypeAdapter[list[Event]] = TypeAdapter(list[Event])


def _insert_new(dialect: str, table: Table) -> Insert:
    """INSERT that skips rows whose key exists, returning the keys it did insert."""
    statement: Insert = (
        insert_for(dialect)(table)
        .on_conflict_do_nothing(index_elements=["event_id"])
        .returning(table.c.event_id)
    )
    return statement


@dataclass(frozen=True)
class Handled:
    event_id: str
    handled_at: datetime
    follow_ups: tuple[Envelope, ...]


@dataclass(frozen=True)
class Cancelled:
    event_id: str
    cancelled_at: datetime


class Inbox:
    def __init__(self, engine: AsyncEngine, service: str) -> None:
        self._engine = engine
        self._runner = BatchRunner(engine)
        # Concurrent handlers share round trips: one query answers many lookups, and one
        # transaction commits many records (group commit).
        self._lookups: Batcher[str, Handled | Cancelled | None] = Batcher(self._lookup_many)
        self._records: Batcher[tuple[Envelope, bytes | None], bool] = Batcher(self._record_many)
        self._component = f"{service}.inbox"
        self._table = Table(
            f"{service}_inbox",
            MetaData(),
            Column("event_id", String(128), primary_key=True),
            Column("event_type", String(128), nullable=False),
            Column("handled_at", DateTime(timezone=True), nullable=False, index=True),
            Column("follow_ups", LargeBinary, nullable=True),
        )
        # Cancellations are durable: they survive restarts, unlike an in-memory revoke list.
        self._cancellations = Table(
            f"{service}_cancellations",
            self._table.metadata,
            Column("event_id", String(128), primary_key=True),
            Column("cancelled_at", DateTime(timezone=True), nullable=False, index=True),
        )

    async def start(self) -> None:
        def creating(table: Table) -> Migration:
            async def create(conn: AsyncConnection) -> None:
                await conn.run_sync(lambda sync: table.create(sync, checkfirst=True))

            return create

        await migrate(
            self._engine, self._component, [creating(self._table), creating(self._cancellations)]
        )

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncConnection]:
        async with self._engine.begin() as conn:
            yield conn

    async def lookup(self, event_id: str) -> Handled | Cancelled | None:
        """Whether this event was handled here already, or cancelled before it was."""
        return await self._lookups.submit(event_id)

    async def _lookup_many(self, event_ids: list[str]) -> list[Handled | Cancelled | None]:
        return await self._runner.run(lambda conn: self._find(conn, event_ids))

    def _find(self, conn: Connection, event_ids: list[str]) -> list[Handled | Cancelled | None]:
        wanted = list(set(event_ids))
        found: dict[str, Handled | Cancelled] = {}
        rows = conn.execute(
            select(
                self._table.c.event_id, self._table.c.handled_at, self._table.c.follow_ups
            ).where(self._table.c.event_id.in_(wanted))
        )
        for row in rows:
            follow_ups = tuple(_FOLLOW_UPS.validate_json(row.follow_ups or b"[]"))
            found[row.event_id] = Handled(row.event_id, row.handled_at, follow_ups)
        missing = [event_id for event_id in wanted if event_id not in found]
        if missing:
            cancelled = conn.execute(
                select(self._cancellations.c.event_id, self._cancellations.c.cancelled_at).where(
                    self._cancellations.c.event_id.in_(missing)
                )
            )
            for hit in cancelled:
                found[hit.event_id] = Cancelled(hit.event_id, hit.cancelled_at)
        return [found.get(event_id) for event_id in event_ids]

    async def remember(self, event: Envelope, follow_ups: Sequence[Envelope]) -> bool:
        """Record `event` as handled (group-committed with others); False if it already was."""
        payload = _FOLLOW_UPS.dump_json(list(follow_ups)) if follow_ups else None  # type: ignore[arg-type]
        return await self._records.submit((event, payload))

    async def _record_many(self, items: list[tuple[Envelope, bytes | None]]) -> list[bool]:
        now = datetime.now(UTC)
        rows = [
            {"event_id": e.id, "event_type": e.type, "handled_at": now, "follow_ups": payload}
            for e, payload in items
        ]

        def insert(conn: Connection) -> set[str]:
            statement = _insert_new(conn.dialect.name, self._table)
            return set(conn.execute(statement, rows).scalars())

        inserted = await self._runner.run(insert)
        # Within one batch an id appears once: the consumer serialises deliveries of an id.
        return [e.id in inserted for e, _ in items]

    async def record(
        self, conn: AsyncConnection, event: Envelope, follow_ups: Sequence[Envelope]
    ) -> bool:
        """Record `event` as handled inside `conn`'s transaction; False if it already was."""
        payload = _FOLLOW_UPS.dump_json(list(follow_ups))  # type: ignore[arg-type]
        try:
            async with conn.begin_nested():
                await conn.execute(
                    self._table.insert().values(
                        event_id=event.id,
                        event_type=event.type,
                        handled_at=datetime.now(UTC),
                        follow_ups=payload if follow_ups else None,
                    )
                )
        except IntegrityError:
            return False
        return True

    async def cancel(self, conn: AsyncConnection, event_id: str) -> bool:
        """Record a cancellation; False if the event was cancelled already."""
        try:
            async with conn.begin_nested():
                await conn.execute(
                    self._cancellations.insert().values(
                        event_id=event_id, cancelled_at=datetime.now(UTC)
                    )
                )
        except IntegrityError:
            return False
        return True

    def close(self) -> None:
        self._runner.close()

    async def prune(self, older_than: timedelta) -> int:
        """Forget events handled longer ago than any redelivery can come."""
        cutoff = datetime.now(UTC) - older_than
        async with self._engine.begin() as conn:
            result = await conn.execute(
                delete(self._table).where(self._table.c.handled_at < cutoff)
            )
            await conn.execute(
                delete(self._cancellations).where(self._cancellations.c.cancelled_at < cutoff)
            )
        return int(result.rowcount or 0)
