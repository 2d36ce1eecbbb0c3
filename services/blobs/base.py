"""The blob store protocol and its errors.

    put_stream(key)      → a `BlobUpload`: write chunks, then commit (durable, visible under
                           `key` all at once) or abort (nothing left behind)
    stream(key)          → the bytes as an async iterator of chunks (for HTTP downloads)
    open_blocking(key)   → a blocking binary file object, for worker threads and processes
                           (a store is picklable, so a process pool can be handed one)
    size(key)            → the stored size, or None if there is no such blob
    delete(key)          → remove the blob; deleting a missing blob is not an error
    sweep(older_than)    → remove partial uploads nobody wrote to for that long (their writer
                           died); the keys of blobs older than that

A reader never sees a partial blob: a blob exists only once its upload committed.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import BinaryIO, Final, Protocol

from contracts.files import BLOB_KEY_PATTERN

CHUNK_SIZE: Final = 1 << 20
_KEY = re.compile(BLOB_KEY_PATTERN)


class BlobNotFound(LookupError):
    """No blob is stored under the key."""


class InvalidBlobKey(ValueError):
    """The key is not a relative `/`-separated name (see `contracts.files.BlobKey`)."""


def is_key(key: str) -> bool:
    return _KEY.fullmatch(key) is not None


def check_key(key: str) -> str:
    if not _KEY.fullmatch(key):
        raise InvalidBlobKey(f"not a valid blob key: {key!r}")
    return key


class BlobUpload(Protocol):
    """One blob being written. Exactly one of `commit` and `abort` ends it."""

    @property
    def key(self) -> str: ...

    async def write(self, chunk: bytes | bytearray) -> None: ...

    async def commit(self) -> None:
        """Make the blob durable and visible under its key, replacing any blob there."""
        ...

    async def abort(self) -> None:
        """Discard what was written. Safe to call more than once, and after a failed commit."""
        ...


class BlobStore(Protocol):
    async def put_stream(self, key: str) -> BlobUpload: ...

    def stream(self, key: str, chunk_size: int = CHUNK_SIZE) -> AsyncIterator[bytes]:
        """The blob's bytes; raises `BlobNotFound` on the first iteration if it is missing."""
        ...

    def open_blocking(self, key: str) -> BinaryIO:
        """Open the blob for blocking reads (call it off the event loop); `BlobNotFound`."""
        ...

    async def size(self, key: str) -> int | None: ...

    async def delete(self, key: str) -> None: ...

    async def sweep(self, older_than: timedelta) -> tuple[int, list[str]]:
        """Remove abandoned partial uploads: how many, and the keys of blobs that old."""
        ...
