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

import orjson
from sqlalchemy import Column, DateTime, LargeBinary, MetaData, String, Table, delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from contracts.envelope import Envelope
from contracts.events import EVENT_ADAPTER
from services.messaging.store import migrate


@dataclass(frozen=True)
class Handled:
    event_id: str
    handled_at: datetime
    follow_ups: tuple[Envelope, ...]


class Inbox:
    def __init__(self, engine: AsyncEngine, service: str) -> None:
        self._engine = engine
        self._component = f"{service}.inbox"
        self._table = Table(
            f"{service}_inbox",
            MetaData(),
            Column("event_id", String(128), primary_key=True),
            Column("event_type", String(128), nullable=False),
            Column("handled_at", DateTime(timezone=True), nullable=False, index=True),
            Column("follow_ups", LargeBinary, nullable=True),
        )

    async def start(self) -> None:
        async def create(conn: AsyncConnection) -> None:
            await conn.run_sync(self._table.metadata.create_all)

        await migrate(self._engine, self._component, [create])

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncConnection]:
        async with self._engine.begin() as conn:
            yield conn

    async def lookup(self, event_id: str) -> Handled | None:
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(
                    select(self._table.c.handled_at, self._table.c.follow_ups).where(
                        self._table.c.event_id == event_id
                    )
                )
            ).first()
        if row is None:
            return None
        follow_ups = tuple(
            EVENT_ADAPTER.validate_python(e) for e in orjson.loads(row.follow_ups or b"[]")
        )
        return Handled(event_id, row.handled_at, follow_ups)

    async def record(
        self, conn: AsyncConnection, event: Envelope, follow_ups: Sequence[Envelope]
    ) -> bool:
        """Record `event` as handled inside `conn`'s transaction; False if it already was."""
        payload = orjson.dumps([EVENT_ADAPTER.dump_python(e, mode="json") for e in follow_ups])  # type: ignore[arg-type]
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

    async def prune(self, older_than: timedelta) -> int:
        """Forget events handled longer ago than any redelivery can come."""
        cutoff = datetime.now(UTC) - older_than
        async with self._engine.begin() as conn:
            result = await conn.execute(
                delete(self._table).where(self._table.c.handled_at < cutoff)
            )
        return int(result.rowcount or 0)
