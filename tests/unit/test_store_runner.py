"""The SQLite store's writer thread: an autocommit statement is as durable as a transaction."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest

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


async def test_the_stores_of_one_file_write_through_one_thread(tmp_path: Path) -> None:
    # Two writer threads on one file (the notifier's inbox and deliveries record) only queued in
    # SQLite's busy handler, which sleeps 1 to 100 ms a try.
    engines = [open_store(store_url(None, tmp_path, name)) for name in ("svc", "svc", "other")]
    first, second, other = (BatchRunner(engine) for engine in engines)
    try:
        threads = await asyncio.gather(
            first.run(lambda _: threading.get_ident()),
            second.run_autocommit(lambda _: threading.get_ident()),
        )
        assert threads[0] == threads[1]
        assert await other.run(lambda _: threading.get_ident()) != threads[0]
        first.close()
        assert await second.run(lambda _: threading.get_ident()) == threads[0]  # still open
    finally:
        for runner in (first, second, other):
            runner.close()
        for engine in engines:
            await engine.dispose()
    with pytest.raises(RuntimeError, match="closed"):
        await second.run(lambda _: None)
