"""The gateway's record of uploaded files and of their analyses (the `file.processed` results).

What was uploaded is written here before `file.uploaded` is published (and removed again if the
broker does not take it); analyses arrive as `file.processed` events, applied in the same
transaction as the gateway's inbox record, like dataset results.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    MetaData,
    String,
    Table,
    delete,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from contracts.files import FileProcessed, FileUploadedData
from services.blobs import BlobStore
from services.messaging.logs import get_logger
from services.messaging.store import as_utc, migrate

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
)
results = Table(
    "file_results",
    metadata,
    Column("file_id", String(128), primary_key=True),
    Column("event_id", String(128), nullable=False),
    Column("processed_at", DateTime(timezone=True), nullable=False),
    Column("analysis", JSON, nullable=False),
)


class Files:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def start(self) -> None:
        async def create(conn: AsyncConnection) -> None:
            await conn.run_sync(metadata.create_all)

        await migrate(self._engine, "gateway.files", [create])

    async def add(self, data: FileUploadedData, uploaded_at: datetime) -> None:
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
                )
            )

    async def repoint(self, file_id: str, blob: str) -> None:
        """The file's bytes are now in `blob` (its earlier copy went missing)."""
        async with self._engine.begin() as conn:
            await conn.execute(update(files).where(files.c.file_id == file_id).values(blob=blob))

    async def remove(self, file_id: str) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(delete(files).where(files.c.file_id == file_id))

    async def record_result(self, event: FileProcessed, conn: AsyncConnection) -> None:
        """Handler of `file.processed` (stateful: same transaction as the gateway's inbox).
        The analysis of a file retention forgot meanwhile is dropped: nothing would ever
        show or prune it."""
        file_id = event.data.file_id
        if await conn.scalar(select(files.c.file_id).where(files.c.file_id == file_id)) is None:
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

    async def prune(self, blobs: BlobStore, older_than: timedelta, *, batch: int = 500) -> int:
        """Forget files uploaded longer ago than `older_than`: the stored bytes first, then the
        record and the analysis (a failure in between leaves a record whose blob is gone, and
        the next round deletes it again; never a blob no record points to). The number of
        files forgotten."""
        cutoff = datetime.now(UTC) - older_than
        removed = 0
        while True:
            async with self._engine.connect() as conn:
                old = (
                    await conn.execute(
                        select(files.c.file_id, files.c.blob)
                        .where(files.c.uploaded_at < cutoff)
                        .limit(batch)
                    )
                ).all()
            for row in old:
                await blobs.delete(row.blob)
            ids = [row.file_id for row in old]
            async with self._engine.begin() as conn:
                for table in (results, files):
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
            "processed_at": as_utc(result.processed_at) if result is not None else None,
            "analysis": result.analysis if result is not None else None,
        }
