"""The gateway's record of uploaded files and of their analyses (the `file.processed` results).

What was uploaded is written here before `file.uploaded` is published (and removed again if the
broker does not take it); analyses arrive as `file.processed` events, applied in the same
transaction as the gateway's inbox record, like dataset results.

The record also holds its announcement, the `file.uploaded` body, until the broker confirmed it:
a publish written but never confirmed, or a gateway that died between the record and the
confirm, leaves one whose fate nobody knows. `FileAnnouncer` publishes those again under the
same id (the processor's inbox drops a second copy), so an upload is never left `pending` in
silence until retention forgets it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Index,
    MetaData,
    String,
    Table,
    Text,
    and_,
    delete,
    not_,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql.elements import ColumnElement

from contracts.files import FileProcessed, FileUploadedData
from services.blobs import BlobStore
from services.messaging.logs import get_logger
from services.messaging.store import add_missing_columns, as_utc, migrate

log = get_logger("gateway.files")

metadata = MetaData()
files = Table(
    "files",
    metadata,
    Column("file_id", String(128), primary_key=True),
    Column("blob", String(512), nullable=False),
    Column("name", String(255), nullable=False),
    Column("content_type", String(255), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("uploaded_at", DateTime(timezone=True), nullable=False),
    # The `file.uploaded` body while the broker has not confirmed it, and when a sweep may
    # publish it again (claimed by moving it on). Both NULL once nothing is left to announce.
    Column("announcement", Text, nullable=True),
    Column("announce_at", DateTime(timezone=True), nullable=True),
    Index(
        "ix_files_unannounced",
        "announce_at",
        sqlite_where=text("announce_at IS NOT NULL"),
        postgresql_where=text("announce_at IS NOT NULL"),
    ),
)
ANNOUNCEMENT_COLUMNS = ("announcement", "announce_at")
results = Table(
    "file_results",
    metadata,
    Column("file_id", String(128), primary_key=True),
    Column("event_id", String(128), nullable=False),
    Column("processed_at", DateTime(timezone=True), nullable=False),
    Column("analysis", JSON, nullable=False),
)


@dataclass(frozen=True)
class Unannounced:
    """A file whose announcement the broker never confirmed."""

    file_id: str
    announcement: bytes
    uploaded_at: datetime
    due: datetime
    """When the claim runs out (what `Files.announced` takes)."""


def _add_announcement_columns(sync: Connection) -> None:
    """Version 2: records of earlier versions were announced when written (or removed)."""
    add_missing_columns(sync, files, ANNOUNCEMENT_COLUMNS)
    for index in files.indexes:
        index.create(sync, checkfirst=True)


class Files:
    def __init__(self, engine: AsyncEngine, *, announce_after: timedelta) -> None:
        """`announce_after`: how long an announcement may take before a sweep publishes it
        again (longer than a publish waits for its confirm)."""
        self._engine = engine
        self._announce_after = announce_after

    async def start(self) -> None:
        async def create(conn: AsyncConnection) -> None:
            await conn.run_sync(metadata.create_all)

        async def announcement_columns(conn: AsyncConnection) -> None:
            await conn.run_sync(_add_announcement_columns)

        await migrate(self._engine, "gateway.files", [create, announcement_columns])

    async def add(
        self, data: FileUploadedData, uploaded_at: datetime, *, announcement: bytes
    ) -> datetime:
        """Record an uploaded file, with the `announcement` about to be published; when that
        falls due again (what `announced` takes)."""
        pending, due = self._pending(announcement)
        async with self._engine.begin() as conn:
            await conn.execute(
                files.insert().values(
                    file_id=data.file_id,
                    blob=data.blob,
                    name=data.name,
                    content_type=data.content_type,
                    size=data.size,
                    sha256=data.sha256,
                    uploaded_at=uploaded_at,
                    **pending,
                )
            )
        return due

    async def repoint(self, file_id: str, blob: str, *, announcement: bytes) -> datetime:
        """The file's bytes are now in `blob` (its earlier copy went missing), announced by
        `announcement`, about to be published; when that falls due again."""
        return await self._announcing(file_id, announcement, blob=blob)

    async def announcing(self, file_id: str, announcement: bytes) -> datetime:
        """`announcement` of the recorded file is about to be published (a keyed repeat);
        when it falls due again."""
        return await self._announcing(file_id, announcement)

    async def _announcing(self, file_id: str, announcement: bytes, **values: Any) -> datetime:
        pending, due = self._pending(announcement)
        async with self._engine.begin() as conn:
            await conn.execute(
                update(files).where(files.c.file_id == file_id).values(**values, **pending)
            )
        return due

    async def announced(self, file_id: str, due: datetime) -> None:
        """Nothing is left to announce of the announcement that falls due at `due`: the
        broker confirmed it, or refused it for certain. Only that one: an announcement
        written since (a keyed repeat's, a sweep's claim) is left to its writer."""
        async with self._engine.begin() as conn:
            await conn.execute(
                update(files)
                .where(files.c.file_id == file_id, files.c.announce_at == due)
                .values(announcement=None, announce_at=None)
            )

    async def unannounced(self, *, due_by: datetime, limit: int) -> list[Unannounced]:
        """Files whose announcement fell due by `due_by`, each claimed (moved on by
        `announce_after`) so that another gateway's sweep leaves it alone meanwhile. A pass
        gives the same `due_by` to each call: what it claimed falls due after it."""
        async with self._engine.connect() as conn:
            due = (
                await conn.execute(
                    select(files.c.file_id, files.c.announcement, files.c.uploaded_at)
                    .where(files.c.announce_at <= due_by)
                    .order_by(files.c.announce_at)
                    .limit(limit)
                )
            ).all()
        claimed = []
        claim = datetime.now(UTC) + self._announce_after
        async with self._engine.begin() as conn:  # one commit for the page
            for row in due:
                # A row another transaction holds is passed over, not waited for (PostgreSQL:
                # `SKIP LOCKED`): a prune deleting the page's files in another order deadlocked
                # with the claim. What is passed over is being deleted, or claimed elsewhere.
                free = (
                    select(files.c.file_id)
                    .where(files.c.file_id == row.file_id, files.c.announce_at <= due_by)
                    .with_for_update(skip_locked=True)
                )
                taken = await conn.execute(
                    update(files)
                    .where(files.c.file_id.in_(free.scalar_subquery()))
                    .values(announce_at=claim)
                )
                if taken.rowcount == 1:
                    body = row.announcement.encode()
                    at = as_utc(row.uploaded_at)
                    claimed.append(Unannounced(row.file_id, body, at, claim))
        return claimed

    def _pending(self, announcement: bytes) -> tuple[dict[str, Any], datetime]:
        due = datetime.now(UTC) + self._announce_after
        return {"announcement": announcement.decode(), "announce_at": due}, due

    async def remove(self, file_id: str) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(delete(files).where(files.c.file_id == file_id))

    async def record_result(self, event: FileProcessed, conn: AsyncConnection) -> None:
        """Handler of `file.processed` (stateful: same transaction as the gateway's inbox).
        The analysis of a file retention forgot meanwhile is dropped: nothing would ever
        show or prune it."""
        file_id = event.data.file_id
        # Key-share-locked (PostgreSQL; SQLite has one writer): a prune's delete of the file
        # waits for this transaction, then its delete of the analyses sees this one. (The
        # announcer's updates of the row do not wait.)
        found = select(files.c.file_id).where(files.c.file_id == file_id)
        if await conn.scalar(found.with_for_update(read=True, key_share=True)) is None:
            log.info("the analysed file is forgotten already; its analysis is dropped")
            return
        exists = await conn.scalar(select(results.c.file_id).where(results.c.file_id == file_id))
        if exists is not None:
            return
        try:
            async with conn.begin_nested():
                await conn.execute(
                    results.insert().values(
                        file_id=event.data.file_id,
                        event_id=event.id,
                        processed_at=event.time,
                        analysis=event.data.analysis.model_dump(mode="json"),
                    )
                )
        except IntegrityError:
            pass  # recorded meanwhile by a concurrent delivery

    async def prune(
        self,
        blobs: BlobStore,
        older_than: timedelta,
        *,
        held: Callable[[ColumnElement[str]], ColumnElement[bool]] | None = None,
        batch: int = 500,
    ) -> int:
        """Forget files uploaded longer ago than `older_than`, except those `held` (given the
        file id: a file whose dead letter is still open, which a replay would read): the
        stored bytes first, then the record and the analysis (a failure in between leaves a
        record whose blob is gone, and the next round deletes it again; never a blob no record
        points to). The number of files forgotten."""
        cutoff = datetime.now(UTC) - older_than
        old_enough = files.c.uploaded_at < cutoff
        if held is not None:
            old_enough = and_(old_enough, not_(held(files.c.file_id)))
        removed = 0
        while True:
            async with self._engine.connect() as conn:
                old = (
                    await conn.execute(
                        select(files.c.file_id, files.c.blob).where(old_enough).limit(batch)
                    )
                ).all()
            for row in old:
                await blobs.delete(row.blob)
            ids = [row.file_id for row in old]
            async with self._engine.begin() as conn:
                # The file first: an analysis being recorded holds it until committed (see
                # `record_result`), and is then deleted with the others.
                for table in (files, results):
                    await conn.execute(delete(table).where(table.c.file_id.in_(ids)))
            removed += len(ids)
            if len(ids) < batch:
                return removed

    async def sweep(self, blobs: BlobStore, older_than: timedelta, *, batch: int = 500) -> int:
        """Remove what a gateway that died mid-upload left: partial uploads, and blobs that no
        record points to (committed, then the crash came before the record). Both only once
        older than `older_than`, far beyond an upload's few milliseconds between its commit and
        its record. The number of files removed."""
        removed, keys = await blobs.sweep(older_than)
        for at in range(0, len(keys), batch):
            chunk = keys[at : at + batch]
            async with self._engine.connect() as conn:
                known = set(
                    (await conn.scalars(select(files.c.blob).where(files.c.blob.in_(chunk)))).all()
                )
            for key in chunk:
                if key not in known:
                    log.warning("removing a blob no file record points to", extra={"blob": key})
                    await blobs.delete(key)
                    removed += 1
        return removed

    async def get(self, file_id: str) -> dict[str, Any] | None:
        """The file's record and, once analysed, its analysis; None if unknown."""
        async with self._engine.connect() as conn:
            row = (await conn.execute(select(files).where(files.c.file_id == file_id))).first()
            if row is None:
                return None
            result = (
                await conn.execute(select(results).where(results.c.file_id == file_id))
            ).first()
        return {
            "id": row.file_id,
            "blob": row.blob,
            "name": row.name,
            "content_type": row.content_type,
            "size": row.size,
            "sha256": row.sha256,
            "uploaded_at": as_utc(row.uploaded_at),
            "announce_at": as_utc(row.announce_at) if row.announce_at is not None else None,
            "processed_at": as_utc(result.processed_at) if result is not None else None,
            "analysis": result.analysis if result is not None else None,
        }
