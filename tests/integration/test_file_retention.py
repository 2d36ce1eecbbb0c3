"""Uploaded files are kept for COURIER_FILE_RETENTION_DAYS: bytes, record and analysis go."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from contracts.files import FileUploadedData
from services.blobs import LocalBlobStore
from services.gateway.files import Files
from services.messaging.store import open_store, store_url

RETENTION = timedelta(days=30)


@pytest.fixture(params=["sqlite", "postgresql"])
async def records(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Files]:
    database = None if request.param == "sqlite" else request.getfixturevalue("postgres_database")
    engine = open_store(store_url(database, tmp_path, "gateway"))
    found = Files(engine)
    await found.start()
    yield found
    await engine.dispose()


async def stored(blobs: LocalBlobStore, records: Files, file_id: str, at: datetime) -> None:
    upload = await blobs.put_stream(f"files/{file_id}")
    await upload.write(b"a,b\n1,2\n")
    await upload.commit()
    await records.add(
        FileUploadedData(
            file_id=file_id, blob=f"files/{file_id}", name="x.csv", content_type="text/csv",
            size=8, sha256="0" * 64,
        ),
        at,
    )  # fmt: skip


async def test_a_file_older_than_the_retention_is_forgotten_with_its_bytes(
    records: Files, tmp_path: Path
) -> None:
    blobs = LocalBlobStore(tmp_path / "blobs")
    now = datetime.now(UTC)
    await stored(blobs, records, "old", now - RETENTION - timedelta(days=1))
    await stored(blobs, records, "new", now)

    assert await records.prune(blobs, RETENTION) == 1

    assert await records.get("old") is None
    assert await blobs.size("files/old") is None
    assert await records.get("new") is not None
    assert await blobs.size("files/new") == 8


async def test_a_blob_already_gone_does_not_stop_the_record_going(
    records: Files, tmp_path: Path
) -> None:
    blobs = LocalBlobStore(tmp_path / "blobs")
    await stored(blobs, records, "half", datetime.now(UTC) - RETENTION - timedelta(days=1))
    await blobs.delete("files/half")  # an earlier round died after deleting the bytes
    assert await records.prune(blobs, RETENTION, batch=1) == 1
    assert await records.get("half") is None
