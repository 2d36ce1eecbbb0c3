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
    Connection,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    delete,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.messaging.batching import Batcher
from services.messaging.store import BatchRunner, insert_for, migrate
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
    """Attempts and successes are group-committed: notifications sent at the same time share
    one transaction (and one fsync) instead of queueing for the store one by one."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._runner = BatchRunner(engine)
        self._attempts: Batcher[Notification, bool] = Batcher(self._begin_many)
        self._successes: Batcher[str, None] = Batcher(self._delivered_many)

    async def start(self) -> None:
        await migrate(self._engine, "notifier.deliveries", [_create])

    def close(self) -> None:
        self._runner.close()

    async def begin(self, notification: Notification) -> bool:
        """Record an attempt; False (and nothing recorded) if the notification was delivered."""
        return await self._attempts.submit(notification)

    async def _begin_many(self, notifications: list[Notification]) -> list[bool]:
        now = datetime.now(UTC)
        return await self._runner.run(lambda conn: _record_attempts(conn, notifications, now))

    async def delivered(self, event_id: str) -> None:
        await self._successes.submit(event_id)

    async def _delivered_many(self, event_ids: list[str]) -> list[None]:
        now = datetime.now(UTC)
        statement = (
            update(TABLE)
            .where(TABLE.c.event_id == bindparam("eid"))
            .values(outcome="delivered", delivered_at=bindparam("at"))
        )
        rows = [{"eid": event_id, "at": now} for event_id in event_ids]
        await self._runner.run(lambda conn: conn.execute(statement, rows))
        return [None] * len(event_ids)

    async def failed(self, event_id: str, error: str, *, permanent: bool) -> None:
        outcome = "rejected" if permanent else "failed"
        async with self._engine.begin() as conn:
            await conn.execute(
                update(TABLE)
                .where(TABLE.c.event_id == event_id)
                .values(outcome=outcome, last_error=error[:MAX_ERROR_CHARS])
            )

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


def _record_attempts(
    conn: Connection, notifications: list[Notification], now: datetime
) -> list[bool]:
    """One batch of attempts: False for those delivered already; the others are counted
    (a first attempt inserts the row, a later one bumps it)."""
    ids = list({n.event_id for n in notifications})
    delivered = set(
        conn.execute(
            select(TABLE.c.event_id).where(
                TABLE.c.event_id.in_(ids), TABLE.c.outcome == "delivered"
            )
        ).scalars()
    )
    sending = {n.event_id: n for n in notifications if n.event_id not in delivered}
    if sending:
        upsert = insert_for(conn.dialect.name)(TABLE)
        conn.execute(
            upsert.on_conflict_do_update(
                index_elements=["event_id"],
                set_={
                    "outcome": "sending",
                    "attempts": TABLE.c.attempts + 1,
                    "last_attempt_at": upsert.excluded.last_attempt_at,
                },
                where=TABLE.c.outcome != "delivered",  # delivered meanwhile elsewhere
            ),
            [
                {
                    "event_id": n.event_id,
                    "channel": n.channel,
                    "target": n.recipient,
                    "outcome": "sending",
                    "attempts": 1,
                    "first_attempt_at": now,
                    "last_attempt_at": now,
                }
                for n in sending.values()
            ],
        )
    return [n.event_id not in delivered for n in notifications]
