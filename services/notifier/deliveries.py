"""The notifier's record of deliveries: one row per notification (event id), in its own store.

Each attempt is counted and its outcome kept (`sending`, `delivered`, `failed` = transient and
retried, `rejected` = permanent), with the last error and timestamps, so an operator can see
what happened to a notification without reading logs.

It also closes the gap the inbox leaves for effects outside the store: the inbox records an
event only after the handler returned, so a crash between a webhook's 2xx (or an accepted
email) and that commit redelivers the event and would send it again. The delivery is recorded
as `delivered` right after the target accepted it, and checked before sending.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from sqlalchemy import (
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    delete,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.messaging.store import migrate
from services.notifier.channels import Notification

Outcome = Literal["sending", "delivered", "failed", "rejected"]
MAX_ERROR_CHARS = 2000

TABLE = Table(
    "notifier_deliveries",
    MetaData(),
    Column("event_id", String(128), primary_key=True),
    Column("channel", String(16), nullable=False),
    Column("target", String(2048), nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("last_error", Text, nullable=True),
    Column("first_attempt_at", DateTime(timezone=True), nullable=False),
    Column("last_attempt_at", DateTime(timezone=True), nullable=False, index=True),
    Column("delivered_at", DateTime(timezone=True), nullable=True),
)


@dataclass(frozen=True)
class Delivery:
    event_id: str
    channel: str
    target: str
    outcome: Outcome
    attempts: int
    last_error: str | None
    first_attempt_at: datetime
    last_attempt_at: datetime
    delivered_at: datetime | None


async def _create(conn: AsyncConnection) -> None:
    await conn.run_sync(lambda sync: TABLE.create(sync, checkfirst=True))


class Deliveries:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def start(self) -> None:
        await migrate(self._engine, "notifier.deliveries", [_create])

    async def begin(self, notification: Notification) -> bool:
        """Record an attempt; False (and nothing recorded) if the notification was delivered."""
        now = datetime.now(UTC)
        async with self._engine.begin() as conn:
            outcome = await conn.scalar(
                select(TABLE.c.outcome)
                .where(TABLE.c.event_id == notification.event_id)
                .with_for_update()
            )
            if outcome == "delivered":
                return False
            if outcome is None:
                try:
                    async with conn.begin_nested():
                        await conn.execute(
                            TABLE.insert().values(
                                event_id=notification.event_id,
                                channel=notification.channel,
                                target=notification.recipient,
                                outcome="sending",
                                attempts=1,
                                first_attempt_at=now,
                                last_attempt_at=now,
                            )
                        )
                    return True
                except IntegrityError:  # a concurrent first attempt: count this one too
                    pass
            await conn.execute(
                update(TABLE)
                .where(TABLE.c.event_id == notification.event_id)
                .values(outcome="sending", attempts=TABLE.c.attempts + 1, last_attempt_at=now)
            )
        return True

    async def delivered(self, event_id: str) -> None:
        now = datetime.now(UTC)
        await self._set(event_id, outcome="delivered", delivered_at=now)

    async def failed(self, event_id: str, error: str, *, permanent: bool) -> None:
        await self._set(
            event_id,
            outcome="rejected" if permanent else "failed",
            last_error=error[:MAX_ERROR_CHARS],
        )

    async def _set(self, event_id: str, **values: object) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(update(TABLE).where(TABLE.c.event_id == event_id).values(**values))

    async def get(self, event_id: str) -> Delivery | None:
        async with self._engine.connect() as conn:
            row = (await conn.execute(select(TABLE).where(TABLE.c.event_id == event_id))).first()
        return None if row is None else Delivery(**row._asdict())

    async def prune(self, older_than: timedelta) -> int:
        """Forget deliveries last attempted longer ago than any redelivery or replay comes."""
        cutoff = datetime.now(UTC) - older_than
        async with self._engine.begin() as conn:
            result = await conn.execute(delete(TABLE).where(TABLE.c.last_attempt_at < cutoff))
        return int(result.rowcount or 0)
