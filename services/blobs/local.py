"""A blob store in a local directory (in compose: a volume shared by gateway and processor).

A write goes to a temporary file in the blob's own directory (`.upload-*.tmp`, a name no key
can have), is fsynced, then renamed over the key atomically, and the directory is fsynced: a
crash leaves either the whole blob or none (and at worst a temporary file, which `sweep`
removes once nobody wrote to it for long). Every blocking call runs in a worker thread, so the
event loop never waits on the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import BinaryIO

from services.blobs.base import CHUNK_SIZE, BlobNotFound, check_key, is_key

TEMP_PREFIX = ".upload-"


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalUpload:
    def __init__(self, key: str, target: Path, temp: Path, file: BinaryIO) -> None:
        self._key = key
        self._target = target
        self._temp = temp
        self._file: BinaryIO | None = file

    @property
    def key(self) -> str:
        return self._key

    async def write(self, chunk: bytes | bytearray) -> None:
        if self._file is None:
            raise ValueError("the upload is already committed or aborted")
        await asyncio.to_thread(self._write, self._file, chunk)

    @staticmethod
    def _write(file: BinaryIO, chunk: bytes | bytearray) -> None:
        # Through to the file, not only into its buffer: what was written shows in the file's
        # time, by which `sweep` tells a live upload from an abandoned one.
        file.write(chunk)
        file.flush()

    def _commit(self) -> None:
        file, self._file = self._file, None
        if file is None:
            raise ValueError("the upload is already committed or aborted")
        try:
            file.flush()
            os.fsync(file.fileno())
        finally:
            file.close()
        os.replace(self._temp, self._target)
        _fsync_directory(self._target.parent)

    async def commit(self) -> None:
        await asyncio.to_thread(self._commit)

    def _abort(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            file.close()
        self._temp.unlink(missing_ok=True)

    async def abort(self) -> None:
        # Shielded: an aborted request (client gone, task cancelled) still removes its file.
        await asyncio.shield(asyncio.to_thread(self._abort))


@dataclass(frozen=True)
class LocalBlobStore:
    """Blobs as files under `root`; picklable, so a process pool can read through it."""

    root: Path

    def path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _create(self, key: str) -> LocalUpload:
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = target.parent / f"{TEMP_PREFIX}{uuid.uuid4().hex}.tmp"
        return LocalUpload(key, target, temp, temp.open("xb"))

    async def put_stream(self, key: str) -> LocalUpload:
        return await asyncio.to_thread(self._create, key)

    def open_blocking(self, key: str) -> BinaryIO:
        try:
            return self.path(key).open("rb")
        except FileNotFoundError as exc:
            raise BlobNotFound(key) from exc

    async def stream(self, key: str, chunk_size: int = CHUNK_SIZE) -> AsyncIterator[bytes]:
        file = await asyncio.to_thread(self.open_blocking, key)
        try:
            while chunk := await asyncio.to_thread(file.read, chunk_size):
                yield chunk
        finally:
            await asyncio.to_thread(file.close)

    def _size(self, key: str) -> int | None:
        try:
            return self.path(key).stat().st_size
        except FileNotFoundError:
            return None

    async def size(self, key: str) -> int | None:
        return await asyncio.to_thread(self._size, key)

    def _delete(self, key: str) -> None:
        path = self.path(key)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            _fsync_directory(path.parent)

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self._delete, key)

    def _stale(self, older_than: timedelta) -> tuple[list[Path], list[str]]:
        cutoff = time.time() - older_than.total_seconds()
        partial: list[Path] = []
        keys: list[str] = []
        if not self.root.exists():
            return partial, keys
        for directory, _, names in os.walk(self.root):
            for name in names:
                path = Path(directory, name)
                with contextlib.suppress(FileNotFoundError):  # deleted meanwhile
                    if path.stat().st_mtime >= cutoff:
                        continue
                    if name.startswith(TEMP_PREFIX):
                        partial.append(path)
                    elif is_key(key := path.relative_to(self.root).as_posix()):
                        keys.append(key)
                    # else not a blob this store wrote (an NFS `.nfs*`, a `.DS_Store`): left
        return partial, keys

    def _remove_partial(self, older_than: timedelta) -> tuple[int, list[str]]:
        partial, keys = self._stale(older_than)
        for path in partial:
            path.unlink(missing_ok=True)
        return len(partial), keys

    async def sweep(self, older_than: timedelta) -> tuple[int, list[str]]:
        """Remove partial uploads untouched for `older_than` (their writer died: a live one
        keeps writing); the number removed, and the keys of blobs older than that, for the
        caller to check against its records."""
        return await asyncio.to_thread(self._remove_partial, older_than)
