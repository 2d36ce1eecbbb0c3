"""Blob storage for uploaded files: the bytes live here, events carry only a key.

`BlobStore` is the small protocol every store implements; `LocalBlobStore` (a directory, shared
by the gateway and the processor through a volume) is the one Courier ships. An object store
would implement the same five operations.
"""

from __future__ import annotations

from services.blobs.base import BlobNotFound, BlobStore, BlobUpload, InvalidBlobKey
from services.blobs.local import LocalBlobStore

__all__ = ["BlobNotFound", "BlobStore", "BlobUpload", "InvalidBlobKey", "LocalBlobStore"]
