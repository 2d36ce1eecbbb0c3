"""The consumer's store goes away while a service runs: the delivery waits, the service says it
is not ready meanwhile, and it carries on by itself once the store is back (a real process).

The outage is the service's inbox table renamed away in its SQLite file, or its pages damaged.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from services.messaging.publisher import Publisher
from tests.conftest import Namespace
from tests.faults.conftest import Effects, EffectServiceFactory, readiness, send
from tests.support.polling import eventually
from tests.support.processes import ServiceProcess

pytestmark = [pytest.mark.faults, pytest.mark.broker]

INBOX = "notifier_inbox"


def rename(data_dir: Path, old: str, new: str) -> None:
    with sqlite3.connect(data_dir / "notifier.sqlite3", timeout=10) as store:
        store.execute(f"ALTER TABLE {old} RENAME TO {new}")


async def ready_is(service: ServiceProcess, status: int, timeout: float) -> None:
    async def check() -> None:
        assert service.process is not None and service.process.poll() is None, service.log()
        assert await asyncio.to_thread(readiness, service) == status

    await eventually(check, timeout=timeout)


def _write_pages(data_dir: Path, pages: dict[int, bytes]) -> None:
    """Write pages into the service's SQLite file behind its back, then make a change of its
    own through SQLite, so that every connection drops the pages it cached."""
    path = data_dir / "notifier.sqlite3"
    with path.open("r+b") as file:
        for offset, data in pages.items():
            file.seek(offset)
            file.write(data)
    with sqlite3.connect(path, timeout=10) as store:
        [[version]] = store.execute("PRAGMA user_version").fetchall()
        store.execute(f"PRAGMA user_version = {version + 1}")


def damage(data_dir: Path, table: str) -> dict[int, bytes]:
    """Overwrite the first page of `table` and of each of its indexes, as a disk fault leaves
    a file (`database disk image is malformed`); the pages as they were, to restore."""
    path = data_dir / "notifier.sqlite3"
    with sqlite3.connect(path, timeout=10) as store:
        # Every page in the file itself, none left in the WAL for the service to read instead.
        [[busy, _, _]] = store.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        assert busy == 0, "the service kept the WAL from being checkpointed"
        [[size]] = store.execute("PRAGMA page_size").fetchall()
        query = "SELECT rootpage FROM sqlite_master WHERE tbl_name = ?"
        offsets = [(page - 1) * size for [page] in store.execute(query, [table])]
    assert offsets, f"no table {table}"
    content = path.read_bytes()
    before = {offset: content[offset : offset + size] for offset in offsets}
    _write_pages(data_dir, dict.fromkeys(offsets, b"\xff" * size))  # no page type SQLite knows
    return before


def table_away(data_dir: Path) -> Callable[[], None]:
    """The inbox table renamed away, as a broken or migrated-away store looks to the service:
    every look-up fails as unavailable. Returns what brings it back."""
    rename(data_dir, INBOX, "inbox_away")
    return lambda: rename(data_dir, "inbox_away", INBOX)


def table_damaged(data_dir: Path) -> Callable[[], None]:
    """The inbox's pages damaged: not the work's fault either, and mended only by an operator
    restoring the store. Returns what restores it."""
    before = damage(data_dir, INBOX)
    return lambda: _write_pages(data_dir, before)


FAULTS = {
    "away": (table_away, "no such table"),
    "damaged": (table_damaged, "database disk image is malformed"),
}


@pytest.mark.parametrize(("fault", "logged"), FAULTS.values(), ids=FAULTS.keys())
async def test_a_service_holding_work_for_its_store_is_not_ready_until_it_is_back(
    effect_service: EffectServiceFactory,
    publisher: Publisher,
    namespace: Namespace,
    effects: Effects,
    data_dir: Path,
    fault: Callable[[Path], Callable[[], None]],
    logged: str,
) -> None:
    service = effect_service().wait_ready()
    await ready_is(service, 200, timeout=10)
    mend = fault(data_dir)

    [event_id] = await send(publisher, namespace, "held")
    await ready_is(service, 503, timeout=15)
    assert effects.counts() == {}
    assert "holding the delivery" in service.log()
    assert logged in service.log()

    mend()

    async def handled_once() -> None:
        assert effects.counts() == {event_id: 1}

    await eventually(handled_once, timeout=60)
    await ready_is(service, 200, timeout=15)
    assert service.process is not None and service.process.poll() is None  # never restarted
