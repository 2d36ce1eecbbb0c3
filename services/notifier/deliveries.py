"""The notifier's record of deliveries: one row per notification (event id), in its own store.

Each finished attempt is counted and its outcome kept (`delivered`, `failed` = transient and
retried, `rejected` = permanent), with the last error and timestamps, so an operator can see
what happened to a notification without reading logs. (Rows of earlier versions may also say
`sending`: an attempt was recorded before it was made, which cost a commit on the way to every
notification's effect.)

It also closes the gap the inbox leaves for effects outside the store: the inbox records an
event only after the handler returned, so a crash between a webhook's 2xx (or an accepted
email) and that commit redelivers the event and would send it again. The delivery is recorded
as `delivered` right after the target accepted it, and checked before sending.
"""

from __future__ import annotations

import sqlite3
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
    func,
    select,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.messaging.batching import Batcher
from services.messaging.dead_letters import printable
from services.messaging.store import (
    BatchRunner,
    insert_for,
    insert_rows,
    loop_reader,
    migrate,
    prune_in_batches,
    raw_sqlite,
    row_may_be_at_fault,
    sqlite_time,
)
from services.notifier.channels import Notification

Outcome = Literal["delivered", "failed", "rejected", "sending"]
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
    """Outcomes are group-committed: notifications that finish at the same time share one
    transaction (and one fsync) instead of queueing for the store one by one."""

    def __init__(self, engine: AsyncEngine, commit_delay: float = 0.0, batch: int = 500) -> None:
        """`commit_delay`: seconds an outcome waits for others to share its commit (only the
        delivery's ack waits for it); a crash within it can send that notification again.
        `batch`: outcomes per commit, at most; a full batch does not wait."""
        self._engine = engine
        self._runner = BatchRunner(engine)
        self._outcomes: Batcher[_Outcome, None] = Batcher(
            self._record_many, max_size=batch, linger=commit_delay, isolate=row_may_be_at_fault
        )
        self._reader: sqlite3.Connection | None = None

    async def start(self) -> None:
        await migrate(self._engine, "notifier.deliveries", [_create])
        self._reader = loop_reader(self._engine)

    def close(self) -> None:
        self._runner.close()
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    async def delivered_already(self, event_id: str) -> bool:
        """Whether a send of this notification succeeded before (and must not be repeated)."""
        if self._reader is not None:
            try:
                return _is_delivered(self._reader, event_id)
            except sqlite3.OperationalError:  # the file is locked for a moment
                pass
        return await self._runner.run(lambda conn: _is_delivered_in(conn, event_id))

    async def delivered(self, notification: Notification) -> None:
        await self._outcomes.submit(_Outcome(notification, "delivered", None))

    async def failed(self, notification: Notification, error: str, *, permanent: bool) -> None:
        outcome: Outcome = "rejected" if permanent else "failed"
        await self._outcomes.submit(_Outcome(notification, outcome, error[:MAX_ERROR_CHARS]))

    async def _record_many(self, outcomes: list[_Outcome]) -> list[None]:
        now = datetime.now(UTC)
        if self._runner.sqlite:  # one autocommit statement: see BatchRunner.run_autocommit
            rows = _rows(outcomes, sqlite_time(now))
            await self._runner.run_autocommit(
                lambda raw: insert_rows(raw, TABLE.name, _COLUMNS, rows, _COUNT_AGAIN)
            )
        else:
            await self._runner.run(lambda conn: _upsert_outcomes(conn, _rows(outcomes, now)))
        return [None] * len(outcomes)

    async def get(self, event_id: str) -> Delivery | None:
        async with self._engine.connect() as conn:
            row = (await conn.execute(select(TABLE).where(TABLE.c.event_id == event_id))).first()
        return None if row is None else Delivery(**row._asdict())

    async def prune(self, older_than: timedelta) -> int:
        """Forget deliveries last attempted longer ago than any redelivery or replay comes.
        In batches (`prune_in_batches`): in one transaction, SQLite's write lock of the file
        the notifier's inbox shares was held for as long as the delete took (1.8 million
        deliveries an hour at 500 notifications/s)."""
        cutoff = datetime.now(UTC) - older_than
        old = TABLE.c.last_attempt_at < cutoff
        return await prune_in_batches(self._runner, TABLE.c.event_id, old)


@dataclass(frozen=True)
class _Outcome:
    notification: Notification
    outcome: Outcome
    error: str | None


# --- the hot path's statements ----------------------------------------------------------------
# A read before each send and a write after it. On SQLite they are raw statements: building and
# compiling the Core constructs cost several times the statements themselves.

_COLUMNS = (
    "event_id",
    "channel",
    "target",
    "outcome",
    "attempts",
    "last_error",
    "first_attempt_at",
    "last_attempt_at",
    "delivered_at",
)
# A later attempt counts one more and keeps the last error seen; `delivered` (meanwhile
# elsewhere) is final.
_COUNT_AGAIN = (
    "ON CONFLICT (event_id) DO UPDATE SET outcome = excluded.outcome, "
    "attempts = attempts + 1, last_error = coalesce(excluded.last_error, last_error), "
    "last_attempt_at = excluded.last_attempt_at, delivered_at = excluded.delivered_at "
    "WHERE outcome != 'delivered'"
)


def _is_delivered(raw: sqlite3.Connection, event_id: str) -> bool:
    found = raw.execute(
        f"SELECT 1 FROM \"{TABLE.name}\" WHERE event_id = ? AND outcome = 'delivered'",  # noqa: S608
        (event_id,),
    )
    return found.fetchone() is not None


def _is_delivered_in(conn: Connection, event_id: str) -> bool:
    raw = raw_sqlite(conn)
    if raw is not None:
        return _is_delivered(raw, event_id)
    query = select(TABLE.c.event_id).where(
        TABLE.c.event_id == event_id, TABLE.c.outcome == "delivered"
    )
    return conn.execute(query).first() is not None


def _rows(outcomes: list[_Outcome], at: datetime | str) -> list[tuple[Any, ...]]:
    """One batch of finished attempts as rows: a first attempt inserts its row, a later one
    counts (`_COUNT_AGAIN`)."""
    return [
        (
            o.notification.event_id,
            o.notification.channel,
            # Control characters escaped, as a dead letter's plain form escapes them: PostgreSQL
            # refuses a NUL in text, and an outcome the store refuses (a receiver's error body
            # holding one, a recipient from before the contract refused them) would fail a
            # sent notification, which its retry would send again.
            printable(o.notification.recipient),
            o.outcome,
            1,
            None if o.error is None else printable(o.error),
            at,
            at,
            at if o.outcome == "delivered" else None,
        )
        for o in outcomes
    ]


def _upsert_outcomes(conn: Connection, rows: list[tuple[Any, ...]]) -> None:
    upsert = insert_for(conn.dialect.name)(TABLE)
    conn.execute(
        upsert.on_conflict_do_update(
            index_elements=["event_id"],
            set_={
                "outcome": upsert.excluded.outcome,
                "attempts": TABLE.c.attempts + 1,
                "last_error": func.coalesce(upsert.excluded.last_error, TABLE.c.last_error),
                "last_attempt_at": upsert.excluded.last_attempt_at,
                "delivered_at": upsert.excluded.delivered_at,
            },
            where=TABLE.c.outcome != "delivered",
        ),
        [dict(zip(_COLUMNS, row, strict=True)) for row in rows],
    )
