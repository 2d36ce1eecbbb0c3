"""The operators' failure store: every dead letter, its state, and an audit of what ops did.

The dead-letter queues are drained into this store (the broker stays the transport, the store is
the operators' view): listing, grouping and filtering 100,000 failures stay fast here, which a
queue cannot do. SQLite by default, PostgreSQL via `DATABASE_URL`; SQLAlchemy Core, async.

A dead letter's status moves `dead` → `replaying` (claimed by one replay) → `replayed`, or
`dead` → `discarded`. A claim is a conditional update, so two replays of the same selection
never both take a letter; a claim whose replay died is taken over after a lease.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    and_,
    bindparam,
    delete,
    exists,
    func,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql import Insert, Select
from sqlalchemy.sql.elements import ColumnElement

from services.messaging.dead_letters import DeadLetter
from services.messaging.store import as_utc, insert_for, migrate

Status = Literal["dead", "replaying", "replayed", "discarded"]
Clock = datetime | ColumnElement[datetime]
"""A time in Python, or the database's clock in SQL."""

GROUPING_COLUMNS = ("status", "group_key", "service", "event_type", "dead_lettered_at", "id")

metadata = MetaData()
dead_letters = Table(
    "ops_dead_letters",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("service", String(64), nullable=False),
    Column("queue", String(200), nullable=False),
    Column("event_id", String(128), nullable=True),
    Column("event_type", String(128), nullable=True),
    Column("reason", String(32), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("replays", Integer, nullable=False),
    Column("first_failure", DateTime(timezone=True), nullable=False),
    Column("last_failure", DateTime(timezone=True), nullable=False),
    Column("dead_lettered_at", DateTime(timezone=True), nullable=False),
    Column("exception_type", String(256), nullable=True),
    Column("exception_message", Text, nullable=True),
    Column("traceback", Text, nullable=True),
    Column("fingerprint", String(32), nullable=False),
    Column("group_key", String(32), nullable=False),
    Column("body", LargeBinary, nullable=False),
    Column("headers", JSON, nullable=False),
    Column("correlation_id", String(128), nullable=True),
    Column("status", String(16), nullable=False),
    Column("claim", String(64), nullable=True),
    Column("claimed_at", DateTime(timezone=True), nullable=True),
    Column("history", JSON, nullable=False),
    Column("closed_at", DateTime(timezone=True), nullable=True),
    Index("ix_ops_dl_status_time", "status", "dead_lettered_at", "id"),
    Index("ix_ops_dl_group", "group_key", "status"),
    Index("ix_ops_dl_event", "event_id"),
    # Covers the grouping queries: a group's count, time span and spread are read from this
    # index alone (its entries are a fraction of a row's size), never from the wide rows.
    Index("ix_ops_dl_groups", *GROUPING_COLUMNS),
)
actions = Table(
    "ops_actions",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("action", String(16), nullable=False),
    Column("actor", String(128), nullable=False),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("selection", JSON, nullable=False),
    Column("dry_run", Integer, nullable=False),
    Column("count", Integer, nullable=False),
    Column("reason", Text, nullable=True),
    Index("ix_ops_actions_at", "at"),
)


@dataclass(frozen=True)
class Filter:
    """Which dead letters an operation applies to; every field narrows the selection."""

    ids: tuple[str, ...] = ()
    service: str | None = None
    event_type: str | None = None
    group: str | None = None
    reason: str | None = None
    exception_type: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    text: str | None = None
    status: Status | None = "dead"
    exclude_ids: tuple[str, ...] = ()
    """Letters not to take (a batched replay's letters that no queue takes, left dead)."""

    def where(self) -> ColumnElement[bool]:
        c = dead_letters.c
        clauses: list[ColumnElement[bool]] = []
        if self.ids:
            clauses.append(c.id.in_(self.ids))
        if self.exclude_ids:
            clauses.append(c.id.not_in(self.exclude_ids))
        for column, value in (
            (c.service, self.service),
            (c.event_type, self.event_type),
            (c.group_key, self.group),
            (c.reason, self.reason),
            (c.status, self.status),
        ):
            if value is not None:
                clauses.append(column == value)
        if self.exception_type is not None:
            # The dotted name, or its last parts: `PermanentError`, as the tables show it.
            # Compared as text, not with LIKE, which ignores case on SQLite and not elsewhere.
            suffix = f".{self.exception_type}"
            tail = func.substr(c.exception_type, func.length(c.exception_type) - len(suffix) + 1)
            clauses.append(or_(c.exception_type == self.exception_type, tail == suffix))
        if self.since is not None:
            clauses.append(c.dead_lettered_at >= utc_bound(self.since))
        if self.until is not None:
            clauses.append(c.dead_lettered_at < utc_bound(self.until))
        if self.text:
            # Literal text: `%` and `_` in it are no wildcards.
            # Lowered by the database, as the column is: Python's lower() and PostgreSQL's
            # differ ("İ", a final "Σ"), and a needle lowered by one never matches the other.
            escaped = self.text.replace("/", "//").replace("%", "/%").replace("_", "/_")
            needle = func.lower(literal(escaped, Text))
            clauses.append(
                or_(
                    func.lower(c.exception_message).contains(needle, escape="/"),
                    func.lower(c.exception_type).contains(needle, escape="/"),
                )
            )
        return and_(*clauses) if clauses else and_(True)

    def as_dict(self) -> dict[str, Any]:
        return {
            k: (
                v.isoformat() if isinstance(v, datetime) else list(v) if isinstance(v, tuple) else v
            )
            for k, v in self.__dict__.items()
            if v not in (None, ())
        }


@dataclass(frozen=True)
class Group:
    group: str
    count: int
    first_seen: datetime
    last_seen: datetime
    exception_type: str | None
    example_message: str | None
    reason: str
    services: tuple[str, ...]
    event_types: tuple[str, ...]


@dataclass(frozen=True)
class Page:
    items: list[dict[str, Any]]
    next_cursor: str | None


_GROUPS_INDEX = next(i for i in dead_letters.indexes if i.name == "ix_ops_dl_groups")

SUMMARY_COLUMNS = tuple(
    col
    for col in dead_letters.c
    if col.name not in {"body", "headers", "traceback", "history", "claim", "claimed_at"}
)


def _cursor(row: Any) -> str:
    raw = f"{row.dead_lettered_at.isoformat()}|{row.id}".encode()
    return base64.urlsafe_b64encode(raw).decode()


@dataclass(frozen=True)
class Discarded:
    """A letter a discard closed, with what its log line names."""

    id: str
    event_id: str | None
    correlation_id: str | None
    queue: str


class InvalidCursor(ValueError):
    """A paging cursor this store did not hand out."""


def _after(cursor: str) -> ColumnElement[bool]:
    try:
        at, _, last_id = base64.urlsafe_b64decode(cursor.encode()).decode().partition("|")
        when = utc_bound(datetime.fromisoformat(at))
    # binascii.Error and UnicodeDecodeError are ValueErrors; OverflowError: out of range once
    # in UTC, which no store compares (PostgreSQL's error was a 503)
    except (ValueError, OverflowError) as exc:
        raise InvalidCursor(f"not a cursor: {cursor!r}") from exc
    if not last_id or "\x00" in last_id:  # no id holds a NUL (PostgreSQL would refuse it)
        raise InvalidCursor(f"not a cursor: {cursor!r}")
    c = dead_letters.c
    return or_(c.dead_lettered_at < when, and_(c.dead_lettered_at == when, c.id < last_id))


def utc_bound(value: datetime) -> datetime:
    """A bound for a comparison with stored (UTC) times; naive means UTC. SQLite compares
    the wall-clock text, so an offset has to be converted, not just carried."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _row_dict(row: Any) -> dict[str, Any]:
    out = dict(row._mapping)
    for key, value in out.items():
        if isinstance(value, datetime):
            out[key] = as_utc(value)
    return out


class FailureStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def start(self) -> None:
        async def create(conn: AsyncConnection) -> None:
            await conn.run_sync(metadata.create_all)

        async def grouping_index(conn: AsyncConnection) -> None:
            await conn.run_sync(_GROUPS_INDEX.create, checkfirst=True)

        await migrate(self.engine, "ops.failures", [create, grouping_index])

    # --- ingest -------------------------------------------------------------------------------

    async def store(self, letter: DeadLetter) -> datetime:
        """Store a dead letter; when it was stored (the first time, for a letter stored
        already: the same letter redelivered to the drain, or stored before a failure after)."""
        [stored_at] = await self.store_many([letter])
        return stored_at

    async def store_many(self, letters: Sequence[DeadLetter]) -> list[datetime]:
        """`store` for several letters in one transaction (the drain's letters that arrive
        together: one commit instead of one each); when each was stored, in order."""
        now = datetime.now(UTC)
        c = dead_letters.c
        insert = insert_for(self.engine.dialect.name)(dead_letters).on_conflict_do_nothing(
            index_elements=[c.id]
        )
        async with self.engine.begin() as conn:
            await conn.execute(insert, [_row(letter, now) for letter in letters])
            found = await conn.execute(
                select(c.id, c.dead_lettered_at).where(c.id.in_([item.id for item in letters]))
            )
            stored = {letter_id: as_utc(at) for letter_id, at in found}
        return [stored.get(letter.id, now) for letter in letters]  # absent: purged meanwhile

    async def add(self, letter: DeadLetter, now: datetime | None = None) -> bool:
        """Store a dead letter; False if it was stored already (a redelivery to the drain)."""
        now = now or datetime.now(UTC)
        try:
            async with self.engine.begin() as conn:
                await conn.execute(dead_letters.insert().values(_row(letter, now)))
        except IntegrityError:
            return False  # stored already (redelivered, or a concurrent drain)
        return True

    # --- reading ------------------------------------------------------------------------------

    async def page(self, selection: Filter, *, limit: int = 50, cursor: str | None = None) -> Page:
        query = select(*SUMMARY_COLUMNS).where(selection.where())
        if cursor:
            query = query.where(_after(cursor))
        query = query.order_by(
            dead_letters.c.dead_lettered_at.desc(), dead_letters.c.id.desc()
        ).limit(limit + 1)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        more = len(rows) > limit
        rows = rows[:limit]
        return Page([_row_dict(r) for r in rows], _cursor(rows[-1]) if more and rows else None)

    async def get(self, letter_id: str) -> dict[str, Any] | None:
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(select(dead_letters).where(dead_letters.c.id == letter_id))
            ).first()
            if row is None:
                return None
            item = _row_dict(row)
            if row.event_id is None:  # not an event at all: nothing links it to other letters
                item["related"] = []
                return item
            # Earlier and later failures of the same event: its replay history across letters.
            related = (
                await conn.execute(
                    select(
                        dead_letters.c.id,
                        dead_letters.c.status,
                        dead_letters.c.reason,
                        dead_letters.c.replays,
                        dead_letters.c.dead_lettered_at,
                    )
                    .where(dead_letters.c.event_id == row.event_id, dead_letters.c.id != letter_id)
                    .order_by(dead_letters.c.dead_lettered_at)
                )
            ).all()
        item["related"] = [_row_dict(r) for r in related]
        return item

    async def count(self, selection: Filter) -> int:
        async with self.engine.connect() as conn:
            value = await conn.scalar(
                select(func.count()).select_from(dead_letters).where(selection.where())
            )
        return int(value or 0)

    async def groups(self, selection: Filter, *, limit: int = 100) -> list[Group]:
        """Failure groups, largest first. Counts, time spans and spreads come from the covering
        grouping index; only one example row per group is read from the table."""
        c = dead_letters.c
        where = selection.where()
        summary = (
            select(
                c.group_key,
                func.count().label("total"),
                func.min(c.dead_lettered_at).label("first_seen"),
                func.max(c.dead_lettered_at).label("last_seen"),
                func.max(c.id).label("example_id"),
            )
            .where(where)
            .group_by(c.group_key)
            .order_by(func.count().desc(), c.group_key)
            .limit(limit)
            .subquery()
        )
        # The examples in the same statement: read apart, one a purge removed in between
        # (PostgreSQL reads each statement afresh) was missing, a KeyError.
        with_examples = (
            select(summary, c.exception_type, c.exception_message, c.reason)
            .join(dead_letters, c.id == summary.c.example_id)
            .order_by(summary.c.total.desc(), summary.c.group_key)
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(with_examples)).all()
            keys = [r.group_key for r in rows]
            spread = (
                await conn.execute(
                    select(c.group_key, c.service, c.event_type)
                    .where(where, c.group_key.in_(keys))
                    .group_by(c.group_key, c.service, c.event_type)
                )
            ).all()
        services: dict[str, set[str]] = {}
        types: dict[str, set[str]] = {}
        for row in spread:
            services.setdefault(row.group_key, set()).add(row.service)
            if row.event_type:
                types.setdefault(row.group_key, set()).add(row.event_type)
        return [
            Group(
                group=r.group_key,
                count=int(r.total),
                first_seen=as_utc(r.first_seen),
                last_seen=as_utc(r.last_seen),
                exception_type=r.exception_type,
                example_message=r.exception_message,
                reason=r.reason,
                services=tuple(sorted(services.get(r.group_key, ()))),
                event_types=tuple(sorted(types.get(r.group_key, ()))),
            )
            for r in rows
        ]

    # --- replay claims ------------------------------------------------------------------------

    async def claim(
        self, selection: Filter, *, limit: int, lease: timedelta
    ) -> tuple[str, list[str]]:
        """Take up to `limit` matching letters for one replay; others cannot take them. Their
        ids, oldest first: a replay reads each letter as it comes to it (`letter`), never
        thousands of bodies at once."""
        token = uuid.uuid4().hex
        now = self._lease_clock()
        c = dead_letters.c
        claimable = _takeable(selection, lease, now)
        taken = 0
        async with self.engine.begin() as conn:
            for _ in range(CLAIM_ROUNDS):
                oldest = _not_held(conn, _oldest_first(claimable, limit - taken))
                candidates = (await conn.execute(oldest)).scalars().all()
                if not candidates:
                    break
                took = await conn.execute(
                    update(dead_letters)
                    .where(c.id.in_(candidates), claimable)
                    .values(status="replaying", claim=token, claimed_at=now)
                )
                taken += took.rowcount
                if took.rowcount == len(candidates) or taken >= limit:
                    break
                # A concurrent claim took some of them first (SQLite: between the look and
                # the write): look again, rather than take fewer while others are still dead.
            claimed = _oldest_first(c.claim == token, limit)
            ids = list((await conn.execute(claimed)).scalars().all())
        return token, ids

    def _lease_clock(self) -> Clock:
        """The time claims are stamped and expired by. On PostgreSQL the database's own: the
        gateways sharing it may run on hosts whose clocks drift apart, and one ahead by more
        than a lease would release live claims (a letter replayed twice). On SQLite, a file
        on one host, this process's."""
        return func.now() if self.engine.dialect.name == "postgresql" else datetime.now(UTC)

    async def letter(self, letter_id: str) -> DeadLetter | None:
        return (await self.letters([letter_id])).get(letter_id)

    async def letters(self, letter_ids: Sequence[str]) -> dict[str, DeadLetter]:
        """The letters of `letter_ids` still in the store, by id."""
        async with self.engine.connect() as conn:
            rows = await conn.execute(select(dead_letters).where(dead_letters.c.id.in_(letter_ids)))
            return {row.id: _letter(row) for row in rows}

    async def preview(self, selection: Filter, *, limit: int, lease: timedelta | None) -> list[str]:
        """The ids a replay (with `lease`) or a discard (without) would take now, in order:
        what a dry run reports."""
        query = _oldest_first(_takeable(selection, lease, self._lease_clock()), limit)
        async with self.engine.connect() as conn:
            return list((await conn.execute(query)).scalars().all())

    async def renew(self, token: str) -> None:
        """Extend a replay's claim on all the letters it still holds (a write for each)."""
        c = dead_letters.c
        async with self.engine.begin() as conn:
            await conn.execute(
                update(dead_letters)
                .where(c.claim == token, c.status == "replaying")
                .values(claimed_at=self._lease_clock())
            )

    async def held(self, token: str, letter_ids: Sequence[str]) -> dict[str, int]:
        """Which of `letter_ids` the replay with `token` still holds (not those whose lease ran
        out and were released, or taken over by another replay), and the size of each one's
        body in bytes."""
        c = dead_letters.c
        async with self.engine.connect() as conn:
            mine = await conn.execute(
                select(c.id, func.length(c.body)).where(
                    c.id.in_(letter_ids), c.claim == token, c.status == "replaying"
                )
            )
            return {letter_id: size or 0 for letter_id, size in mine}

    async def release_expired(self, lease: timedelta) -> int:
        """Letters claimed by a replay that died (its lease ran out) are dead again."""
        c = dead_letters.c
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(dead_letters)
                .where(c.status == "replaying", c.claimed_at < self._lease_clock() - lease)
                .values(status="dead", claim=None, claimed_at=None)
            )
        return int(result.rowcount or 0)

    async def mark_replayed(
        self, letter_ids: Sequence[str], token: str, action_id: str, actor: str
    ) -> set[str]:
        """The replay with `token` published its claimed `letter_ids`, confirmed: those marked
        replayed, in one transaction. A letter it still holds, and one whose claim ran out
        while it was published (the replay stalled past its lease: dead again, unclaimed);
        not one a discard or another replay took since."""
        # One statement for all the rows (a statement each: ~0.5 ms a letter on SQLite). Each
        # appends to its own history, and is marked only if still the replay's when written.
        now = datetime.now(UTC)
        c = dead_letters.c
        mine = or_(c.claim == token, and_(c.status == "dead", c.claim.is_(None)))
        entry = {
            "at": now.isoformat(),
            "action": "replayed",
            "actor": actor,
            "action_id": action_id,
        }
        async with self.engine.begin() as conn:
            found = await conn.execute(select(c.id, c.history).where(c.id.in_(letter_ids), mine))
            rows = [
                {"letter_id": letter_id, "new_history": [*(history or []), entry]}
                for letter_id, history in found.all()
            ]
            if not rows:
                return set()
            await conn.execute(
                update(dead_letters)
                .where(c.id == bindparam("letter_id"), mine)
                .values(
                    status="replayed", claim=None, closed_at=now, history=bindparam("new_history")
                ),
                rows,
            )
            # Which ones the statement marked: a row taken by a discard or another replay
            # between the read and the write (PostgreSQL) is not; drivers differ in what they
            # say of an executemany's rows.
            marked = await conn.scalars(
                select(c.id).where(
                    c.id.in_([row["letter_id"] for row in rows]),
                    c.status == "replayed",
                    c.closed_at == now,
                )
            )
            return set(marked)

    async def release(self, token: str) -> None:
        """Give back what a replay claimed but did not move (it stays dead)."""
        async with self.engine.begin() as conn:
            await conn.execute(
                update(dead_letters)
                .where(dead_letters.c.claim == token, dead_letters.c.status == "replaying")
                .values(status="dead", claim=None, claimed_at=None)
            )

    # --- discard and audit --------------------------------------------------------------------

    async def discard(
        self, selection: Filter, *, limit: int, reason: str, actor: str, action_id: str
    ) -> list[Discarded]:
        """Discard up to `limit` matching dead letters and record the action, in one
        transaction: a discard is never left unaudited."""
        now = datetime.now(UTC)
        c = dead_letters.c
        entry = {
            "at": now.isoformat(),
            "action": "discarded",
            "actor": actor,
            "reason": reason,
            "action_id": action_id,
        }
        base = _takeable(selection, None, now)
        discarded: list[Discarded] = []
        # A few statements a round, not one per letter: 10,000 letters one by one held
        # SQLite's write lock for 5.6 s, and the gateway's other writes waited.
        with_history = update(dead_letters).where(c.id == bindparam("letter_id"))
        async with self.engine.begin() as conn:
            for _ in range(CLAIM_ROUNDS):  # as a claim does: past what concurrent ones take
                oldest = _oldest_first(base, limit - len(discarded)).add_columns(
                    c.history, c.event_id, c.correlation_id, c.queue
                )
                rows = (await conn.execute(_not_held(conn, oldest))).all()
                if not rows:
                    break
                took = set(
                    (
                        await conn.execute(
                            update(dead_letters)
                            .where(c.id.in_([row.id for row in rows]), c.status == "dead")
                            .values(status="discarded", closed_at=now)
                            .returning(c.id)
                        )
                    ).scalars()
                )  # those a concurrent replay did not take meanwhile
                if took:
                    await conn.execute(
                        with_history.values(history=bindparam("entries", type_=JSON)),
                        [
                            {"letter_id": row.id, "entries": [*row.history, entry]}
                            for row in rows
                            if row.id in took
                        ],
                    )
                discarded += [
                    Discarded(row.id, row.event_id, row.correlation_id, row.queue)
                    for row in rows
                    if row.id in took
                ]
                if len(took) == len(rows) or len(discarded) >= limit:
                    break
            await conn.execute(
                _action_row(
                    action_id,
                    action="discard",
                    actor=actor,
                    selection=selection,
                    dry_run=False,
                    count=len(discarded),
                    reason=reason,
                )
            )
        return discarded

    async def purge_closed(self, older_than: timedelta) -> int:
        """Forget discarded and replayed letters once their audit period is over."""
        cutoff = datetime.now(UTC) - older_than
        c = dead_letters.c
        async with self.engine.begin() as conn:
            result = await conn.execute(
                delete(dead_letters).where(
                    c.status.in_(("discarded", "replayed")), c.closed_at < cutoff
                )
            )
        return int(result.rowcount or 0)

    async def record_action(
        self,
        *,
        action: str,
        actor: str,
        selection: Filter,
        dry_run: bool,
        count: int,
        reason: str | None = None,
        action_id: str | None = None,
    ) -> str:
        action_id = action_id or uuid.uuid4().hex
        async with self.engine.begin() as conn:
            await conn.execute(
                _action_row(
                    action_id,
                    action=action,
                    actor=actor,
                    selection=selection,
                    dry_run=dry_run,
                    count=count,
                    reason=reason,
                )
            )
        return action_id

    async def count_action(self, action_id: str, count: int) -> None:
        """How many letters the action has moved so far (a replay records itself first)."""
        async with self.engine.begin() as conn:
            await conn.execute(update(actions).where(actions.c.id == action_id).values(count=count))

    async def actions(self, *, limit: int = 100) -> list[dict[str, Any]]:
        async with self.engine.connect() as conn:
            rows = (
                await conn.execute(select(actions).order_by(actions.c.at.desc()).limit(limit))
            ).all()
        return [{**_row_dict(r), "dry_run": bool(r.dry_run)} for r in rows]


def _action_row(
    action_id: str,
    *,
    action: str,
    actor: str,
    selection: Filter,
    dry_run: bool,
    count: int,
    reason: str | None,
) -> Insert:
    return actions.insert().values(
        id=action_id,
        action=action,
        actor=actor,
        at=datetime.now(UTC),
        selection=_recorded(selection.as_dict()),
        dry_run=int(dry_run),
        count=count,
        reason=reason,
    )


RECORDED_IDS = 20
"""Ids of a selection kept in its action's record; the letters an action moved name it in
their history. A batched CLI replay sends up to 10,000 ids in each request: recorded whole,
100 batches wrote a million ids, and listing the actions served tens of megabytes."""


def _recorded(selection: dict[str, Any]) -> dict[str, Any]:
    """The selection as an action records it: long id lists cut, with their length."""
    recorded = dict(selection)
    for key in ("ids", "exclude_ids"):
        ids = recorded.get(key, ())
        if len(ids) > RECORDED_IDS:
            recorded[key] = list(ids[:RECORDED_IDS])
            recorded[f"{key}_count"] = len(ids)
    return recorded


def _row(letter: DeadLetter, now: datetime) -> dict[str, Any]:
    """A dead letter as the store's row, stored at `now` (its strings fitted)."""
    return _fitted(
        {
            "id": letter.id,
            "service": letter.service,
            "queue": letter.queue,
            "event_id": letter.event_id,
            "event_type": letter.event_type,
            "reason": letter.reason,
            "attempts": letter.attempts,
            "replays": letter.replays,
            "first_failure": letter.first_failure,
            "last_failure": letter.last_failure,
            "dead_lettered_at": now,
            "exception_type": letter.exception_type,
            "exception_message": letter.exception_message,
            "traceback": letter.traceback,
            "fingerprint": letter.fingerprint,
            "group_key": letter.group,
            "body": letter.body,
            "headers": letter.headers,
            "correlation_id": letter.correlation_id,
            "status": "dead",
            "history": [
                {"at": now.isoformat(), "action": "dead_lettered", "reason": letter.reason}
            ],
        }
    )


def _fitted(values: dict[str, Any]) -> dict[str, Any]:
    """Strings cut to their column's length. A dead letter may come from anything that
    published to a work queue (a 200-character message id, say): refused by PostgreSQL, it
    would go back to its queue for ever instead of reaching the operators."""
    fitted = dict(values)
    for name, value in values.items():
        length = getattr(dead_letters.c[name].type, "length", None)
        if isinstance(value, str) and length is not None and len(value) > length:
            fitted[name] = value[:length]
    return fitted


REPLAY_READ_WINDOW = timedelta(days=1)
"""How long after its replay a letter's event may still be waiting to be read again."""


def open_letter_of(event_id: ColumnElement[str]) -> ColumnElement[bool]:
    """Whether the event `event_id` has a dead letter still open (dead, or being replayed),
    or replayed within `REPLAY_READ_WINDOW` (its new delivery may wait behind others): what
    its replay reads is still needed."""
    c = dead_letters.c
    recently_replayed = and_(
        c.status == "replayed", c.closed_at > datetime.now(UTC) - REPLAY_READ_WINDOW
    )
    return exists().where(
        c.event_id == event_id, or_(c.status.in_(("dead", "replaying")), recently_replayed)
    )


CLAIM_ROUNDS = 5
"""Looks a claim takes when concurrent claims keep taking what it saw first."""


def _takeable(selection: Filter, lease: timedelta | None, now: Clock) -> ColumnElement[bool]:
    """Letters an operation may take: dead ones, and for a replay (`lease` given) also those
    whose replay died (its claim's lease ran out)."""
    c = dead_letters.c
    base = Filter(**{**selection.__dict__, "status": None}).where()
    if lease is None:
        return and_(base, c.status == "dead")
    expired = and_(c.status == "replaying", c.claimed_at < now - lease)
    return and_(base, or_(c.status == "dead", expired))


def _oldest_first(where: ColumnElement[bool], limit: int) -> Select[Any]:
    c = dead_letters.c
    return select(c.id).where(where).order_by(c.dead_lettered_at, c.id).limit(limit)


def _not_held(conn: AsyncConnection, query: Select[Any]) -> Select[Any]:
    """`query`, past the letters a concurrent claim or discard holds (PostgreSQL's row locks),
    rather than waiting for them only to find them taken. SQLite has one writer at a time: the
    caller looks again when what it saw was taken meanwhile."""
    if conn.dialect.name == "postgresql":
        return query.with_for_update(skip_locked=True)
    return query


def _letter(row: Any) -> DeadLetter:
    return DeadLetter(
        id=row.id,
        service=row.service,
        queue=row.queue,
        event_id=row.event_id,
        event_type=row.event_type,
        reason=row.reason,
        attempts=row.attempts,
        replays=row.replays,
        first_failure=as_utc(row.first_failure),
        last_failure=as_utc(row.last_failure),
        exception_type=row.exception_type,
        exception_message=row.exception_message,
        traceback=row.traceback,
        fingerprint=row.fingerprint,
        group=row.group_key,
        body=row.body,
        headers=row.headers,
        correlation_id=row.correlation_id,
    )
