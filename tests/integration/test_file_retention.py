"""Uploaded files are kept for COURIER_FILE_RETENTION_DAYS: bytes, record and analysis go."""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine

from contracts.files import FileAnalysis, FileProcessed, FileProcessedData, FileUploadedData
from services.blobs import LocalBlobStore
from services.gateway.files import Files, results
from services.messaging.dead_letters import DeadLetter
from services.ops.store import FailureStore, Filter, dead_letters, open_letter_of
from tests.support.polling import eventually

RETENTION = timedelta(days=30)


@pytest.fixture
async def records(fresh_engine: AsyncEngine) -> Files:
    found = Files(fresh_engine, announce_after=timedelta(seconds=10))
    await found.start()
    return found


@pytest.fixture
async def failures(fresh_engine: AsyncEngine) -> FailureStore:
    """The gateway's failure store, on the same store as the files."""
    found = FailureStore(fresh_engine)
    await found.start()
    return found


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
        announcement=b"{}",
    )  # fmt: skip


def analysis_of(file_id: str) -> FileProcessed:
    return FileProcessed(
        data=FileProcessedData(
            file_id=file_id, name="x.csv", declared_type="text/csv", size=8, sha256="0" * 64,
            analysis=FileAnalysis(detected_type="text/csv", format="csv"),
        )
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


async def test_a_file_whose_dead_letter_is_open_is_kept_for_its_replay(
    records: Files, failures: FailureStore, tmp_path: Path
) -> None:
    # Forgotten at 30 days like any other, its letter (kept until ops act on it) replayed
    # later failed for good: "the blob is missing".
    blobs = LocalBlobStore(tmp_path / "blobs")
    long_ago = datetime.now(UTC) - RETENTION - timedelta(days=1)
    for file_id in ("failed", "done"):
        await stored(blobs, records, file_id, long_ago)
    await failures.add(file_letter("failed"))

    assert await records.prune(blobs, RETENTION, held=open_letter_of) == 1
    assert await records.get("failed") is not None and await blobs.size("files/failed") == 8
    assert await records.get("done") is None

    discarded = await failures.discard(
        Filter(), limit=10, reason="not needed", actor="ops", action_id="a-1"
    )
    assert len(discarded) == 1
    assert await records.prune(blobs, RETENTION, held=open_letter_of) == 1  # closed: it goes
    assert await records.get("failed") is None and await blobs.size("files/failed") is None


async def test_a_file_replayed_lately_is_kept_until_it_can_have_been_read_again(
    records: Files, failures: FailureStore, fresh_engine: AsyncEngine, tmp_path: Path
) -> None:
    blobs = LocalBlobStore(tmp_path / "blobs")
    long_ago = datetime.now(UTC) - RETENTION - timedelta(days=1)
    for file_id in ("replayed", "replayed-long-ago"):
        await stored(blobs, records, file_id, long_ago)
        await failures.add(file_letter(file_id))
        token, [letter_id] = await failures.claim(
            Filter(ids=(f"dl-{file_id}",)), limit=1, lease=timedelta(minutes=5)
        )
        assert await failures.mark_replayed([letter_id], token, "a-1", "ops")
    async with fresh_engine.begin() as conn:
        await conn.execute(
            update(dead_letters)
            .where(dead_letters.c.id == "dl-replayed-long-ago")
            .values(closed_at=datetime.now(UTC) - timedelta(days=2))
        )

    assert await records.prune(blobs, RETENTION, held=open_letter_of) == 1
    assert await records.get("replayed") is not None
    assert await records.get("replayed-long-ago") is None


def file_letter(file_id: str) -> DeadLetter:
    at = datetime.now(UTC)
    return DeadLetter(
        id=f"dl-{file_id}", service="processor", queue="ns.processor.files", event_id=file_id,
        event_type="file.uploaded", reason="permanent", attempts=1, replays=0,
        first_failure=at, last_failure=at, exception_type="PermanentError",
        exception_message="unreadable", traceback=None, fingerprint="f" * 16, group="g",
        body=b"{}", headers={}, correlation_id=None,
    )  # fmt: skip


async def test_a_blob_already_gone_does_not_stop_the_record_going(
    records: Files, tmp_path: Path
) -> None:
    blobs = LocalBlobStore(tmp_path / "blobs")
    await stored(blobs, records, "half", datetime.now(UTC) - RETENTION - timedelta(days=1))
    await blobs.delete("files/half")  # an earlier round died after deleting the bytes
    assert await records.prune(blobs, RETENTION, batch=1) == 1
    assert await records.get("half") is None


async def test_an_analysis_that_arrives_after_its_file_was_forgotten_leaves_nothing(
    records: Files, tmp_path: Path
) -> None:
    # It was inserted without its file: never shown, never pruned, kept for ever.
    blobs = LocalBlobStore(tmp_path / "blobs")
    await stored(blobs, records, "late", datetime.now(UTC) - RETENTION - timedelta(days=1))
    assert await records.prune(blobs, RETENTION) == 1
    async with records._engine.begin() as conn:
        await records.record_result(analysis_of("late"), conn)
        assert await conn.scalar(select(func.count()).select_from(results)) == 0


async def test_an_analysis_recorded_while_its_file_is_forgotten_goes_with_the_file(
    records: Files, tmp_path: Path
) -> None:
    # The analysis found its file, then retention deleted the file before the analysis
    # committed: the row was left for ever, its file gone.
    blobs = LocalBlobStore(tmp_path / "blobs")
    await stored(blobs, records, "racing", datetime.now(UTC) - RETENTION - timedelta(days=1))
    async with records._engine.begin() as conn:
        await records.record_result(analysis_of("racing"), conn)
        pruning = asyncio.create_task(records.prune(blobs, RETENTION))
        await deleting_the_file(records._engine)
    assert await pruning == 1
    async with records._engine.connect() as conn:
        assert await conn.scalar(select(func.count()).select_from(results)) == 0


async def deleting_the_file(engine: AsyncEngine) -> None:
    """Once the prune waits to delete the file (PostgreSQL: for the lock the analysis took;
    SQLite: for the one writer, which the analysis is, so either order ends the same)."""
    if engine.dialect.name != "postgresql":
        await asyncio.sleep(0.3)
        return

    async def waiting() -> None:
        async with engine.connect() as conn:
            blocked = await conn.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND datname = current_database() AND query LIKE 'DELETE FROM files %'"
                )
            )
        assert blocked == 1

    await eventually(waiting, timeout=10)


def age(path: Path, by: timedelta) -> None:
    """Make a file look untouched for `by` (its modification time moved back)."""
    then = path.stat().st_mtime - by.total_seconds()
    os.utime(path, (then, then))


async def test_what_a_crash_mid_upload_left_is_swept_once_old(
    records: Files, tmp_path: Path
) -> None:
    # A gateway killed mid-upload left a partial file of up to 1 GiB, or a committed blob
    # whose record was never written; nothing removed either, and repeated crashes filled the
    # volume.
    blobs = LocalBlobStore(tmp_path / "blobs")
    await stored(blobs, records, "kept", datetime.now(UTC))
    for key in ("files/orphan", "files/young"):
        upload = await blobs.put_stream(key)
        await upload.write(b"x")
        await upload.commit()
    abandoned = await blobs.put_stream("files/abandoned")
    await abandoned.write(b"partial")
    [abandoned_temp] = (tmp_path / "blobs" / "files").glob(".upload-*")
    writing = await blobs.put_stream("files/writing")
    try:
        await writing.write(b"partial")
        for path in (blobs.path("files/kept"), blobs.path("files/orphan"), abandoned_temp):
            age(path, timedelta(hours=2))

        assert await records.sweep(blobs, timedelta(hours=1)) == 2

        assert await blobs.size("files/orphan") is None and not abandoned_temp.exists()
        assert await blobs.size("files/kept") == 8  # a record points to it
        assert await blobs.size("files/young") == 1  # too young to tell
        assert len(list((tmp_path / "blobs" / "files").glob(".upload-*"))) == 1  # being written
    finally:
        await writing.abort()
        await abandoned.abort()


async def test_a_file_the_store_did_not_write_neither_stops_the_sweep_nor_is_removed(
    records: Files, tmp_path: Path
) -> None:
    # An NFS client's `.nfs*` (a deleted blob still open in the processor), a `.DS_Store`: not
    # a key, so deleting it raised InvalidBlobKey and every hourly sweep stopped there.
    blobs = LocalBlobStore(tmp_path / "blobs")
    upload = await blobs.put_stream("files/orphan")
    await upload.write(b"x")
    await upload.commit()
    stray = tmp_path / "blobs" / "files" / ".nfs000000000001"
    stray.write_bytes(b"still open elsewhere")
    for path in (blobs.path("files/orphan"), stray):
        age(path, timedelta(hours=2))

    assert await records.sweep(blobs, timedelta(hours=1)) == 1

    assert await blobs.size("files/orphan") is None
    assert stray.exists()
