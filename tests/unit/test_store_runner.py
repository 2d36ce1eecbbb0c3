"""The SQLite store's writer thread: an autocommit statement is as durable as a transaction."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from services.messaging.store import BatchRunner, open_store, store_url


async def test_an_autocommit_statement_is_committed_and_synced_when_it_returns(
    tmp_path: Path,
) -> None:
    engine = open_store(store_url(None, tmp_path, "svc"))
    runner = BatchRunner(engine)
    try:

        def write(raw: sqlite3.Connection) -> tuple[str, int]:
            raw.execute("CREATE TABLE t (k TEXT PRIMARY KEY)")
            raw.execute("INSERT INTO t VALUES ('a'), ('b')")
            mode = raw.execute("PRAGMA journal_mode").fetchone()[0]
            return mode, raw.execute("PRAGMA synchronous").fetchone()[0]

        # WAL, and FULL (2): the commit is synced to disk, not only handed to the OS.
        assert await runner.run_autocommit(write) == ("wal", 2)
        other = sqlite3.connect(tmp_path / "svc.sqlite3")  # no commit call was needed
        assert other.execute("SELECT k FROM t ORDER BY k").fetchall() == [("a",), ("b",)]
        other.close()
    finally:
        runner.close()
        await engine.dispose()
