"""An upload whose announcement the broker never confirmed is announced again, once.

The gateway records an upload with its `file.uploaded` before publishing it. A confirm that
never comes (the client is told the file "may have been accepted") or a gateway that dies
before it leaves the announcement in the record, and a periodic sweep publishes it again under
the file's id. (The gateway killed mid-publish: tests/e2e/test_upload_crash.py.)
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from contracts.events import EVENT_ADAPTER
from contracts.files import FileUploaded, FileUploadedData
from services.gateway.file_announcer import FileAnnouncer
from services.gateway.files import Files
from services.messaging.store import open_store, sqlite_time, store_url
from tests.conftest import Namespace
from tests.integration.test_files import CSV, behind_a_proxy, files_lane, refused_once
from tests.support.polling import eventually
from tests.support.queues import assert_empty, take
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
    with sqlite3.connect(tmp_path / "gateway.sqlite3", timeout=5) as store:
        store.execute(
            "UPDATE files SET announce_at = ? WHERE announce_at IS NOT NULL",
            (sqlite_time(datetime.now(UTC) - timedelta(seconds=1)),),
        )


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


# --- the record ----------------------------------------------------------------------------

AFTER = timedelta(seconds=30)


@pytest.fixture(params=["sqlite", "postgresql"])
async def engine(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    database = None if request.param == "sqlite" else request.getfixturevalue("postgres_database")
    found = open_store(store_url(database, tmp_path, "gateway"))
    yield found
    await found.dispose()


@pytest.fixture
async def records(engine: AsyncEngine) -> Files:
    found = Files(engine, announce_after=AFTER)
    await found.start()
    return found


def uploaded(file_id: str) -> FileUploadedData:
    return FileUploadedData(
        file_id=file_id, blob=file_id, name="x.csv", content_type="text/csv", size=8,
        sha256="0" * 64,
    )  # fmt: skip


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
    assert await records.unannounced(limit=10) == []


async def test_a_due_announcement_is_claimed_by_one_sweep_until_its_time_comes_again(
    records: Files, engine: AsyncEngine
) -> None:
    at = datetime.now(UTC)
    for file_id in ("f-1", "f-2"):
        await records.add(uploaded(file_id), at, announcement=f'{{"id":"{file_id}"}}'.encode())
    await overdue(engine, "f-1", "f-2")
    other_gateway = Files(engine, announce_after=AFTER)

    first, second = await asyncio.gather(
        records.unannounced(limit=10), other_gateway.unannounced(limit=10)
    )

    claimed = sorted(u.file_id for u in [*first, *second])
    assert claimed == ["f-1", "f-2"]  # each once, between them
    assert {u.announcement for u in first + second} == {b'{"id":"f-1"}', b'{"id":"f-2"}'}
    assert await records.unannounced(limit=10) == []  # claimed: not due for another AFTER
    await overdue(engine, "f-1")
    [again] = await records.unannounced(limit=10)  # the claim ran out: due again
    assert again.file_id == "f-1"


async def test_an_announced_file_is_never_due(records: Files, engine: AsyncEngine) -> None:
    await records.add(uploaded("f-1"), datetime.now(UTC), announcement=b"{}")
    await records.announced("f-1")
    await overdue(engine, "f-1")
    assert await records.unannounced(limit=10) == []
    found = await records.get("f-1")
    assert found is not None and found["announce_at"] is None


async def test_files_recorded_before_announcements_were_kept_count_as_announced(
    records: Files, engine: AsyncEngine
) -> None:
    async with engine.begin() as conn:  # the store as the previous version left it
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
    upgraded = Files(engine, announce_after=AFTER)
    await upgraded.start()
    found = await upgraded.get("old")
    assert found is not None and found["announce_at"] is None
    assert await upgraded.unannounced(limit=10) == []
    await upgraded.add(uploaded("new"), datetime.now(UTC), announcement=b"{}")
    await overdue(engine, "new")
    assert [u.file_id for u in await upgraded.unannounced(limit=10)] == ["new"]
