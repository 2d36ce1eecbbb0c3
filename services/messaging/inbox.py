"""The inbox: which events this service has handled, so a redelivery has no second effect.

At-least-once delivery redelivers a message whose ack was lost (a crash between effect and
ack). The consumer records the event id in the service's store once the handler succeeded,
in the same transaction as the handler's own state when the handler has state. A redelivered
event is then recognised, its recorded follow-up events are published again (their ids are
derived from the input, so downstream dedups them too) and it is acked without a second effect.

The records also outlive the status reports sent after the ack: each outcome is marked as owing
its report until the broker confirmed the report (`reported`), so one a crash or an outage took
is told again, by this process or any other of the service (`unreported`).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Collection, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import TypeAdapter
from sqlalchemy import (
    Column,
    Connection,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Table,
    bindparam,
    func,
    literal,
    null,
    select,
    union_all,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql.elements import ColumnElement

from contracts.envelope import Envelope
from contracts.events import Event
from services.messaging.batching import Batcher, for_one_caller
from services.messaging.logs import get_logger
from services.messaging.status import Outcome
from services.messaging.store import (
    BatchRunner,
    Migration,
    add_missing_columns,
    as_utc,
    from_sqlite_time,
    insert_for,
    insert_rows,
    loop_reader,
    migrate,
    prune_in_batches,
    raw_sqlite,
    row_may_be_at_fault,
    sqlite_time,
)

log = get_logger("inbox")

_FOLLOW_UPS: TypeAdapter[list[Event]] = TypeAdapter(list[Event])

EARLIER_RECOVERY = timedelta(seconds=10)
"""The default of `COURIER_STATUS_RECOVERY_SECONDS` before outcomes owed their reports."""


def _as_json(follow_ups: Sequence[bytes]) -> bytes:
    """The follow-ups' bodies (`event_body`) as a JSON array: what `_FOLLOW_UPS` reads."""
    return b"[" + b",".join(follow_ups) + b"]"


@dataclass(frozen=True)
class Handled:
    event_id: str
    handled_at: datetime
    follow_ups: tuple[Envelope, ...]
    attempt: int | None = None
    """The attempt that handled it (None in records from before attempts were kept)."""


@dataclass(frozen=True)
class Cancelled:
    event_id: str
    cancelled_at: datetime


class Inbox:
    def __init__(
        self,
        engine: AsyncEngine,
        service: str,
        commit_delay: float = 0.0,
        batch: int = 500,
        reported_types: Collection[str] = (),
        earlier_recovery: timedelta = EARLIER_RECOVERY,
    ) -> None:
        """`reported_types`: the event types whose outcomes are reported: their records owe a
        report until one that carries them is confirmed (`reported`); none by default.
        `earlier_recovery`: how far back from its newest outcome a version before owed reports
        told outcomes again at start (`COURIER_STATUS_RECOVERY_SECONDS`): upgrading its store
        marks those as owed, since its crash may have taken their reports.
        `commit_delay`: seconds a record waits for others to share its commit. Nothing waits
        for the record but the delivery's ack (a handler's follow-ups are published meanwhile),
        and at a steady rate it turns a commit per event into one per interval; the price is
        that a crash within the interval redelivers those events, whose handlers run again.
        `batch`: records per commit, at most; a full batch does not wait. Half the consumer's
        prefetch window: under load one half commits while the other half is delivered and
        handled, where waiting out the delay would idle the whole window (the broker sends
        nothing more until acks go out)."""
        self._engine = engine
        self._runner = BatchRunner(engine)
        self._reported_types = frozenset(reported_types)
        self._earlier_recovery = earlier_recovery
        # Concurrent handlers share round trips: one query answers many lookups, and one
        # transaction commits many records (group commit).
        self._lookups: Batcher[str, Handled | Cancelled | None] = Batcher(
            self._lookup_many, isolate=row_may_be_at_fault
        )
        self._records: Batcher[tuple[Envelope, bytes | None, int], datetime | None] = Batcher(
            self._record_many, max_size=batch, linger=commit_delay, isolate=row_may_be_at_fault
        )
        self._skips: Batcher[tuple[str, str], datetime] = Batcher(
            self._skip_many, max_size=batch, linger=commit_delay, isolate=row_may_be_at_fault
        )
        self._component = f"{service}.inbox"
        self._reader: _SqliteReads | None = None
        self._wanted: list[tuple[str, asyncio.Future[Handled | Cancelled | _Busy | None]]] = []
        self._table = Table(
            f"{service}_inbox",
            MetaData(),
            Column("event_id", String(128), primary_key=True),
            Column("event_type", String(128), nullable=False),
            Column("handled_at", DateTime(timezone=True), nullable=False, index=True),
            Column("follow_ups", LargeBinary, nullable=True),
            # The attempt that succeeded: with `handled_at`, the record is its status report.
            Column("attempt", Integer, nullable=True),
            # 1 while that report is owed (not confirmed by the broker yet); NULL once it was,
            # and for records that owe none. Only owed rows are indexed: a handful at a time.
            Column("unreported", SmallInteger, nullable=True),
        )
        # Cancellations are durable: they survive restarts, unlike an in-memory revoke list.
        self._cancellations = Table(
            f"{service}_cancellations",
            self._table.metadata,
            Column("event_id", String(128), primary_key=True),
            Column("cancelled_at", DateTime(timezone=True), nullable=False, index=True),
            # When a delivery of the event was skipped, and its type: its `cancelled` report.
            Column("skipped_at", DateTime(timezone=True), nullable=True),
            Column("event_type", String(128), nullable=True),
            Column("unreported", SmallInteger, nullable=True),  # as the inbox's
        )
        self._owed_records = _owed_index(self._table, self._table.c.handled_at)
        self._owed_skips = _owed_index(self._cancellations, self._cancellations.c.skipped_at)

    async def start(self) -> None:
        def creating(table: Table) -> Migration:
            async def create(conn: AsyncConnection) -> None:
                await conn.run_sync(lambda sync: table.create(sync, checkfirst=True))

            return create

        def adding(table: Table, column: str) -> Migration:
            async def add(conn: AsyncConnection) -> None:
                await conn.run_sync(lambda sync: add_missing_columns(sync, table, [column]))

            return add

        async def owing_skips(conn: AsyncConnection) -> None:
            """The skips' mark; then, both marks there, what an earlier version's restart
            would have told again is owed (`_owe_recent_outcomes`)."""
            await adding(self._cancellations, "unreported")(conn)
            await conn.run_sync(
                lambda sync: _owe_recent_outcomes(
                    sync,
                    self._table,
                    self._cancellations,
                    self._reported_types,
                    self._earlier_recovery,
                )
            )

        def indexing(index: Index) -> Migration:
            async def create(conn: AsyncConnection) -> None:
                await conn.run_sync(lambda sync: index.create(sync, checkfirst=True))

            return create

        await migrate(
            self._engine,
            self._component,
            [
                creating(self._table),
                creating(self._cancellations),
                adding(self._table, "attempt"),
                adding(self._cancellations, "skipped_at"),
                adding(self._cancellations, "event_type"),
                # Records made before owe nothing: their reports went by the earlier rule,
                # save those its next start would have told again (`_owe_recent_outcomes`).
                adding(self._table, "unreported"),
                owing_skips,
                indexing(self._owed_records),
                indexing(self._owed_skips),
            ],
        )
        raw = loop_reader(self._engine)
        if raw is not None:
            self._reader = _SqliteReads(raw, self._table, self._cancellations)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncConnection]:
        async with self._engine.begin() as conn:
            yield conn

    async def lookup(self, event_id: str) -> Handled | Cancelled | None:
        """Whether this event was handled here already, or cancelled before it was."""
        if self._reader is None:
            return await self._lookups.submit(event_id)
        # On the event loop, through the read-only connection: a point read of cached pages
        # takes ~0.05 ms, where the hop to the store's thread cost 5-10 ms under load (the
        # thread waits for the GIL the loop holds). The look-ups of one turn of the loop (a
        # burst of deliveries) share one statement.
        loop = asyncio.get_running_loop()
        found: asyncio.Future[Handled | Cancelled | _Busy | None] = loop.create_future()
        if not self._wanted:
            loop.call_soon(self._read_wanted)
        self._wanted.append((event_id, found))
        result = await found
        if isinstance(result, _Busy):
            return await self._lookups.submit(event_id)
        return result

    def _read_wanted(self) -> None:
        wanted, self._wanted = self._wanted, []
        ids = [event_id for event_id, _ in wanted]
        assert self._reader is not None
        results: Sequence[Handled | Cancelled | _Busy | Exception | None]
        unique = list(set(ids))
        try:
            rows = [
                row
                for at in range(0, len(unique), READ_CHUNK)
                for row in self._reader.find(unique[at : at + READ_CHUNK])
            ]
            results = self._found(ids, rows)
        except sqlite3.OperationalError:  # the file is locked for a moment
            log.info("inbox read-only look-up busy; using the store's thread")
            results = [_BUSY] * len(wanted)
        except Exception as exc:  # noqa: BLE001  # each caller raises it
            results = [exc] * len(wanted)
        for (_, found), result in zip(wanted, results, strict=True):
            if found.done():  # its caller was cancelled
                continue
            if isinstance(result, Exception):
                found.set_exception(for_one_caller(result))
            else:
                found.set_result(result)

    async def _lookup_many(self, event_ids: list[str]) -> list[Handled | Cancelled | None]:
        wanted = list(set(event_ids))
        return await self._runner.run(lambda conn: self._found(event_ids, self._find(conn, wanted)))

    def _find(self, conn: Connection, wanted: list[str]) -> list[FoundRow]:
        raw = raw_sqlite(conn)
        if raw is not None:
            return _SqliteReads(raw, self._table, self._cancellations).find(wanted)
        return _find_core(conn, self._table, self._cancellations, wanted)

    def _found(
        self, event_ids: list[str], rows: list[FoundRow]
    ) -> list[Handled | Cancelled | None]:
        found: dict[str, Handled | Cancelled] = {}
        for event_id, at, follow_ups, handled, attempt in rows:
            if handled:  # a handled event stays handled, even if cancelled later
                decoded = tuple(_FOLLOW_UPS.validate_json(follow_ups or b"[]"))
                found[event_id] = Handled(event_id, at, decoded, attempt)
            else:
                found.setdefault(event_id, Cancelled(event_id, at))
        return [found.get(event_id) for event_id in event_ids]

    async def remember(
        self, event: Envelope, follow_ups: Sequence[bytes], attempt: int = 1
    ) -> datetime | None:
        """Record `event` as handled (group-committed with others) with the bodies of its
        follow-ups (`event_body`, as they are published): when, or None if it already was. The
        time is the record's own, so a status report stamped with it can be told again from the
        record, as the same report (`unreported`)."""
        payload = _as_json(follow_ups) if follow_ups else None
        return await self._records.submit((event, payload, attempt))

    async def _record_many(
        self, items: list[tuple[Envelope, bytes | None, int]]
    ) -> list[datetime | None]:
        now = datetime.now(UTC)
        owes = self._owes
        if self._runner.sqlite:
            at = sqlite_time(now)
            values = [
                (e.id, e.type, at, payload, attempt, owes(e.type)) for e, payload, attempt in items
            ]
            inserted = await self._runner.run_autocommit(lambda raw: self._insert_new(raw, values))
        else:
            rows = [
                {
                    "event_id": e.id,
                    "event_type": e.type,
                    "handled_at": now,
                    "follow_ups": payload,
                    "attempt": attempt,
                    "unreported": owes(e.type),
                }
                for e, payload, attempt in items
            ]
            inserted = await self._runner.run(lambda conn: _insert_core(conn, self._table, rows))
        # Within one batch an id appears once: the consumer serialises deliveries of an id.
        return [now if e.id in inserted else None for e, _, _ in items]

    def _insert_new(self, raw: sqlite3.Connection, values: list[tuple[Any, ...]]) -> set[str]:
        """Insert the rows whose event id is new, in one autocommit statement; the ids
        inserted."""
        table = self._table.name
        if insert_rows(raw, table, _COLUMNS, values, _NEW_ONLY) == len(values):
            return {row[0] for row in values}
        # Some id existed already (a duplicate handled meanwhile by another process): the rows
        # this batch inserted are the ones with its timestamp.
        ids = [row[0] for row in values]
        marks = ",".join("?" * len(ids))
        ours = raw.execute(
            f'SELECT event_id FROM "{table}" WHERE handled_at = ? AND event_id IN ({marks})',  # noqa: S608  # names from code, values bound
            [values[0][2], *ids],
        )
        return {event_id for (event_id,) in ours}

    async def record(
        self,
        conn: AsyncConnection,
        event: Envelope,
        follow_ups: Sequence[bytes],
        attempt: int = 1,
    ) -> datetime | None:
        """Record `event` as handled inside `conn`'s transaction: when, or None if it already
        was (see `remember`; `follow_ups` are bodies)."""
        payload = _as_json(follow_ups)
        now = datetime.now(UTC)
        try:
            async with conn.begin_nested():
                await conn.execute(
                    self._table.insert().values(
                        event_id=event.id,
                        event_type=event.type,
                        handled_at=now,
                        follow_ups=payload if follow_ups else None,
                        attempt=attempt,
                        unreported=self._owes(event.type),
                    )
                )
        except IntegrityError:
            return None
        return now

    async def skipped(self, event: Envelope) -> datetime:
        """Note that a delivery of the cancelled `event` was skipped (group-committed with
        others): when, the first time if a redelivery was skipped too, to stamp its
        `cancelled` report with."""
        return await self._skips.submit((event.id, event.type))

    async def _skip_many(self, items: list[tuple[str, str]]) -> list[datetime]:
        now = datetime.now(UTC)
        noted = [(event_id, event_type, self._owes(event_type)) for event_id, event_type in items]
        return await self._runner.run(
            lambda conn: _note_skips(conn, self._cancellations, noted, now)
        )

    def _owes(self, event_type: str) -> int | None:
        """The `unreported` mark of a new outcome of `event_type`: 1 if its report is owed."""
        return 1 if event_type in self._reported_types else None

    async def reported(self, transitions: Iterable[Mapping[str, Any]]) -> None:
        """Note that the broker confirmed the status reports holding `transitions`: their
        outcomes (`succeeded` from a record, `cancelled` from a skip) owe nothing any more."""
        told: dict[str, set[str]] = {"succeeded": set(), "cancelled": set()}
        for transition in transitions:  # read once: it may be an iterator
            told.get(transition["state"], set()).add(transition["event_id"])
        # Sorted: replicas clearing overlapping sets (both told a lost replica's outcomes)
        # lock rows in one order, never waiting on each other crosswise.
        marks = [
            (self._table, sorted(told["succeeded"])),
            (self._cancellations, sorted(told["cancelled"])),
        ]
        if self._runner.sqlite:
            await self._runner.run_autocommit(lambda raw: _unmark_raw(raw, marks))
        else:
            await self._runner.run(lambda conn: _unmark_core(conn, marks))

    async def unreported(self, settled_before: datetime | None, limit: int) -> list[Outcome]:
        """At most `limit` outcomes whose reports are owed, settled before `settled_before` (any
        time when None), oldest first: what a crash took before the report went out, or what
        the broker did not confirm; this process's or another's of the service."""
        inbox, cancellations = self._table, self._cancellations
        handled_before = _before(inbox.c.handled_at, settled_before)
        skipped_before = _before(cancellations.c.skipped_at, settled_before)
        async with self._engine.connect() as conn:
            handled = await conn.execute(
                select(inbox.c.event_id, inbox.c.event_type, inbox.c.handled_at, inbox.c.attempt)
                .where(inbox.c.unreported.is_not(None), *handled_before)
                .order_by(inbox.c.handled_at)
                .limit(limit)
            )
            outcomes = [
                Outcome(e, t, "succeeded", as_utc(at), attempt) for e, t, at, attempt in handled
            ]
            skipped = await conn.execute(
                select(
                    cancellations.c.event_id,
                    cancellations.c.event_type,
                    cancellations.c.skipped_at,
                )
                .where(cancellations.c.unreported.is_not(None), *skipped_before)
                .order_by(cancellations.c.skipped_at)
                .limit(limit)
            )
            outcomes += [Outcome(e, t, "cancelled", as_utc(at), None) for e, t, at in skipped]
        return sorted(outcomes, key=lambda outcome: outcome.at)[:limit]

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
        if self._reader is not None:
            self._reader.raw.close()
            self._reader = None

    async def prune(self, older_than: timedelta) -> int:
        """Forget events handled longer ago than any redelivery can come: the number of
        records forgotten. In batches (`prune_in_batches`): a consumer at 500 events/s prunes
        1.8 million records an hour, and 3 million in one transaction held SQLite's write lock
        for 24 s, past the busy timeout: the records of the events handled meanwhile failed
        (`database is locked`)."""
        cutoff = datetime.now(UTC) - older_than
        inbox, cancellations = self._table.c, self._cancellations.c
        pruned = await prune_in_batches(self._runner, inbox.event_id, inbox.handled_at < cutoff)
        await prune_in_batches(
            self._runner, cancellations.event_id, cancellations.cancelled_at < cutoff
        )
        return pruned


# --- the hot path's statements ----------------------------------------------------------------
# A look-up per message, a record per batch. On SQLite they bypass SQLAlchemy's statement
# machinery, which costs ten times the query itself, and use one statement each: in the store's
# thread every sqlite3 call hands the GIL back and forth with the busy event loop thread, and
# each hand-back can wait out a switch interval.

FoundRow = tuple[str, datetime, bytes | None, bool, int | None]
"""An event id, when it was handled or cancelled, its follow-ups, whether it was handled (not
cancelled), and the attempt that handled it."""
_COLUMNS = ("event_id", "event_type", "handled_at", "follow_ups", "attempt", "unreported")
_NEW_ONLY = "ON CONFLICT (event_id) DO NOTHING"


def _owe_recent_outcomes(
    sync: Connection,
    inbox: Table,
    cancellations: Table,
    reported_types: Collection[str],
    window: timedelta,
) -> None:
    """Mark as owed what a version before owed reports told again when it started: the
    outcomes settled within `window` of its newest one (a record with its attempt, a skip with
    its type). A crash took their reports; started as the upgrade, the service would not tell
    them, and the events stayed `processing` for ever, without callback. Told twice, a report
    changes nothing at the gateway."""
    if not reported_types or window <= timedelta(0):
        return
    times = [
        sync.scalar(select(func.max(inbox.c.handled_at))),
        sync.scalar(select(func.max(cancellations.c.skipped_at))),
    ]
    newest = [as_utc(at) for at in times if at is not None]
    if not newest:
        return
    since = max(newest) - window
    types = sorted(reported_types)
    sync.execute(
        update(inbox)
        .where(
            inbox.c.handled_at >= since,
            inbox.c.attempt.is_not(None),
            inbox.c.event_type.in_(types),
        )
        .values(unreported=1)
    )
    sync.execute(
        update(cancellations)
        .where(cancellations.c.skipped_at >= since, cancellations.c.event_type.in_(types))
        .values(unreported=1)
    )


def _owed_index(table: Table, settled_at: Column[datetime]) -> Index:
    """The outcomes whose reports are owed, by when they were settled: a partial index, so it
    holds the few awaiting a report, not every record."""
    owed = table.c.unreported.is_not(None)
    return Index(f"ix_{table.name}_owed", settled_at, sqlite_where=owed, postgresql_where=owed)


def _before(settled_at: Column[datetime], moment: datetime | None) -> list[ColumnElement[bool]]:
    return [] if moment is None else [settled_at < moment]


_UNMARK_CHUNK = 500


def _unmark_raw(raw: sqlite3.Connection, marks: list[tuple[Table, list[str]]]) -> None:
    for table, ids in marks:
        for at in range(0, len(ids), _UNMARK_CHUNK):
            part = ids[at : at + _UNMARK_CHUNK]
            raw.execute(
                f'UPDATE "{table.name}" SET unreported = NULL '  # noqa: S608  # names from code, values bound
                f"WHERE unreported IS NOT NULL AND event_id IN ({','.join('?' * len(part))})",
                part,
            )


def _unmark_core(conn: Connection, marks: list[tuple[Table, list[str]]]) -> None:
    for table, ids in marks:
        for at in range(0, len(ids), _UNMARK_CHUNK):
            part = ids[at : at + _UNMARK_CHUNK]
            conn.execute(
                update(table)
                .where(table.c.unreported.is_not(None), table.c.event_id.in_(part))
                .values(unreported=None)
            )


def _note_skips(
    conn: Connection,
    cancellations: Table,
    items: list[tuple[str, str, int | None]],
    now: datetime,
) -> list[datetime]:
    """Stamp the cancellations of skipped deliveries that were not skipped before, marked as
    owing their report if it is owed (`Inbox._owes`); when each was first skipped."""
    conn.execute(
        update(cancellations)
        .where(cancellations.c.event_id == bindparam("id_"), cancellations.c.skipped_at.is_(None))
        .values(skipped_at=now, event_type=bindparam("type_"), unreported=bindparam("owed")),
        [{"id_": event_id, "type_": type_, "owed": owed} for event_id, type_, owed in items],
    )
    ids = [event_id for event_id, _, _ in items]
    first = select(cancellations.c.event_id, cancellations.c.skipped_at).where(
        cancellations.c.event_id.in_(ids)
    )
    found = {event_id: at for event_id, at in conn.execute(first)}
    return [now if found.get(event_id) is None else as_utc(found[event_id]) for event_id in ids]


def _find_core(
    conn: Connection, inbox: Table, cancellations: Table, wanted: list[str]
) -> list[FoundRow]:
    c = inbox.c
    handled = select(c.event_id, c.handled_at, c.follow_ups, literal(True), c.attempt).where(
        c.event_id.in_(wanted)
    )
    cancelled = select(
        cancellations.c.event_id, cancellations.c.cancelled_at, null(), literal(False), null()
    ).where(cancellations.c.event_id.in_(wanted))
    return [
        (row[0], as_utc(row[1]), row[2], bool(row[3]), row[4])
        for row in conn.execute(union_all(handled, cancelled))
    ]


READ_CHUNK = 1000
"""Event ids per look-up statement (two parameters each, well under SQLite's limit)."""


class _Busy:
    """The read-only look-up found the file locked for a moment: ask the store's thread."""


_BUSY = _Busy()


class _SqliteReads:
    """The look-up as one raw statement on a sqlite3 connection."""

    def __init__(self, raw: sqlite3.Connection, inbox: Table, cancellations: Table) -> None:
        self.raw = raw
        self._inbox = inbox.name
        self._cancellations = cancellations.name

    def find(self, wanted: list[str]) -> list[FoundRow]:
        marks = ",".join("?" * len(wanted))
        sql = (
            f'SELECT event_id, handled_at, follow_ups, 1, attempt FROM "{self._inbox}" '  # noqa: S608  # names from code, values bound
            f"WHERE event_id IN ({marks}) UNION ALL "
            f'SELECT event_id, cancelled_at, NULL, 0, NULL FROM "{self._cancellations}" '
            f"WHERE event_id IN ({marks})"
        )
        return [
            (event_id, from_sqlite_time(at), follow_ups, bool(handled), attempt)
            for event_id, at, follow_ups, handled, attempt in self.raw.execute(sql, wanted + wanted)
        ]


def _insert_core(conn: Connection, table: Table, rows: list[dict[str, Any]]) -> set[str]:
    statement = (
        insert_for(conn.dialect.name)(table)
        .on_conflict_do_nothing(index_elements=["event_id"])
        .returning(table.c.event_id)
    )
    return set(conn.execute(statement, rows).scalars())
