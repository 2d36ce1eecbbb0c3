"""Which store failures are an outage (hold the work, do not hammer) and which may be one row's
fault (try a failed batch row by row): SQLite's and PostgreSQL's errors as SQLAlchemy raises
them."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlalchemy.exc import DatabaseError, DBAPIError, IntegrityError, OperationalError

from services.messaging.errors import PermanentError
from services.messaging.store import row_may_be_at_fault, store_unavailable


class PostgresError(Exception):
    """What asyncpg raises: the SQLSTATE in `sqlstate`."""

    def __init__(self, sqlstate: str, message: str = "") -> None:
        super().__init__(message or f"SQLSTATE {sqlstate}")
        self.sqlstate = sqlstate


def through_sqlalchemy(driver_error: Exception) -> DBAPIError:
    """As SQLAlchemy's asyncpg dialect raises a server error: a plain DBAPIError."""
    wrapped = DBAPIError("INSERT ...", {}, driver_error)
    wrapped.__cause__ = driver_error
    return wrapped


AWAY = {
    "sqlite locked": OperationalError(
        "INSERT ...", {}, sqlite3.OperationalError("database is locked")
    ),
    "sqlite full": sqlite3.OperationalError("database or disk is full"),
    "postgres disk full": through_sqlalchemy(PostgresError("53100")),
    "postgres too many connections": through_sqlalchemy(PostgresError("53300")),
    "postgres starting up": through_sqlalchemy(PostgresError("57P03")),
    "postgres statement timeout": through_sqlalchemy(PostgresError("57014")),
    "postgres deadlock": through_sqlalchemy(PostgresError("40P01")),
    "postgres read-only standby": through_sqlalchemy(PostgresError("25006")),
    "postgres database closed to connections": through_sqlalchemy(
        PostgresError("55000", 'database "shop" is not currently accepting connections')
    ),
    "postgres database dropped to be restored": through_sqlalchemy(PostgresError("3D000")),
    "postgres data corrupted": through_sqlalchemy(PostgresError("XX001")),
    "postgres index corrupted": through_sqlalchemy(PostgresError("XX002")),
}
ROW = {
    "postgres NUL in text": through_sqlalchemy(PostgresError("22021")),
    "postgres value too long": through_sqlalchemy(PostgresError("22001")),
    "postgres unique violation": IntegrityError("INSERT ...", {}, PostgresError("23505")),
    "sqlite constraint": sqlite3.IntegrityError("CHECK constraint failed"),
}
NEITHER = {
    "postgres syntax error": through_sqlalchemy(PostgresError("42601")),
    # 55000 names a closed database, and statement errors too: those are not an outage.
    "postgres currval not yet defined": through_sqlalchemy(
        PostgresError("55000", 'currval of sequence "s" is not yet defined in this session')
    ),
    # Also what a stateful handler's own call raises: its failure, retried through the tiers.
    "a bare refused connection": ConnectionRefusedError(111, "Connection refused"),
    "a bug": ValueError("not the store's"),
}


@pytest.mark.parametrize("exc", AWAY.values(), ids=AWAY.keys())
def test_an_outage_is_unavailable_and_never_one_rows_fault(exc: BaseException) -> None:
    assert store_unavailable(exc)
    assert not row_may_be_at_fault(exc)


@pytest.mark.parametrize("exc", ROW.values(), ids=ROW.keys())
def test_a_refused_value_or_constraint_may_be_one_rows_fault(exc: BaseException) -> None:
    assert row_may_be_at_fault(exc)
    assert not store_unavailable(exc)


@pytest.mark.parametrize("exc", NEITHER.values(), ids=NEITHER.keys())
def test_other_failures_are_neither(exc: BaseException) -> None:
    assert not store_unavailable(exc)
    assert not row_may_be_at_fault(exc)


def test_the_cause_counts() -> None:
    gave_up = PermanentError("gave up")
    gave_up.__cause__ = through_sqlalchemy(PostgresError("57P01"))
    assert store_unavailable(gave_up)


def sqlite_error(path: Path, query: str) -> sqlite3.DatabaseError:
    with pytest.raises(sqlite3.DatabaseError) as raised, sqlite3.connect(path) as db:
        db.execute(query).fetchall()
    return raised.value


def test_a_damaged_sqlite_file_is_unavailable(tmp_path: Path) -> None:
    # Not the statement's fault, nor the delivery's: held until the file is restored.
    path = tmp_path / "store.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE inbox (event_id TEXT PRIMARY KEY)")
        [[page]] = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'inbox'")
        [[size]] = db.execute("PRAGMA page_size")
    with path.open("r+b") as file:
        file.seek((page - 1) * size)
        file.write(b"\xff" * size)
    damaged = sqlite_error(path, "SELECT * FROM inbox")
    assert "malformed" in str(damaged)
    assert store_unavailable(damaged)
    assert store_unavailable(DatabaseError("SELECT ...", {}, damaged))
    assert not row_may_be_at_fault(damaged)


def test_a_file_that_is_not_a_database_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"
    path.write_bytes(b"not a database " * 100)
    assert store_unavailable(sqlite_error(path, "SELECT * FROM sqlite_master"))
