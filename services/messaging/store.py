"""A service's own store: SQLite by default (a file in the data directory, zero set-up),
PostgreSQL when `DATABASE_URL` says so. SQLAlchemy Core, async, one API for both.

Schema changes are versioned steps applied at start-up, recorded in `courier_migrations`.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TypeVar

from sqlalchemy import (
    Column,
    Connection,
    Delete,
    Integer,
    MetaData,
    String,
    Table,
    any_,
    create_engine,
    delete,
    event,
    func,
    inspect,
    literal,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import URL, make_url
from sqlalchemy.engine.interfaces import DBAPIConnection, Dialect
from sqlalchemy.exc import (
    ArgumentError,
    DataError,
    DBAPIError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    ProgrammingError,
    SQLAlchemyError,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry, SingletonThreadPool
from sqlalchemy.schema import CreateTable
from sqlalchemy.sql.elements import ColumnElement
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_random

from services.messaging.errors import StoreOfAnotherNamespace, StoreUnavailable, causes

Migration = Callable[[AsyncConnection], Awaitable[None]]
T = TypeVar("T")

_META = MetaData()
_MIGRATIONS = Table(
    "courier_migrations",
    _META,
    Column("component", String(128), primary_key=True),
    Column("version", Integer, nullable=False),
)

_OWNER = Table(
    "courier_namespace",
    _META,
    # The one deployment (`COURIER_NAMESPACE`) whose data this store holds.
    Column("namespace", String(255), primary_key=True),
)


STORE_ERRORS = (SQLAlchemyError, sqlite3.Error, OSError)
"""What a store raises when it fails: SQLAlchemy's errors, sqlite3's own from the hot paths'
raw statements (`raw_sqlite`, `loop_reader`), and the raw connection errors (refused, reset)
that asyncpg raises and SQLAlchemy passes through unwrapped."""


def store_url(database_url: str | None, data_dir: Path, service: str) -> str:
    """The SQLAlchemy URL of a service's store."""
    if database_url is None:
        data_dir.mkdir(parents=True, exist_ok=True)
        return f"sqlite+aiosqlite:///{(data_dir / f'{service}.sqlite3').resolve()}"
    for plain in ("postgres://", "postgresql://"):
        if database_url.startswith(plain):
            return "postgresql+asyncpg://" + database_url.removeprefix(plain)
    if database_url.startswith("sqlite://"):
        return "sqlite+aiosqlite://" + database_url.removeprefix("sqlite://")
    return database_url


STORE_DRIVERS: Final = frozenset({"postgresql+asyncpg", "sqlite+aiosqlite"})


def database_url_problem(database_url: str) -> str | None:
    """Why `database_url` names no store Courier can open (not a URL, another database or a
    driver that is not asyncio's), or None. Its value is never quoted: it may hold a password."""
    try:
        url = make_url(store_url(database_url, Path(), "check"))
    except ArgumentError:
        return "not a database URL; use postgresql://user@host/db or sqlite:///path"
    if url.drivername not in STORE_DRIVERS:
        return (
            f"{url.drivername!r} is not a store Courier opens; "
            "use postgresql://user@host/db (asyncpg) or sqlite:///path (aiosqlite)"
        )
    return None


def _sqlite_pragmas(
    dbapi_connection: DBAPIConnection | sqlite3.Connection, _: ConnectionPoolEntry | None
) -> None:
    # WAL lets readers run beside the writer. FULL syncs every commit: a store may hold the only
    # copy of something the broker no longer has (a drained dead letter, a claimed idempotency
    # key), so a commit must survive a power loss, not only a process crash. Group commits keep
    # the fsyncs few.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()
    # SQLite's own lower() changes ASCII letters only: a search lowered in Python ("échec")
    # would never find "Échec". PostgreSQL's lowers every letter, as Python's does.
    dbapi_connection.create_function("lower", 1, _lower, deterministic=True)


def _lower(value: str | bytes | int | float | None) -> str | bytes | int | float | None:
    return value.lower() if isinstance(value, str) else value


# PostgreSQL error codes (SQLSTATE) of a store that is away or refusing work for a while:
# classes 08 connection, 53 insufficient resources (disk full, too many connections), 57
# operator intervention (shutting down, starting up, statement timeout), 58 system (I/O); and
# serialization failures, deadlocks, lock timeouts, a read-only standby after a failover, a
# database not there (3D000, dropped to be restored), damaged data or index (XX001, XX002).
# And one closed to connections (`ALLOW_CONNECTIONS false`, as for maintenance), whose 55000
# also names statement errors (`currval` not yet defined): only that message counts.
_AWAY_SQLSTATE_CLASSES: Final = frozenset({"08", "53", "57", "58"})
_AWAY_SQLSTATES: Final = frozenset({"40001", "40P01", "55P03", "25006", "3D000", "XX001", "XX002"})
_CLOSED_DATABASE = ("55000", "not currently accepting connections")
# SQLite's primary result codes for a damaged file: SQLITE_CORRUPT ("database disk image is
# malformed") and SQLITE_NOTADB ("file is not a database"). Not the delivery's fault, and not
# mended by retrying it: held (and the service unready) until an operator restores the file.
_DAMAGED_SQLITE_CODES: Final = frozenset({11, 26})
# Classes 22 (data exception, e.g. a NUL in text) and 23 (integrity constraint violation).
_ROW_SQLSTATE_CLASSES: Final = frozenset({"22", "23"})


def store_unavailable(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) says the store is away or refusing work for a while
    (unreachable, locked, busy, full, failing over) or damaged: an outage, not a fault of the
    statement. On SQLite every `OperationalError` counts, a missing table too (a store being
    replaced). A bare `OSError` does not: a stateful handler's own call raises the same."""
    return (
        _any_cause(
            exc,
            (OperationalError, InterfaceError, sqlite3.OperationalError),
            _AWAY_SQLSTATE_CLASSES,
            _AWAY_SQLSTATES,
        )
        or any(
            _sqlstate(seen) == _CLOSED_DATABASE[0] and _CLOSED_DATABASE[1] in str(seen)
            for seen in causes(exc)
        )
        or any(isinstance(seen, DBAPIError) and seen.connection_invalidated for seen in causes(exc))
        or any(_damaged_sqlite(seen) for seen in causes(exc))
    )


def _damaged_sqlite(exc: BaseException) -> bool:
    # Extended codes (SQLITE_CORRUPT_INDEX, …) keep the primary code in their low byte.
    code = getattr(exc, "sqlite_errorcode", None)
    return (
        isinstance(exc, sqlite3.DatabaseError)
        and isinstance(code, int)
        and (code & 0xFF in _DAMAGED_SQLITE_CODES)
    )


async def store_checked(work: Awaitable[T], what: str) -> T:
    """A handler's `work` on its service's store; the store away (`store_unavailable`) is
    `StoreUnavailable`, so the consumer holds the delivery until it is back instead of spending
    retry attempts on the outage (and dead-lettering healthy work after a long one)."""
    try:
        return await work
    except Exception as exc:
        if store_unavailable(exc):
            raise StoreUnavailable(f"could not {what}") from exc
        raise


def row_may_be_at_fault(exc: BaseException) -> bool:
    """Whether a batched statement failed for what one row may hold: a value the database
    refuses (a NUL in text on PostgreSQL) or a constraint it breaks. Only then are the rows
    worth trying one at a time (`Batcher(isolate=...)`): any other failure, an outage above
    all, would only be repeated once per row."""
    return _any_cause(
        exc,
        (IntegrityError, DataError, sqlite3.IntegrityError, sqlite3.DataError),
        _ROW_SQLSTATE_CLASSES,
    )


def _any_cause(
    exc: BaseException,
    types: tuple[type[BaseException], ...],
    sqlstate_classes: frozenset[str],
    sqlstates: frozenset[str] = frozenset(),
) -> bool:
    """Whether `exc` or a cause of it is one of `types`, or a PostgreSQL error whose SQLSTATE
    (asyncpg's `sqlstate`, SQLAlchemy's `pgcode`) is in one of the classes or listed."""
    for seen in causes(exc):
        if isinstance(seen, types):
            return True
        state = _sqlstate(seen)
        if state is not None and (state[:2] in sqlstate_classes or state in sqlstates):
            return True
    return False


def _sqlstate(exc: BaseException) -> str | None:
    """A PostgreSQL error's SQLSTATE (asyncpg's `sqlstate`, SQLAlchemy's `pgcode`), if it is one."""
    state = getattr(exc, "sqlstate", None) or getattr(exc, "pgcode", None)
    return state if isinstance(state, str) else None


def open_store(url: str) -> AsyncEngine:
    options: dict[str, Any] = {"pool_pre_ping": True}
    if not url.startswith("sqlite"):
        options["pool_size"] = 10
    engine = create_async_engine(url, **options)
    if engine.dialect.name == "sqlite":
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    else:
        event.listen(engine.sync_engine, "do_connect", _connect_or_away)
    return engine


def _connect_or_away(
    dialect: Dialect, _: ConnectionPoolEntry, cargs: list[Any], cparams: dict[str, Any]
) -> DBAPIConnection:
    """Connect; a server that cannot be reached (stopped, restarting: refused, reset, timed out)
    fails as the driver's `OperationalError`, which SQLAlchemy wraps as its own. asyncpg raises
    the socket's bare `OSError`, which SQLAlchemy passes through: `store_unavailable` cannot
    tell it from a handler's own call, so a PostgreSQL restart spent the attempts of the work
    held for it (the gateway's status reports dead-lettered as `retries_exhausted`)."""
    try:
        return dialect.connect(*cargs, **cparams)
    except OSError as exc:
        dbapi = dialect.loaded_dbapi
        raise dbapi.OperationalError(f"could not connect to the store: {exc!r}", exc) from exc


def as_utc(value: datetime) -> datetime:
    """A datetime read back from a store, in UTC: SQLite hands back naive ones, and
    everything Courier stores is UTC."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def sqlite_time(value: datetime) -> str:
    """A UTC time as SQLAlchemy's SQLite DateTime stores it: for raw statements on hot paths,
    whose rows Core reads back like its own. (`isoformat` costs half of `strftime`, which
    the status projection called four times per event.)"""
    if value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    return value.isoformat(" ", "microseconds")[:26]  # without the "+00:00"


def from_sqlite_time(value: str) -> datetime:
    return datetime.fromisoformat(value).replace(tzinfo=UTC)


ROWS_PER_STATEMENT = 1000
"""Rows per multi-row INSERT: at up to ten values a row, under the 32,766 parameters SQLite takes
since 3.32. Each statement also costs the writer thread a wait for the GIL, which a busy event
loop holds for up to the switch interval: with 100 rows a statement the gateway's accept
records fell seconds behind a batch-ingest load."""


def raw_sqlite(conn: Connection) -> sqlite3.Connection | None:
    """The sqlite3 connection under `conn`, or None on another database. Hot paths use it for
    multi-row statements: SQLAlchemy's executemany steps every row, and on a store thread each
    step hands the GIL back and forth with the busy event loop."""
    if conn.dialect.name != "sqlite":
        return None
    raw = conn.connection.driver_connection
    assert isinstance(raw, sqlite3.Connection)
    return raw


def loop_reader(engine: AsyncEngine) -> sqlite3.Connection | None:
    """A read-only connection to a SQLite store for the event loop's own thread (None on another
    database). A point read of cached pages costs ~0.05 ms there, where a hop to the store's
    thread costs two thread wake-ups and a wait for the GIL the busy loop holds. It never waits
    for a lock: a read that finds the file locked for a moment raises
    `sqlite3.OperationalError`, and the caller asks the store's thread instead."""
    if engine.dialect.name != "sqlite":
        return None
    raw = sqlite3.connect(str(engine.url.database), isolation_level=None, timeout=0)
    raw.execute("PRAGMA query_only=1")
    return raw


def insert_rows(
    raw: sqlite3.Connection,
    table: str,
    columns: Sequence[str],
    rows: Sequence[tuple[Any, ...]],
    on_conflict: str,
) -> int:
    """INSERT of many rows, a hundred to a statement (names come from code, values are bound);
    how many rows were written."""
    one = "(" + ",".join("?" * len(columns)) + ")"
    written = 0
    for i in range(0, len(rows), ROWS_PER_STATEMENT):
        chunk = rows[i : i + ROWS_PER_STATEMENT]
        written += raw.execute(
            f'INSERT INTO "{table}" ({", ".join(columns)}) '  # noqa: S608
            f"VALUES {','.join([one] * len(chunk))} {on_conflict}",
            [value for row in chunk for value in row],
        ).rowcount
    return written


@functools.cache
def _marks(count: int) -> str:
    return ",".join("?" * count)


def select_in(raw: sqlite3.Connection, query: str, values: Sequence[str], chunk: int) -> list[Any]:
    """The rows of `query`, which ends in `IN`, for `values`: one statement per `chunk` of them.
    Hot paths use it where SQLAlchemy's expanding IN would build a bind parameter per value and
    a row object per result (~8 µs per value in the status projection, against ~2)."""
    rows: list[Any] = []
    for at in range(0, len(values), chunk):
        part = values[at : at + chunk]
        rows += raw.execute(f"{query} ({_marks(len(part))})", part).fetchall()
    return rows


def insert_for(dialect: str) -> Callable[[Table], Any]:
    """The dialect's INSERT construct, which has ON CONFLICT (upsert / do nothing)."""
    return postgresql_insert if dialect == "postgresql" else sqlite_insert


class _SqliteWriter:
    """The one thread (and its connections) that writes a SQLite file in this process. SQLite
    takes one writer at a time: two threads writing the same file (the notifier's inbox and its
    deliveries record) only queue in SQLite's busy handler, which sleeps 1 to 100 ms a try."""

    def __init__(self, url: URL) -> None:
        self.sync = create_engine(url, poolclass=SingletonThreadPool)
        event.listen(self.sync, "connect", _sqlite_pragmas)
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="courier-sqlite")
        self.autocommit: sqlite3.Connection | None = None
        self.users = 0

    def close(self) -> None:
        self.thread.submit(self.sync.dispose).result()
        if self.autocommit is not None:
            self.thread.submit(self.autocommit.close).result()
            self.autocommit = None
        self.thread.shutdown(wait=True)


_WRITERS: dict[str, _SqliteWriter] = {}
"""This process's writer of each SQLite file, by path; shared by the stores of the file."""


class BatchRunner:
    """Runs a batch of synchronous SQLAlchemy work in one transaction, as cheaply as possible.

    On PostgreSQL it runs on the async engine (asyncpg, no threads). On SQLite it runs in the
    file's writer thread (one per file and process, whatever the stores sharing it) with a plain
    sqlite3 connection: a whole batch costs one thread hop, where aiosqlite costs one per
    statement and fetch (each waiting for the GIL behind a busy event loop). Used on the
    consumers' hot path (inbox look-ups and group commits).
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._writer: _SqliteWriter | None = None
        self._sqlite = engine.dialect.name == "sqlite"
        if self._sqlite:
            url = engine.url.set(drivername="sqlite")
            key = str(Path(str(url.database)).resolve())
            writer = _WRITERS.get(key)
            if writer is None:
                writer = _WRITERS[key] = _SqliteWriter(url)
            writer.users += 1
            self._writer = writer
            self._key = key

    @property
    def sqlite(self) -> bool:
        return self._sqlite

    async def run(self, work: Callable[[Connection], T]) -> T:
        if not self._sqlite:
            async with self._engine.begin() as conn:
                return await conn.run_sync(work)
        sync = self._open_writer().sync

        def in_transaction() -> T:
            with sync.begin() as conn:
                return work(conn)

        return await self._in_thread(in_transaction)

    async def run_autocommit(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run `work` in the store's thread on a plain sqlite3 connection in autocommit mode
        (SQLite only): each statement is its own transaction, committed and synced before
        `execute` returns. For a batch that is one statement, that is one hand-back of the GIL
        to the busy event loop, where a SQLAlchemy transaction around the same statement costs
        several (check-out, BEGIN, COMMIT, reset), each able to wait out a switch interval."""
        assert self._sqlite, "run_autocommit is for SQLite stores"
        writer = self._open_writer()
        database = str(writer.sync.url.database)

        def autocommit() -> T:
            if writer.autocommit is None:
                raw = sqlite3.connect(database, isolation_level=None)  # the writer thread's own
                _sqlite_pragmas(raw, None)
                writer.autocommit = raw
            return work(writer.autocommit)

        return await self._in_thread(autocommit)

    def _open_writer(self) -> _SqliteWriter:
        if self._writer is None:
            raise RuntimeError("the store was closed")
        return self._writer

    async def _in_thread(self, work: Callable[[], T]) -> T:
        thread = self._open_writer().thread
        return await asyncio.get_running_loop().run_in_executor(thread, work)

    def close(self) -> None:
        """Done with the store: the file's writer stops with its last user."""
        writer, self._writer = self._writer, None
        if writer is None:
            return
        writer.users -= 1
        if writer.users == 0:
            if _WRITERS.get(self._key) is writer:
                del _WRITERS[self._key]
            writer.close()


PRUNE_BATCH = 5_000
"""Rows a prune deletes per transaction."""


async def prune_in_batches(
    runner: BatchRunner, key: Column[Any], old: ColumnElement[bool], batch: int = PRUNE_BATCH
) -> int:
    """Delete the rows of `key`'s table that are `old`, `batch` at a time, each batch its own
    transaction through the store's writer (on SQLite the thread the hot path writes with),
    so that the writes made meanwhile wait for one batch, never for the whole prune; how many
    rows went. `key` is the table's primary key."""

    def delete_batch(conn: Connection) -> int:
        return int(conn.execute(prune_batch(conn.dialect.name, key, old, batch)).rowcount)

    pruned = 0
    while True:
        removed = await runner.run(delete_batch)
        pruned += removed
        if removed < batch:
            return pruned


def prune_batch(dialect: str, key: Column[Any], old: ColumnElement[bool], batch: int) -> Delete:
    """The statement deleting up to `batch` rows that are `old`, found by `key`.

    On PostgreSQL as `key = ANY(ARRAY(subquery))`: `key IN (subquery)` is planned as a semi
    join that reads the whole table once per batch (1.2 million old rows pruned in 29 s
    instead of 6, and a results table read whole to prune a few). SQLite looks the keys up
    either way."""
    found = select(key).where(old).limit(batch)
    if dialect == "postgresql":
        return delete(key.table).where(key == any_(func.array(found.scalar_subquery())))
    return delete(key.table).where(key.in_(found))


def add_missing_columns(sync: Connection, table: Table, names: Sequence[str]) -> None:
    """Add `table`'s columns `names` where the store lacks them, typed as the table declares
    them (nullable, no default: on SQLite and PostgreSQL alike). A store created after them has
    them already: the table was created as it is now."""
    present = {column["name"] for column in inspect(sync).get_columns(table.name)}
    for name in names:
        if name not in present:
            kind = table.c[name].type.compile(dialect=sync.dialect)
            sync.execute(text(f'ALTER TABLE "{table.name}" ADD COLUMN "{name}" {kind}'))


def _racing_starts() -> AsyncRetrying:
    """Tries of a start-up step that processes starting together on one store may race in: on
    SQLite (no advisory lock) the loser fails on "already exists" and simply runs it again."""
    return AsyncRetrying(
        stop=stop_after_attempt(5),
        wait=wait_random(0.05, 0.3),
        retry=retry_if_exception_type((OperationalError, IntegrityError, ProgrammingError)),
        reraise=True,
    )


async def claim(engine: AsyncEngine, namespace: str) -> None:
    """Make sure the store holds the data of `namespace` only: the first service to start on it
    claims it; one of another namespace is refused (`StoreOfAnotherNamespace`). Its tables are
    not named by namespace, so two deployments on one database would each see, replay and
    prune the other's dead letters, statuses and inbox records.

    Retried as `migrate` is: services starting together on one store race here too."""
    async for attempt in _racing_starts():
        with attempt:
            owners = await _claim_once(engine, namespace)
    if owners != [namespace]:
        others = ", ".join(repr(o) for o in owners if o != namespace)
        raise StoreOfAnotherNamespace(
            f"this store ({engine.url.render_as_string(hide_password=True)}) holds the data of "
            f"namespace {others}, not {namespace!r} (COURIER_NAMESPACE): give each deployment "
            "a database (or COURIER_DATA_DIR) of its own"
        )


async def _claim_once(engine: AsyncEngine, namespace: str) -> list[str]:
    """Claim the store for `namespace` unless it is claimed already; the namespaces it holds."""
    async with engine.begin() as conn:
        await _lock_migrations(conn)  # on PostgreSQL; SQLite runs one writer at a time
        await conn.execute(CreateTable(_OWNER, if_not_exists=True))
        unclaimed = ~select(_OWNER.c.namespace).exists()  # one statement: atomic on SQLite too
        await conn.execute(
            _OWNER.insert().from_select(["namespace"], select(literal(namespace)).where(unclaimed))
        )
        return sorted((await conn.scalars(select(_OWNER.c.namespace))).all())


async def migrate(engine: AsyncEngine, component: str, steps: Sequence[Migration]) -> int:
    """Apply the steps of `component` not applied yet, each in its own transaction.

    Processes that start together against one store race here: on PostgreSQL an advisory lock
    serialises them; on SQLite (no such lock) a step that lost the race to another process
    fails on "already exists", and the whole check is simply run again."""
    async for attempt in _racing_starts():
        with attempt:
            return await _migrate_once(engine, component, steps)
    raise AssertionError("unreachable: tenacity reraises")


async def _migrate_once(engine: AsyncEngine, component: str, steps: Sequence[Migration]) -> int:
    async with engine.begin() as conn:
        await _lock_migrations(conn)
        await conn.run_sync(_META.create_all)
    applied = 0
    for version, step in enumerate(steps, start=1):
        async with engine.begin() as conn:
            await _lock_migrations(conn)
            current = await conn.scalar(
                select(_MIGRATIONS.c.version).where(_MIGRATIONS.c.component == component)
            )
            if current is not None and current >= version:
                continue
            await step(conn)
            if current is None:
                await conn.execute(
                    _MIGRATIONS.insert().values(component=component, version=version)
                )
            else:
                await conn.execute(
                    _MIGRATIONS.update()
                    .where(_MIGRATIONS.c.component == component)
                    .values(version=version)
                )
            applied += 1
    return applied


MIGRATION_LOCK_KEY = 0x636F7572  # "cour"


async def _lock_migrations(conn: AsyncConnection) -> None:
    if conn.dialect.name == "postgresql":
        await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
