"""The local blob store: atomic commit, nothing left by an abort, keys cannot escape the root."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.blobs import BlobNotFound, InvalidBlobKey, LocalBlobStore


def names(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


async def test_a_blob_is_visible_only_once_committed(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    upload = await store.put_stream("a/b")
    await upload.write(b"hello ")
    await upload.write(bytearray(b"world"))
    assert await store.size("a/b") is None
    [temporary] = names(tmp_path / "blobs" / "a")
    assert temporary.startswith(".upload-")
    await upload.commit()
    assert await store.size("a/b") == 11
    assert names(tmp_path / "blobs" / "a") == ["b"]
    assert b"".join([chunk async for chunk in store.stream("a/b", chunk_size=4)]) == b"hello world"
    with store.open_blocking("a/b") as file:
        assert file.read() == b"hello world"


async def test_an_aborted_upload_leaves_nothing(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    upload = await store.put_stream("x")
    await upload.write(b"partial")
    await upload.abort()
    await upload.abort()  # twice is fine
    assert names(tmp_path) == []
    with pytest.raises(ValueError, match="already"):
        await upload.write(b"more")


async def test_missing_blobs_and_deletes(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    with pytest.raises(BlobNotFound):
        store.open_blocking("nope")
    with pytest.raises(BlobNotFound):
        [chunk async for chunk in store.stream("nope")]
    upload = await store.put_stream("k")
    await upload.commit()
    await store.delete("k")
    await store.delete("k")
    assert await store.size("k") is None


@pytest.mark.parametrize("key", ["../etc/passwd", "/abs", "a/../b", ".hidden", "a//b", "", "a/"])
async def test_keys_cannot_escape_the_root(tmp_path: Path, key: str) -> None:
    store = LocalBlobStore(tmp_path)
    with pytest.raises(InvalidBlobKey):
        await store.put_stream(key)
    with pytest.raises(InvalidBlobKey):
        store.open_blocking(key)
