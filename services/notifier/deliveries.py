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
from typing import Any, Literal

from sqlalchemy import (
    Column,
    Connection,
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
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.messaging.batching import Batcher
from services.messaging.store import (
    BatchRunner,
    insert_for,
    insert_rows,
    migrate,
    raw_sqlite,
    sqlite_time,
)
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
        await self._runner.run(lambda conn: _mark_delivered(conn, list(set(event_ids)), now))
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


# --- the hot path's statements ----------------------------------------------------------------
# Two per notification. On SQLite they are raw statements: building and compiling the Core
# constructs cost several times the statements themselves.

_ATTEMPT_COLUMNS = (
    "event_id",
    "channel",
    "target",
    "outcome",
    "attempts",
    "first_attempt_at",
    "last_attempt_at",
)
_COUNT_AGAIN = (
    "ON CONFLICT (event_id) DO UPDATE SET outcome = 'sending', attempts = attempts + 1, "
    "last_attempt_at = excluded.last_attempt_at WHERE outcome != 'delivered'"
)


def _record_attempts(
    conn: Connection, notifications: list[Notification], now: datetime
) -> list[bool]:
    """One batch of attempts: False for those delivered already; the others are counted
    (a first attempt inserts the row, a later one bumps it; `delivered` meanwhile elsewhere is
    left alone)."""
    ids = list({n.event_id for n in notifications})
    raw = raw_sqlite(conn)
    if raw is None:
        delivered = _delivered_core(conn, ids)
    else:
        marks = ",".join("?" * len(ids))
        delivered = {
            event_id
            for (event_id,) in raw.execute(
                f'SELECT event_id FROM "{TABLE.name}" '  # noqa: S608  # names from code, values bound
                f"WHERE outcome = 'delivered' AND event_id IN ({marks})",
                ids,
            )
        }
    sending = {n.event_id: n for n in notifications if n.event_id not in delivered}
    if sending:
        at: datetime | str = now if raw is None else sqlite_time(now)
        rows: list[tuple[Any, ...]] = [
            (n.event_id, n.channel, n.recipient, "sending", 1, at, at) for n in sending.values()
        ]
        if raw is None:
            _count_attempts_core(conn, rows)
        else:
            insert_rows(raw, TABLE.name, _ATTEMPT_COLUMNS, rows, _COUNT_AGAIN)
    return [n.event_id not in delivered for n in notifications]


def _mark_delivered(conn: Connection, event_ids: list[str], now: datetime) -> None:
    raw = raw_sqlite(conn)
    if raw is None:
        conn.execute(
            update(TABLE)
            .where(TABLE.c.event_id.in_(event_ids))
            .values(outcome="delivered", delivered_at=now)
        )
        return
    raw.execute(
        f"UPDATE \"{TABLE.name}\" SET outcome = 'delivered', delivered_at = ? "  # noqa: S608
        f"WHERE event_id IN ({','.join('?' * len(event_ids))})",
        [sqlite_time(now), *event_ids],
    )


def _delivered_core(conn: Connection, ids: list[str]) -> set[str]:
    query = select(TABLE.c.event_id).where(
        TABLE.c.event_id.in_(ids), TABLE.c.outcome == "delivered"
    )
    return set(conn.execute(query).scalars())


def _count_attempts_core(conn: Connection, rows: list[tuple[Any, ...]]) -> None:
    upsert = insert_for(conn.dialect.name)(TABLE)
    conn.execute(
        upsert.on_conflict_do_update(
            index_elements=["event_id"],
            set_={
                "outcome": "sending",
                "attempts": TABLE.c.attempts + 1,
                "last_attempt_at": upsert.excluded.last_attempt_at,
            },
            where=TABLE.c.outcome != "delivered",
        ),
        [dict(zip(_ATTEMPT_COLUMNS, row, strict=True)) for row in rows],
    )
