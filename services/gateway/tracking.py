"""The status projection: what happened to each event, per consuming service, with history.

The gateway records what it accepted (every service that will work on it shows `pending` until
it reports; derived, not stored); the services report their transitions as `status.reported`
events, which the gateway applies here. Events are numbered as they arrive, and history and
states are keyed by that number (`tracking_migrations` has why and how older stores move).
Each service keeps owning its data: the projection is built from the events, never by reading
another service's tables. A transition only moves a service's state if it is at least as new as
the one shown, so late or repeated reports do not move a state backwards; and a success, once
told, is not hidden by another copy's reports (`_STATE_MOVES`).

An event accepted with a `callbackurl` keeps it here; once a transition that may end an event is
written, the `on_final` hook (`callbacks.Callbacks.publish_settled`) is given the event ids, and
so are accepted events with a callback URL (a fast service may have finished with an event
before the gateway wrote down that it accepted it).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final, NamedTuple, TypeVar

import orjson
from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Connection,
    DateTime,
    Index,
    Integer,
    MetaData,
    Row,
    String,
    Table,
    Text,
    and_,
    bindparam,
    cast,
    delete,
    literal,
    null,
    or_,
    select,
    text,
    union_all,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql.selectable import CompoundSelect

from contracts.envelope import Envelope, callback_url_of
from contracts.events import DatasetProcessed, ResultsReported
from contracts.topology import workers_of
from contracts.tracking import (
    FINAL_STATES,
    MAX_DETAIL,
    State,
    StatusReported,
    Transition,
    callback_id,
)
from services.gateway.tracking_migrations import steps as migration_steps
from services.messaging.batching import Batcher
from services.messaging.dead_letters import printable
from services.messaging.logs import get_logger
from services.messaging.store import (
    BatchRunner,
    as_utc,
    insert_for,
    insert_rows,
    migrate,
    prune_in_batches,
    raw_sqlite,
    row_may_be_at_fault,
    select_in,
    sqlite_time,
)

log = get_logger("gateway.tracking")

metadata = MetaData()
Seq = BigInteger().with_variant(Integer, "sqlite")  # on SQLite an alias of the rowid
events = Table(
    "status_events",
    metadata,
    # Events numbered as they arrive: history and states are keyed by the number, so the
    # rows of each status report land together at the end of their B-trees (event ids are
    # random: keyed by them, every event dirtied pages of its own).
    Column("seq", Seq, primary_key=True, autoincrement=True),
    Column("event_id", String(128), nullable=False),
    Column("event_type", String(128), nullable=True),
    Column("accepted_at", DateTime(timezone=True), nullable=True),
    Column("cancel_requested_at", DateTime(timezone=True), nullable=True),
    # Where the final status goes (from the accepted event), and which settlement the last
    # published `callback.requested` reported (`cancelled`: settled with nothing to post).
    Column("callback_url", String(2048), nullable=True),
    Column("callback_outcome", String(16), nullable=True),
    Column("callback_settled_at", DateTime(timezone=True), nullable=True),
    # When a callback URL was noted ahead of the publish: until the accept is written, that
    # row's only age (retention must not take it at the next start-up).
    Column("noted_at", DateTime(timezone=True), nullable=True),
    # The event's correlation id, noted with its callback URL: the callback carries it on.
    Column("callback_correlation", String(128), nullable=True),
    Index("ux_status_events_id", "event_id", unique=True),
    # The few events still waiting for their first callback, for the periodic sweep.
    Index(
        "ix_status_callbacks_open",
        "event_id",
        sqlite_where=text("callback_url IS NOT NULL AND callback_outcome IS NULL"),
        postgresql_where=text("callback_url IS NOT NULL AND callback_outcome IS NULL"),
    ),
    Index("ix_status_events_accepted", "accepted_at"),  # what retention looks at first
)
CALLBACK_COLUMNS = ("callback_url", "callback_outcome", "callback_settled_at")
states = Table(
    "status_states",
    metadata,
    Column("event_seq", Seq, primary_key=True, autoincrement=False),
    Column("service", String(64), primary_key=True),
    Column("state", String(32), nullable=False),
    Column("attempt", Integer, nullable=True),
    Column("next_attempt_at", DateTime(timezone=True), nullable=True),
    Column("reason", String(64), nullable=True),
    Column("group_key", String(64), nullable=True),
    Column("detail", Text, nullable=True),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)
history = Table(
    "status_history",
    metadata,
    Column("id", Seq, primary_key=True, autoincrement=True),
    Column("event_seq", Seq, nullable=False),
    Column("service", String(64), nullable=False),
    Column("state", String(32), nullable=False),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("attempt", Integer, nullable=True),
    Column("reason", String(64), nullable=True),
    Column("detail", Text, nullable=True),
    # A natural key: a status report applied twice (a redelivery) adds no second row. It also
    # finds an event's history (its first column).
    Index("ux_status_history", "event_seq", "service", "state", "at", unique=True),
)
results = Table(
    "dataset_results",
    metadata,
    Column("dataset_id", String(128), primary_key=True),
    Column("event_id", String(128), nullable=False),
    Column("processed_at", DateTime(timezone=True), nullable=False),
    Column("summary", JSON, nullable=False),
    # What retention looks at: without it, every hourly prune read the whole table, summaries
    # and all, to find the few results to remove.
    Index("ix_dataset_results_processed", "processed_at"),
)

ACCEPT_BATCH_SECONDS = 0.2
"""How often accept records are written, together. Nothing waits for them: a callback URL is
stored before the publish, a status read writes what is pending first, and an event whose
accept a crash took still gets its status from the first report. Each write is a commit, an
fsync and a hop to the store's thread; every 200 ms instead of 50 took ~0.05 ms of CPU per
event off the gateway at 500 events/s (with `RESULTS_LINGER_SECONDS` at 100 ms instead of 20)."""
UNKNOWN_LOOK_SECONDS = 1.0
"""How long a status read that finds no event looks again (every `ACCEPT_BATCH_SECONDS`)
before the event is taken as unknown (`status_seen`). Another gateway process on the same store
(a replica behind the same address) writes what it accepted within `ACCEPT_BATCH_SECONDS` and
a commit, and the client it answered may come back through this one: it was told `404` for the
event it had just been given, and its cancellation was refused as unknown (never published).
Only an unknown id waits."""
ACCEPT_RETRY_LONGEST = 5.0
"""The longest wait between tries to write accept records while the store fails."""
MAX_ACCEPT_BACKLOG = 100_000
"""Accept records kept in memory while the store cannot take them (~15 MB); beyond, the oldest
are dropped with a warning. The events are in the broker: only their accept time is lost (their
status appears with the first report)."""
RESULTS_LINGER_SECONDS = 0.1
"""Results wait this long for others to share their commit: a result is served up to 100 ms
later, and at a steady rate the store's thread wakes once per interval instead of once per
result report (one every 25 ms from each processor). Until then the reports stay unacknowledged
in the broker, so a crash loses none."""
PRUNE_BATCH = 5_000

ENDING_STATES: frozenset[str] = FINAL_STATES | {"skipped_duplicate"}
"""States that may settle an event (a skipped duplicate was handled before: it succeeded)."""

OnFinal = Callable[[Collection[str]], Awaitable[None]]
"""Told the ids of events that may have settled; looks for callbacks to publish."""


def _utc(value: datetime | None) -> datetime | None:
    return None if value is None else as_utc(value)


class Tracking:
    def __init__(
        self,
        engine: AsyncEngine,
        on_final: OnFinal | None = None,
        results_batch: int = 32,
        accept_backlog: int = MAX_ACCEPT_BACKLOG,
    ) -> None:
        """`results_batch`: results per commit, at most; a full batch does not linger. Half
        the prefetch of the consumer that delivers them, so that under load half its window
        commits while the other half arrives, and the linger never caps the rate.
        `accept_backlog`: accept records kept while the store fails (`MAX_ACCEPT_BACKLOG`)."""
        self._engine = engine
        self._runner = BatchRunner(engine)
        self._results: Batcher[_Result, None] = Batcher(
            self._write_results,
            max_size=results_batch,
            linger=RESULTS_LINGER_SECONDS,
            isolate=row_may_be_at_fault,
        )
        self._on_final = on_final
        self._accepted: list[Accepted] = []
        self._accept_backlog = accept_backlog
        self._with_callback: set[str] = set()  # written accepted events to look at once
        self._checks: set[asyncio.Task[None]] = set()
        self._flushed = asyncio.Event()
        # Held while a batch is written: a reader waits for it instead of missing the batch.
        self._flush_lock = asyncio.Lock()
        self._writer: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await migrate(self._engine, "gateway.tracking", migration_steps(metadata))
        self._writer = asyncio.get_running_loop().create_task(self._write_accepted())

    async def close(self) -> None:
        try:
            await self._close_writer()
        finally:
            self._runner.close()

    async def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.gather(self._writer, *self._checks, return_exceptions=True)
        await self._flush_accepted()

    # --- accepted events (group-committed off the request path) -------------------------------

    async def note_callbacks(self, accepting: Sequence[Envelope]) -> None:
        """Store the callback URLs of events about to be published, before they are: the
        accept is written a moment after the `202`, and a gateway that died in between would
        otherwise lose the only copy of the URL while the event is processed."""
        now = datetime.now(UTC)
        wanted = [
            {
                "event_id": e.id,
                "event_type": e.type,
                "callback_url": url,
                "noted_at": now,
                "callback_correlation": e.correlation(),
            }
            for e in accepting
            if (url := callback_url_of(e)) is not None
        ]
        if wanted:
            await self._runner.run(lambda conn: _write_callback_urls(conn, wanted))

    def accepted(self, event: Envelope, at: datetime | None = None) -> None:
        """Note an event the broker confirmed; written within ~200 ms with others.

        `at` is when the gateway started publishing it: a consumer may report work on the event
        before the confirm reaches the gateway, so the accept time must not be taken after it."""
        # Only the record, not the event: under load thousands wait for the writer, and every
        # model kept alive would be walked by each garbage collection until then.
        self._accepted.append(
            Accepted(event.id, event.type, at or datetime.now(UTC), callback_url_of(event))
        )
        self._bound_backlog()

    @property
    def accept_backlog(self) -> int:
        """Accept records not written yet."""
        return len(self._accepted)

    def _bound_backlog(self) -> None:
        # Trimmed a tenth at a time: one warning and one list move per many accepts.
        excess = len(self._accepted) - self._accept_backlog
        if excess <= self._accept_backlog // 10:
            return
        del self._accepted[:excess]
        log.warning(
            "the store takes no accept records; dropped the oldest",
            extra={"dropped": excess, "kept": len(self._accepted)},
        )

    async def _write_accepted(self) -> None:
        pause = ACCEPT_BATCH_SECONDS
        while True:
            await asyncio.sleep(pause)
            try:
                await self._flush_accepted()
            except Exception:
                pause = min(pause * 2, ACCEPT_RETRY_LONGEST)  # a failing store is not hammered
                log.exception(
                    "could not record accepted events; retrying",
                    extra={"backlog": len(self._accepted), "retry_in_seconds": pause},
                )
                continue
            pause = ACCEPT_BATCH_SECONDS
            if self._with_callback and self._on_final is not None:
                # Apart from the writer: publishing may wait for a confirm, accepts must not.
                check = asyncio.get_running_loop().create_task(self._check_accepted_callbacks())
                self._checks.add(check)
                check.add_done_callback(self._checks.discard)

    async def _check_accepted_callbacks(self) -> None:
        """Accepted events with a callback URL may be settled already, if their reports were
        applied before the accept was written. Nothing acks on this path: what fails here is
        left to the periodic sweep (`Callbacks.sweep`)."""
        ids, self._with_callback = self._with_callback, set()
        if not ids or self._on_final is None:
            return
        try:
            await self._on_final(ids)
        except Exception:
            log.warning("could not look for callbacks of accepted events", exc_info=True)

    async def _flush_accepted(self) -> None:
        async with self._flush_lock:
            accepted, self._accepted = self._accepted, []
            if not accepted:
                return
            try:
                await self._runner.run(lambda conn: _write_accepted(conn, accepted))
            except BaseException:
                self._accepted[:0] = accepted  # keep them for the next round
                self._bound_backlog()
                raise
            self._with_callback.update(a.event_id for a in accepted if a.callback_url)

    # --- transitions ---------------------------------------------------------------------------

    async def apply_reported(self, event: StatusReported) -> None:
        """Handler of `status.reported`. Applying a report twice changes nothing (the history
        has a natural key and states only move forward), so it needs no transaction of its own
        with the inbox."""
        await self.apply(event.data.transitions)

    async def apply(self, transitions: Sequence[Transition]) -> None:
        """Write the transitions; then, if any may end an event, have its callback published.

        Raises if a due callback could not be published, so the caller does not acknowledge
        what triggered it (a status report, a dead letter) and it comes back."""
        transitions = [_storable(t) for t in transitions]
        await self._runner.run(lambda conn: _write_transitions(conn, transitions))
        ending = {t.event_id for t in transitions if t.state in ENDING_STATES}
        if ending and self._on_final is not None:
            await self._on_final(ending)

    # --- results and cancellation ---------------------------------------------------------------

    async def record_result(self, event: DatasetProcessed) -> None:
        """Handler of `dataset.processed`: a dataset's first result is kept, a repeat
        (redelivery, replay) changes nothing, so it needs no transaction with the inbox.
        Group-committed with the results that arrive meanwhile."""
        await self._results.submit(_result_row(event))

    async def record_results(self, event: ResultsReported) -> None:
        """Handler of `results.reported`: each result as `record_result` keeps it."""
        await asyncio.gather(*(self._results.enqueue(_result_row(r)) for r in event.data.results))

    async def _write_results(self, rows: list[_Result]) -> list[None]:
        if self._runner.sqlite:  # one autocommit statement: see BatchRunner.run_autocommit
            await self._runner.run_autocommit(lambda raw: _insert_results_sqlite(raw, rows))
        else:
            await self._runner.run(lambda conn: _insert_results(conn, rows))
        return [None] * len(rows)

    async def result(self, dataset_id: str) -> dict[str, Any] | None:
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(select(results).where(results.c.dataset_id == dataset_id))
            ).first()
        if row is None:
            return None
        # Without its `notify`: whoever knows the id reads this (the callback's receiver is
        # told it), and a webhook's URL often holds a token. Rows of earlier versions have it.
        summary = {k: v for k, v in row.summary.items() if k != "notify"}
        return {
            "dataset_id": row.dataset_id,
            "processed_at": _utc(row.processed_at),
            "event_id": row.event_id,
            **summary,
        }

    async def prune(self, older_than: timedelta, *, batch: int = PRUNE_BATCH) -> int:
        """Forget events with no activity for `older_than`: accepted before the cutoff (or
        never) and no service state moved since; their history and states go with them, and
        dataset results processed before the cutoff. In batches, each its own transaction,
        so the projection is never locked for long. The number of events forgotten."""
        cutoff = datetime.now(UTC) - older_than
        recent = (
            select(states.c.event_seq)
            .where(states.c.event_seq == events.c.seq, states.c.updated_at >= cutoff)
            .exists()
        )
        # Events a status write holds (`_held_seqs`) are skipped: their activity is new.
        stale = (
            select(events.c.seq)
            .where(
                or_(
                    events.c.accepted_at < cutoff,
                    and_(
                        events.c.accepted_at.is_(None),
                        or_(events.c.noted_at.is_(None), events.c.noted_at < cutoff),
                    ),
                ),
                ~recent,
            )
            .with_for_update(of=events, skip_locked=True)
        )
        removed = 0
        while True:
            async with self._engine.begin() as conn:
                ids = list((await conn.execute(stale.limit(batch))).scalars())
                for column in (history.c.event_seq, states.c.event_seq, events.c.seq):
                    await conn.execute(delete(column.table).where(column.in_(ids)))
            removed += len(ids)
            if len(ids) < batch:
                break
        # In batches too: 500,000 old results in one statement held SQLite's write lock for
        # 2-3 s, and the accept records, status reports and results waited.
        old_results = results.c.processed_at < cutoff
        await prune_in_batches(self._runner, results.c.dataset_id, old_results, batch)
        return removed

    async def request_cancel(self, event_id: str) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(
                update(events)
                .where(events.c.event_id == event_id, events.c.cancel_requested_at.is_(None))
                .values(cancel_requested_at=datetime.now(UTC))
            )

    # --- reading --------------------------------------------------------------------------------

    async def status_seen(self, event_id: str) -> dict[str, Any] | None:
        """`status`, looked for again while the event is unknown, for `UNKNOWN_LOOK_SECONDS`:
        another gateway process may have accepted it and not written it down yet. Not on
        SQLite: a file of one gateway, whose own accepts `status` writes first."""
        if self._engine.dialect.name == "sqlite":
            return await self.status(event_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + UNKNOWN_LOOK_SECONDS
        found = await self.status(event_id)
        while found is None and loop.time() < deadline:
            await asyncio.sleep(ACCEPT_BATCH_SECONDS)  # the other process writes, not this one
            found = await self.status(event_id)
        return found

    async def status(self, event_id: str) -> dict[str, Any] | None:
        """The event's fate per service, with history; None if never seen (by this look:
        see `status_seen`)."""
        await self._flush_accepted()  # what this process accepted is visible at once
        async with self._engine.connect() as conn:
            event = (
                await conn.execute(select(events).where(events.c.event_id == event_id))
            ).first()
            if event is None:
                return None
            rows = (await conn.execute(_fate(event.seq))).all()
            callback = await _callback(conn, event)
        if not rows and event.accepted_at is None and event.noted_at is not None:
            # Only its callback URL, noted before a publish that failed or was never
            # confirmed (a crash, a broker away): not known to be accepted.
            return None
        services: dict[str, dict[str, Any]] = {}
        for row in rows:
            if row.kind == "state":
                services[row.service] = {
                    "state": row.state,
                    "attempt": row.attempt,
                    "next_attempt_at": _utc(row.next_attempt_at),
                    "reason": row.reason,
                    "group": row.group_key,
                    "detail": row.detail,
                    "updated_at": _utc(row.at),
                    "history": [],
                }
        for step in rows:
            if step.kind == "history":
                services.setdefault(step.service, {"state": step.state, "history": []})[
                    "history"
                ].append(
                    {
                        "state": step.state,
                        "at": _utc(step.at),
                        "attempt": step.attempt,
                        "reason": step.reason,
                        "detail": step.detail,
                    }
                )
        accepted_at = _utc(event.accepted_at)
        if accepted_at is not None and event.event_type is not None:
            for worker in workers_of(event.event_type):
                _show_pending(services, worker, accepted_at)
        return {
            "id": event.event_id,
            "type": event.event_type,
            "accepted_at": accepted_at,
            "cancel_requested_at": _utc(event.cancel_requested_at),
            "services": dict(sorted(services.items())),
            "callback": callback,
        }


CALLBACK_WORKERS: Final = workers_of("callback.requested")


async def _callback(conn: AsyncConnection, event: Row[Any]) -> dict[str, Any] | None:
    """The event's last callback request, if one was published, and how its delivery went (the
    request is an event of its own, whose worker reports on it): else a client polling the
    status could not tell that a dead-lettered callback would never come."""
    outcome = event.callback_outcome
    if outcome is None or outcome == "cancelled":  # not settled yet, or nothing to post
        return None
    request = callback_id(event.event_id, outcome)
    delivery = (
        await conn.execute(
            select(states.c.state, states.c.detail)
            .join(events, events.c.seq == states.c.event_seq)
            .where(events.c.event_id == request, states.c.service.in_(CALLBACK_WORKERS))
        )
    ).first()
    return {
        "id": request,
        "outcome": outcome,
        "settled_at": _utc(event.callback_settled_at),
        "state": "pending" if delivery is None else delivery.state,
        "detail": None if delivery is None else delivery.detail,
    }


def _storable(transition: Transition) -> Transition:
    """The transition with a detail any store takes: an exception's message may hold a NUL,
    which PostgreSQL refuses, failing the whole report it came in. Escaped as a dead letter's
    plain form escapes it, so the letter's transition and its consumer's report stay one, and
    cut again to `MAX_DETAIL` (escaping lengthens it), which a callback's copy must fit."""
    detail = transition.detail
    escaped = None if detail is None else printable(detail)[:MAX_DETAIL]
    return transition if escaped == detail else transition.model_copy(update={"detail": escaped})


def _fate(seq: int) -> CompoundSelect[Any]:
    """An event's states and history (oldest first) as one statement: each statement reads one
    snapshot, and a report commits both together. Read one after the other, a report committed
    in between showed a state its history lacked, or a service by its history alone."""
    time = DateTime(timezone=True)
    current = select(
        literal("state").label("kind"),
        states.c.service,
        states.c.state,
        states.c.attempt,
        states.c.next_attempt_at,
        states.c.reason,
        states.c.group_key,
        states.c.detail,
        states.c.updated_at.label("at"),
        cast(null(), Integer).label("id"),
    ).where(states.c.event_seq == seq)
    past = select(
        literal("history"),
        history.c.service,
        history.c.state,
        history.c.attempt,
        cast(null(), time),
        history.c.reason,
        cast(null(), states.c.group_key.type),
        history.c.detail,
        history.c.at,
        history.c.id,
    ).where(history.c.event_seq == seq)
    return union_all(current, past).order_by("at", "id")


def _show_pending(services: dict[str, dict[str, Any]], worker: str, accepted_at: datetime) -> None:
    """A worker of an accepted event is pending from the accept until it reports: its state
    if it reported nothing, and the first step of its history. (Stores of earlier versions
    hold these rows; they are not shown twice.)"""
    service = services.setdefault(
        worker,
        {
            "state": "pending", "attempt": None, "next_attempt_at": None, "reason": None,
            "group": None, "detail": None, "updated_at": accepted_at, "history": [],
        },
    )  # fmt: skip
    steps: list[dict[str, Any]] = service["history"]
    if any(step["state"] == "pending" for step in steps):
        return
    at = next((i for i, step in enumerate(steps) if step["at"] > accepted_at), len(steps))
    steps.insert(
        at, {"state": "pending", "at": accepted_at, "attempt": None, "reason": None, "detail": None}
    )


class Accepted(NamedTuple):
    event_id: str
    event_type: str
    at: datetime
    callback_url: str | None


class _Result(NamedTuple):
    dataset_id: str
    event_id: str
    processed_at: datetime
    summary: str  # JSON


def _result_row(event: DatasetProcessed) -> _Result:
    summary = event.data.model_dump_json(exclude={"notify"})  # not served: see `result`
    return _Result(event.data.dataset_id, event.id, event.time, summary)


def _insert_results_sqlite(raw: sqlite3.Connection, rows: list[_Result]) -> None:
    """First result wins: one multi-row statement with the summary's JSON as it came
    (SQLAlchemy would decode and encode it again, a row at a time)."""
    insert_rows(
        raw,
        results.name,
        _Result._fields,
        [(r.dataset_id, r.event_id, sqlite_time(r.processed_at), r.summary) for r in rows],
        "ON CONFLICT (dataset_id) DO NOTHING",
    )


def _insert_results(conn: Connection, rows: list[_Result]) -> None:
    """First result wins (SQLite: `_insert_results_sqlite`)."""
    statement = insert_for(conn.dialect.name)(results).on_conflict_do_nothing(
        index_elements=["dataset_id"]
    )
    conn.execute(statement, [r._asdict() | {"summary": orjson.loads(r.summary)} for r in rows])


def _write_accepted(conn: Connection, accepted: Sequence[Accepted]) -> None:
    """Accept records: the event, first accept wins. Its workers' `pending` is not written:
    a worker of an accepted event with no state yet is pending (`status` shows it so), which
    spares every event two history rows and two state rows.

    On the gateway's hot path: on SQLite as one multi-row statement on the raw connection
    (SQLAlchemy's executemany costs a statement step, and a GIL hand-over with the busy event
    loop, per row); elsewhere through `_write`."""
    raw = raw_sqlite(conn)
    if raw is None:
        _write(conn, (), accepted)
        return
    insert_rows(
        raw,
        events.name,
        ("event_id", "event_type", "accepted_at", "callback_url"),
        [(a.event_id, a.event_type, sqlite_time(a.at), a.callback_url) for a in accepted],
        "ON CONFLICT (event_id) DO UPDATE SET accepted_at = excluded.accepted_at, "
        # The accepted request's URL, as on PostgreSQL: a note left by a refused attempt
        # of the same id must not win over it.
        "event_type = excluded.event_type, callback_url = excluded.callback_url "
        f"WHERE {events.name}.accepted_at IS NULL",
    )


def _write_transitions(conn: Connection, transitions: Sequence[Transition]) -> None:
    """`_write` for status reports (the projection's hot path); on SQLite as multi-row
    statements on the raw connection, with the same rules."""
    raw = raw_sqlite(conn)
    if raw is None or not transitions:
        _write(conn, transitions, ())
        return
    ordered = sorted(transitions, key=lambda t: t.at)
    first_seen = {t.event_id: (t.event_id, t.event_type) for t in reversed(ordered)}
    insert_rows(
        raw,
        events.name,
        ("event_id", "event_type"),
        list(first_seen.values()),
        "ON CONFLICT (event_id) DO NOTHING",
    )
    seqs = _seqs(conn, first_seen)
    at = [sqlite_time(t.at) for t in ordered]  # once each: history and state share it
    insert_rows(
        raw,
        history.name,
        ("event_seq", "service", "state", "at", "attempt", "reason", "detail"),
        [
            (seqs[t.event_id], t.service, t.state, t_at, t.attempt, t.reason, t.detail)
            for t, t_at in zip(ordered, at, strict=True)
        ],
        _HISTORY_KEPT,
    )
    rows = [
        (
            seqs[t.event_id], t.service, t.state, t.attempt,
            None if t.next_attempt_at is None else sqlite_time(t.next_attempt_at),
            t.reason, t.group, t.detail, t_at,
        )
        for t, t_at in zip(ordered, at, strict=True)
    ]  # fmt: skip
    columns = ("event_seq", "service", *STATE_FIELDS)
    pending = [row for row in rows if row[2] == "pending"]
    insert_rows(raw, states.name, columns, pending, _STATE_KEPT)
    moved = ", ".join(f"{c} = excluded.{c}" for c in STATE_FIELDS)
    # Only the newest report per event and service can be the state this batch leaves (a
    # report usually holds both `processing` and `succeeded`): half the state writes.
    shown = _shown([(row[0], row[1], row[2], row) for row in rows])
    insert_rows(
        raw,
        states.name,
        columns,
        shown,
        f"ON CONFLICT (event_seq, service) DO UPDATE SET {moved} WHERE {_STATE_MOVES}",
    )


R = TypeVar("R")


# A service's success is what its state shows once it is told: the reports of a copy of the
# event handled beside it or after it (a redelivery after a crash, a replica that looked the id
# up just before the first one recorded it, a letter replayed after all) do not hide it,
# whatever their times, and a success replaces them whatever its time.
_UNDER_SUCCESS: Final = ("processing", "retrying", "replayed", "skipped_duplicate")
_UNDER = ", ".join(f"'{state}'" for state in _UNDER_SUCCESS)
# When a report replaces the state stored (`excluded` the report): a newer one, any over
# `pending`, and the success rule above. The same on SQLite and PostgreSQL.
_STATE_MOVES: Final = (
    f"({states.name}.updated_at <= excluded.updated_at "
    f"OR {states.name}.state = 'pending' "
    f"OR (excluded.state = 'succeeded' AND {states.name}.state IN ({_UNDER}))) "
    f"AND NOT ({states.name}.state = 'succeeded' AND excluded.state IN ({_UNDER}))"
)


def _shown(rows: Sequence[tuple[object, object, object, R]]) -> list[R]:
    """Of a batch's state rows (`(event number, service, state, row)`, oldest first), the one
    per event and service that may become its state: the newest, except that nothing in
    `_UNDER_SUCCESS` hides a success (`_STATE_MOVES`, the rule the statement that writes them
    keeps against the state stored). `pending` is not a report."""
    newest: dict[tuple[object, object], tuple[object, R]] = {}
    for seq, service, state, row in rows:
        if state == "pending":
            continue
        key = (seq, service)
        shown = newest.get(key, ("",))[0]
        if state in _UNDER_SUCCESS and shown == "succeeded":
            continue
        newest[key] = (state, row)
    return [row for _, row in newest.values()]


SEQ_LOOKUP_CHUNK = 500


def _seqs(conn: Connection, event_ids: Collection[str], *, lock: bool = False) -> dict[str, int]:
    """The numbers of events that exist (one statement per chunk of ids; a report's ids fit
    in one), with `lock` held from a concurrent delete until the transaction ends."""
    wanted = sorted(event_ids)
    if (raw := raw_sqlite(conn)) is not None:  # the projection's hot path; no row locks there
        numbers = f"SELECT event_id, seq FROM {events.name} WHERE event_id IN"  # noqa: S608
        return dict(select_in(raw, numbers, wanted, SEQ_LOOKUP_CHUNK))
    found: dict[str, int] = {}
    for at in range(0, len(wanted), SEQ_LOOKUP_CHUNK):
        chunk = wanted[at : at + SEQ_LOOKUP_CHUNK]
        query = select(events.c.event_id, events.c.seq).where(events.c.event_id.in_(chunk))
        if lock:
            query = query.with_for_update(key_share=True)
        found.update((event_id, seq) for event_id, seq in conn.execute(query))
    return found


def _held_seqs(conn: Connection, first_seen: Mapping[str, str | None]) -> dict[str, int]:
    """The numbers of these events (created already), held until the transaction ends.

    On PostgreSQL a prune may run beside this transaction: the rows are locked (key share),
    which a prune skips, and one it took between our insert and this look-up is created
    again. Otherwise a status written for an event a prune was removing would stay behind
    without its event, never shown (SQLite runs one write transaction at a time)."""
    lock = conn.dialect.name == "postgresql"
    seqs = _seqs(conn, first_seen, lock=lock)
    for _ in range(3):
        missing = first_seen.keys() - seqs.keys()
        if not missing:
            return seqs
        insert = insert_for(conn.dialect.name)(events)
        conn.execute(
            insert.on_conflict_do_nothing(index_elements=["event_id"]),
            [{"event_id": e, "event_type": first_seen[e], "accepted_at": None} for e in missing],
        )
        seqs.update(_seqs(conn, missing, lock=lock))
    raise RuntimeError("events kept vanishing while their status was written")


STATE_FIELDS = (
    "state",
    "attempt",
    "next_attempt_at",
    "reason",
    "group_key",
    "detail",
    "updated_at",
)
_HISTORY_KEPT = "ON CONFLICT (event_seq, service, state, at) DO NOTHING"  # its natural key
_STATE_KEPT = "ON CONFLICT (event_seq, service) DO NOTHING"  # pending never replaces a state


def _write_callback_urls(conn: Connection, rows: list[dict[str, Any]]) -> None:
    insert = insert_for(conn.dialect.name)(events)
    conn.execute(
        insert.on_conflict_do_update(
            index_elements=["event_id"],
            set_={
                "callback_url": insert.excluded.callback_url,
                "noted_at": insert.excluded.noted_at,
                "callback_correlation": insert.excluded.callback_correlation,
            },
            # An accepted event keeps its URL; until then the latest attempt's is the one
            # its accept will carry.
            where=events.c.accepted_at.is_(None),
        ),
        rows,
    )


def _write(
    conn: Connection,
    transitions: Sequence[Transition],
    accepted: Sequence[Accepted],
) -> None:
    """Apply transitions and accept records in a few bulk statements.

    Events are created on first sight; the first accept sets `accepted_at` and the callback URL
    (an event id accepted again keeps what it was first accepted with); history rows have a
    natural key, so a report applied twice adds nothing; a state moves only to a transition at
    least as new as the one shown, except that any report replaces `pending`, `pending` never
    replaces anything, and a success is not hidden by another copy's reports (`_STATE_MOVES`).
    """
    insert = insert_for(conn.dialect.name)
    seen: dict[str, dict[str, Any]] = {}
    for a in accepted:
        seen[a.event_id] = {"event_id": a.event_id, "event_type": a.event_type, "accepted_at": None}
    for t in transitions:
        seen.setdefault(
            t.event_id, {"event_id": t.event_id, "event_type": t.event_type, "accepted_at": None}
        )
    if seen:
        conn.execute(
            insert(events).on_conflict_do_nothing(index_elements=["event_id"]), list(seen.values())
        )
    if accepted:
        conn.execute(
            update(events)
            .where(events.c.event_id == bindparam("eid"), events.c.accepted_at.is_(None))
            .values(
                accepted_at=bindparam("at"),
                event_type=bindparam("etype"),
                callback_url=bindparam("callback"),
            ),
            [
                {"eid": a.event_id, "at": a.at, "etype": a.event_type, "callback": a.callback_url}
                for a in accepted
            ],
        )
    if not transitions:
        return
    ordered = sorted(transitions, key=lambda t: t.at)
    seqs = _held_seqs(conn, {t.event_id: t.event_type for t in ordered})
    conn.execute(
        insert(history).on_conflict_do_nothing(
            index_elements=["event_seq", "service", "state", "at"]
        ),
        [
            {
                "event_seq": seqs[t.event_id],
                "service": t.service,
                "state": t.state,
                "at": t.at,
                "attempt": t.attempt,
                "reason": t.reason,
                "detail": t.detail,
            }
            for t in ordered
        ],
    )
    rows = [
        {
            "event_seq": seqs[t.event_id],
            "service": t.service,
            "state": t.state,
            "attempt": t.attempt,
            "next_attempt_at": t.next_attempt_at,
            "reason": t.reason,
            "group_key": t.group,
            "detail": t.detail,
            "updated_at": t.at,
        }
        for t in ordered
    ]
    keys = ["event_seq", "service"]
    weakest = [row for row in rows if row["state"] == "pending"]
    if weakest:
        conn.execute(insert(states).on_conflict_do_nothing(index_elements=keys), weakest)
    # Only the newest report per event and service can be the state this batch leaves.
    reports = _shown([(row["event_seq"], row["service"], row["state"], row) for row in rows])
    if reports:
        upsert = insert(states)
        moved = {column: upsert.excluded[column] for column in rows[0] if column not in keys}
        conn.execute(
            upsert.on_conflict_do_update(index_elements=keys, set_=moved, where=text(_STATE_MOVES)),
            reports,
        )


def states_of(status: dict[str, Any]) -> dict[str, State]:
    return {service: info["state"] for service, info in status["services"].items()}
