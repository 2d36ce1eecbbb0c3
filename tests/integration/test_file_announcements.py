"""An upload whose announcement the broker never confirmed is announced again, once.

The gateway records an upload with its `file.uploaded` before publishing it. A confirm that
never comes (the client is told the file "may have been accepted") or a gateway that dies
before it leaves the announcement in the record, and a periodic sweep publishes it again under
the file's id. (The gateway killed mid-publish: tests/e2e/test_upload_crash.py.)
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

from contracts.events import EVENT_ADAPTER
from contracts.files import FileUploaded, FileUploadedData
from contracts.topology import events_exchange
from services.gateway.file_announcer import FileAnnouncer
from services.gateway.files import Files, Unannounced
from services.messaging.publisher import event_body
from services.messaging.store import open_store, sqlite_time, store_url
from tests.conftest import Namespace
from tests.integration.conftest import gateway_client, gateway_settings
from tests.integration.test_files import (
    CSV,
    behind_a_proxy,
    declare_topology_of,
    files_lane,
    refused_once,
)
from tests.support.polling import eventually
from tests.support.queues import assert_empty, take, unbind_everyone
from tests.support.tcp_proxy import ProxyMode, TcpProxy

pytestmark = pytest.mark.broker


@pytest.fixture
def blob_dir(tmp_path: Path) -> Path:
    return tmp_path / "blobs"


@asynccontextmanager
async def gateway(
    namespace: Namespace, tmp_path: Path, blob_dir: Path
) -> AsyncIterator[tuple[TcpProxy, httpx.AsyncClient, FileAnnouncer]]:
    """A gateway behind a proxy (publish timeout 0.5 s: announcements are due again after a
    second, and looked for every second), and its announcer, for a sweep when the test says."""
    apps: list[FastAPI] = []
    async with behind_a_proxy(namespace, tmp_path, blob_dir, apps.append) as (proxy, client):
        yield proxy, client, apps[0].state.file_announcer


def overdue_in(tmp_path: Path) -> None:
    """As if every announcement in the gateway's store had waited long enough to be due."""
    due_in(tmp_path, datetime.now(UTC) - timedelta(seconds=1))


def due_in(tmp_path: Path, at: datetime) -> None:
    """Every announcement in the gateway's store falls due at `at`."""
    with sqlite3.connect(tmp_path / "gateway.sqlite3", timeout=5) as store:
        store.execute(
            "UPDATE files SET announce_at = ? WHERE announce_at IS NOT NULL", (sqlite_time(at),)
        )


async def reconnected(client: httpx.AsyncClient, proxy: TcpProxy, before: int) -> None:
    """Once the gateway noticed its connections were reset, and connected (and declared) again:
    both (publisher's and consumers') opened anew since the proxy had accepted `before`. Ready
    once alone was not enough: under load, the consumers' connection could go down and come
    back before the publisher's noticed its reset."""

    async def both_again() -> None:
        assert proxy.accepted >= before + 2

    async def ready() -> int:
        return (await client.get("/readyz")).status_code

    async def down() -> None:
        assert await ready() != 200

    async def up() -> None:
        assert await ready() == 200

    await eventually(down)
    await eventually(both_again, timeout=30)
    await eventually(up, timeout=30)


def not_due_yet(tmp_path: Path) -> None:
    """As if every announcement in the gateway's store had been claimed by a sweep just now."""
    due_in(tmp_path, datetime.now(UTC) + timedelta(hours=1))


async def announced_once(namespace: Namespace, file_id: str) -> None:
    [announced] = await take(namespace.amqp_url, files_lane(namespace), 1, timeout=20)
    event = EVENT_ADAPTER.validate_json(announced.body)
    assert isinstance(event, FileUploaded)
    assert announced.message_id == event.id == event.data.file_id == file_id


# --- through the gateway -------------------------------------------------------------------


async def test_an_upload_never_confirmed_is_announced_again_once_the_broker_is_back(
    namespace: Namespace, tmp_path: Path, blob_dir: Path
) -> None:
    async with gateway(namespace, tmp_path, blob_dir) as (proxy, client, announcer):
        proxy.set_mode(ProxyMode.BLACKHOLE)  # written, never answered: the broker never had it
        response = await client.post("/v1/files", files={"file": ("p.csv", CSV, "text/csv")})
        assert response.status_code == 503 and "may have been accepted" in response.text
        file_id = response.headers["location"].removeprefix("/v1/files/")
        waiting = (await client.get(f"/v1/files/{file_id}")).json()
        assert waiting["status"] == "pending", waiting
        assert "has not confirmed the file's announcement" in waiting["detail"]
        assert waiting["next_attempt_at"] is not None

        proxy.set_mode(ProxyMode.PASS)
        proxy.reset_all()  # the gateway connects again, and its sweep comes round

        await announced_once(namespace, file_id)

        async def settled() -> None:
            status = (await client.get(f"/v1/files/{file_id}")).json()
            assert status["status"] == "pending" and "detail" not in status, status

        await eventually(settled)
        overdue_in(tmp_path)
        assert await announcer.sweep() == 0  # announced once, not at every sweep
        await assert_empty(namespace.amqp_url, [files_lane(namespace)])


async def test_a_confirmed_upload_is_announced_once(
    namespace: Namespace, tmp_path: Path, blob_dir: Path
) -> None:
    async with gateway(namespace, tmp_path, blob_dir) as (_, client, announcer):
        response = await client.post("/v1/files", files={"file": ("p.csv", CSV, "text/csv")})
        assert response.status_code == 202, response.text
        await announced_once(namespace, response.json()["id"])
        overdue_in(tmp_path)
        assert await announcer.sweep() == 0
        await assert_empty(namespace.amqp_url, [files_lane(namespace)])


async def test_a_keyed_upload_refused_for_certain_waits_for_its_repeat_not_the_sweep(
    namespace: Namespace, tmp_path: Path, blob_dir: Path
) -> None:
    # Told "not taken; retry later", the client decides: announced behind its back, the file
    # would be analysed (and its targets told) though the client may have given up on it.
    key = {"idempotency-key": "upload-refused"}
    async with gateway(namespace, tmp_path, blob_dir) as (_, client, announcer):
        await refused_once(client, namespace, key)
        overdue_in(tmp_path)
        assert await announcer.sweep() == 0
        await assert_empty(namespace.amqp_url, [files_lane(namespace)])
        again = await client.post(
            "/v1/files", files={"file": ("p.csv", CSV, "text/csv")}, headers=key
        )
        assert again.status_code == 202, again.text
        await announced_once(namespace, again.json()["id"])
        overdue_in(tmp_path)
        assert await announcer.sweep() == 0
        await assert_empty(namespace.amqp_url, [files_lane(namespace)])


async def test_a_refused_upload_whose_record_stays_is_said_to_be_announced_later(
    namespace: Namespace, tmp_path: Path, blob_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Refused for certain, then the store failed to take the record back: the sweep
    # announced the file later, while its client, told "refused", had uploaded it again
    # under a new id (analysed, and its targets told, twice).
    async def failing(*args: object) -> None:
        raise OperationalError("DELETE/UPDATE files", {}, sqlite3.OperationalError("disk I/O"))

    async with gateway(namespace, tmp_path, blob_dir) as (_, client, announcer):
        with monkeypatch.context() as store_down:
            store_down.setattr(Files, "remove", failing)
            store_down.setattr(Files, "announced", failing)
            await unbind_everyone(namespace.amqp_url, namespace.settings(), "file.uploaded")
            refused = await client.post("/v1/files", files={"file": ("p.csv", CSV, "text/csv")})
        assert refused.status_code == 500 and "no queue is bound" in refused.text, refused.text
        assert "will be announced later" in refused.text
        file_id = refused.headers["location"].removeprefix("/v1/files/")
        await declare_topology_of(namespace)

        overdue_in(tmp_path)
        await announcer.sweep()
        await announced_once(namespace, file_id)


async def test_a_keyed_repeat_refused_for_certain_leaves_an_earlier_maybe_to_the_sweep(
    namespace: Namespace, tmp_path: Path, blob_dir: Path
) -> None:
    # The first attempt "may have been accepted"; its repeat, refused for certain, took the
    # announcement away, and the file was never announced, pending in silence.
    key = {"idempotency-key": "upload-maybe-then-refused"}
    async with gateway(namespace, tmp_path, blob_dir) as (proxy, client, announcer):
        proxy.set_mode(ProxyMode.BLACKHOLE)
        first = await client.post(
            "/v1/files", files={"file": ("p.csv", CSV, "text/csv")}, headers=key
        )
        assert first.status_code == 503 and "may have been accepted" in first.text
        file_id = first.headers["location"].removeprefix("/v1/files/")
        not_due_yet(tmp_path)  # the sweep waits while the client repeats
        proxy.set_mode(ProxyMode.PASS)
        before = proxy.accepted
        proxy.reset_all()
        await reconnected(client, proxy, before)
        await unbind_everyone(namespace.amqp_url, namespace.settings(), "file.uploaded")
        repeat = await client.post(
            "/v1/files", files={"file": ("p.csv", CSV, "text/csv")}, headers=key
        )
        assert repeat.status_code == 500 and "no queue is bound" in repeat.text, repeat.text
        # Told so: the sweep announces the earlier attempt's file all the same.
        assert "will be announced later" in repeat.text
        assert repeat.headers["location"] == f"/v1/files/{file_id}"
        await declare_topology_of(namespace)

        overdue_in(tmp_path)
        await announcer.sweep()
        await announced_once(namespace, file_id)


async def test_a_sweep_whose_announcements_fail_ends_having_tried_each_once(
    namespace: Namespace, tmp_path: Path, blob_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Each page looked for what was due at its own time: once a pass outlasted a claim (here
    # 20 ms; by default 10 s, some 2,000 failing announcements), the ones that had failed came
    # round again within it, and the pass went on, logging each time round (22,895 tries of
    # 300 files before a publish timed out, in one run).
    settings = gateway_settings(namespace, tmp_path, blob_dir=blob_dir)
    apps: list[FastAPI] = []
    async for _ in gateway_client(settings, started=apps.append):
        engine = open_store(store_url(None, tmp_path / "other", "gateway"))
        try:
            records = Files(engine, announce_after=timedelta(milliseconds=20))
            await records.start()
            for n in range(300):
                await records.add(uploaded(f"f-{n}"), datetime.now(UTC), announcement=unrouted(n))
            await overdue(engine, *(f"f-{n}" for n in range(300)))
            state = apps[0].state
            announcer = FileAnnouncer(
                records, state.broker, events_exchange(namespace.name), state.tracking
            )
            await unbind_everyone(namespace.amqp_url, namespace.settings(), "file.uploaded")

            with caplog.at_level(logging.ERROR, logger="courier.gateway.files"):
                assert await asyncio.wait_for(announcer.sweep(), timeout=60) == 0

            failed = [r for r in caplog.records if "announce a file again:" in r.getMessage()]
            assert len(failed) == 300
        finally:
            await engine.dispose()


def unrouted(n: int) -> bytes:
    """The announcement of file `f-<n>`."""
    event = FileUploaded(id=f"f-{n}", data=uploaded(f"f-{n}"))
    return event_body(event)


# --- the record ----------------------------------------------------------------------------

AFTER = timedelta(seconds=30)


@pytest.fixture
async def records(fresh_engine: AsyncEngine) -> Files:
    found = Files(fresh_engine, announce_after=AFTER)
    await found.start()
    return found


def uploaded(file_id: str) -> FileUploadedData:
    return FileUploadedData(
        file_id=file_id, blob=file_id, name="x.csv", content_type="text/csv", size=8,
        sha256="0" * 64,
    )  # fmt: skip


async def due_now(records: Files) -> list[Unannounced]:
    return await records.unannounced(due_by=datetime.now(UTC), limit=10)


async def overdue(engine: AsyncEngine, *file_ids: str) -> None:
    """As if each file's announcement had waited longer than `AFTER`."""
    past = datetime.now(UTC) - timedelta(seconds=1)
    async with engine.begin() as conn:
        for file_id in file_ids:
            await conn.execute(
                text(
                    "UPDATE files SET announce_at = :at"
                    " WHERE file_id = :id AND announce_at IS NOT NULL"
                ),
                {"at": past, "id": file_id},
            )


async def test_an_announcement_is_not_due_while_a_publish_could_still_be_waiting(
    records: Files,
) -> None:
    await records.add(uploaded("f-1"), datetime.now(UTC), announcement=b"{}")
    assert await due_now(records) == []


async def test_a_due_announcement_is_claimed_by_one_sweep_until_its_time_comes_again(
    records: Files, fresh_engine: AsyncEngine
) -> None:
    at = datetime.now(UTC)
    for file_id in ("f-1", "f-2"):
        await records.add(uploaded(file_id), at, announcement=f'{{"id":"{file_id}"}}'.encode())
    await overdue(fresh_engine, "f-1", "f-2")
    other_gateway = Files(fresh_engine, announce_after=AFTER)

    first, second = await asyncio.gather(due_now(records), due_now(other_gateway))

    claimed = sorted(u.file_id for u in [*first, *second])
    assert claimed == ["f-1", "f-2"]  # each once, between them
    assert {u.announcement for u in first + second} == {b'{"id":"f-1"}', b'{"id":"f-2"}'}
    assert await due_now(records) == []  # claimed: due after AFTER
    await overdue(fresh_engine, "f-1")
    [again] = await due_now(records)  # the claim ran out
    assert again.file_id == "f-1"


async def test_a_sweep_passes_over_a_file_another_transaction_holds(
    records: Files, fresh_engine: AsyncEngine
) -> None:
    # A prune deleting the page's files in another order than the claim took them deadlocked
    # with it on PostgreSQL: the claim now never waits for a row.
    if fresh_engine.dialect.name != "postgresql":
        pytest.skip("SQLite has a single writer: no row is held while another is claimed")
    at = datetime.now(UTC)
    for file_id in ("f-1", "f-2"):
        await records.add(uploaded(file_id), at, announcement=b"{}")
    await overdue(fresh_engine, "f-1", "f-2")
    async with fresh_engine.begin() as pruning:
        await pruning.execute(text("SELECT 1 FROM files WHERE file_id = 'f-1' FOR UPDATE"))
        [claimed] = await asyncio.wait_for(due_now(records), timeout=5)
        assert claimed.file_id == "f-2"
    [later] = await due_now(records)  # no longer held (nor deleted, here): its turn
    assert later.file_id == "f-1"


async def test_an_announced_file_is_never_due(records: Files, fresh_engine: AsyncEngine) -> None:
    due = await records.add(uploaded("f-1"), datetime.now(UTC), announcement=b"{}")
    assert due is not None
    await records.announced("f-1", due)
    await overdue(fresh_engine, "f-1")
    assert await due_now(records) == []
    found = await records.get("f-1")
    assert found is not None and found["announce_at"] is None


async def test_settling_an_announcement_leaves_one_written_since_to_its_writer(
    records: Files, fresh_engine: AsyncEngine
) -> None:
    # A request (or a sweep) that had published the earlier announcement cleared whatever was
    # there: a keyed repeat's announcement written meanwhile, never confirmed, was lost.
    first = await records.add(uploaded("f-1"), datetime.now(UTC), announcement=b"1")
    assert first is not None
    await records.announcing("f-1", b"2")
    await records.announced("f-1", first)
    await overdue(fresh_engine, "f-1")
    [pending] = await due_now(records)
    assert pending.announcement == b"2"
    await records.announced("f-1", pending.due)  # the claim's: the sweep settles it
    assert await due_now(records) == []


async def test_a_sweep_pass_takes_only_what_was_due_when_it_began(
    records: Files, fresh_engine: AsyncEngine
) -> None:
    await records.add(uploaded("f-1"), datetime.now(UTC), announcement=b"{}")
    await overdue(fresh_engine, "f-1")
    began = datetime.now(UTC)
    [claimed] = await records.unannounced(due_by=began, limit=10)
    assert claimed.file_id == "f-1"
    # Its publish failed, and the pass went on until the claim ran out:
    async with fresh_engine.begin() as conn:
        await conn.execute(
            text("UPDATE files SET announce_at = :at"), {"at": began + timedelta(milliseconds=1)}
        )
    assert await records.unannounced(due_by=began, limit=10) == []  # not again in this pass
    assert [u.file_id for u in await due_now(records)] == ["f-1"]  # the next pass takes it


async def test_files_recorded_before_announcements_were_kept_count_as_announced(
    records: Files, fresh_engine: AsyncEngine
) -> None:
    async with fresh_engine.begin() as conn:  # the store as the previous version left it
        await conn.execute(text("DROP INDEX ix_files_unannounced"))
        await conn.execute(text("ALTER TABLE files DROP COLUMN announcement"))
        await conn.execute(text("ALTER TABLE files DROP COLUMN announce_at"))
        await conn.execute(
            text("UPDATE courier_migrations SET version = 1 WHERE component = 'gateway.files'")
        )
        await conn.execute(
            text("INSERT INTO files VALUES ('old', 'old', 'x.csv', 'text/csv', 8, :sha, :at)"),
            {"sha": "0" * 64, "at": datetime.now(UTC) - timedelta(days=1)},
        )
    upgraded = Files(fresh_engine, announce_after=AFTER)
    await upgraded.start()
    found = await upgraded.get("old")
    assert found is not None and found["announce_at"] is None
    assert await due_now(upgraded) == []
    await upgraded.add(uploaded("new"), datetime.now(UTC), announcement=b"{}")
    await overdue(fresh_engine, "new")
    assert [u.file_id for u in await due_now(upgraded)] == ["new"]
