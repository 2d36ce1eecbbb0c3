"""Receiving a multipart upload straight into blob storage, in bounded memory.

The request body is fed, chunk by chunk as it arrives, to python-multipart's incremental
`MultipartParser`. Its callbacks only note what they saw (headers, slices of part data) for the
chunk at hand; after each chunk the notes are acted on: the `file` part's headers are checked
(media type against the allow-list: 415 before a byte is stored), its data is gathered into a
block of at most `BLOCK_SIZE` bytes, and each full block (or what arrived within
`WRITE_THROUGH_SECONDS`, so a slow upload's partial file never looks abandoned) is hashed and
written to the blob upload in worker threads, side by side. So the gateway holds one request
chunk plus one block per upload, whatever the file's size; the size limit is enforced as the
bytes arrive (413, and the partial blob is removed). `notify` fields (notification targets,
before or after the file part) are gathered, bounded in size and number, and each is checked as
soon as it ends (422), as is a `callback_url` field (where the outcome is posted); other form
fields are read past and dropped.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Literal

from pydantic import TypeAdapter, ValidationError
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from contracts.envelope import CallbackUrl
from contracts.files import MEDIA_TYPE_PATTERN
from contracts.notify import CHANNELS, Channel, NotifyTarget
from services.blobs import BlobStore, BlobUpload
from services.gateway.ingest import IngestError, callback_url_problem
from services.gateway.notify_targets import MAX_VALUE_BYTES, NOTIFY_FIELD, add_target, decode_value

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

FILE_FIELD: Final = "file"
CALLBACK_FIELDS: Final = (b"callback_url", b"callbackurl")
"""The callback URL's form field, spelled as in a JSON event (either way)."""
BLOCK_SIZE: Final = 1 << 20
WRITE_THROUGH_SECONDS: Final = 60.0
"""Longest the file's received bytes wait for their block to fill before they are written. A
slow body fills a block for long (1 MiB at the minimum rate of 240 bytes a second: 73
minutes), and its partial file, untouched meanwhile, looked abandoned to the hourly sweep."""
FRAMING_ALLOWANCE: Final = 1 << 20
"""Bytes of a request beyond the file's own: boundaries, part headers, small form fields."""
UTF8_CHARSETS: Final = frozenset({"utf-8", "utf8", "us-ascii", "ascii"})
"""Declared charsets the analysis reads (ASCII is UTF-8)."""
MAX_PARTS: Final = 100
"""Parts of one request: the file, its `notify` fields, a few others read past."""
DEFAULT_TYPE: Final = "application/octet-stream"
DEFAULT_NAME: Final = "upload"
MAX_NAME_LENGTH: Final = 255

_MEDIA_TYPE = re.compile(MEDIA_TYPE_PATTERN)
# C0 and C1 controls, and the invisible format characters (bidi overrides that make
# "gnp.exe" read "exe.png", zero-width ones): a name is shown in notifications and headers.
_UNSAFE_NAME = re.compile(
    r"[\x00-\x1f\x7f-\x9f\u00ad\u061c\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff]"
)


@dataclass(frozen=True)
class ReceivedFile:
    key: str
    name: str
    content_type: str
    size: int
    sha256: str
    notify: tuple[NotifyTarget, ...] = ()
    callback_url: str | None = None


_CALLBACK_URL: Final[TypeAdapter[str]] = TypeAdapter(CallbackUrl)


def parse_callback_url(raw: bytes, channels: Collection[Channel] = CHANNELS) -> str | None:
    """A `callback_url` form value, checked as an event's (`IngestError(422)` saying why); None
    for an empty one, which an HTML form sends for an input left blank. `channels` are those
    the notifier delivers on: callbacks are webhooks."""
    url = decode_value(raw, "the callback_url").strip()
    if not url:
        return None
    if problem := callback_url_problem(url, channels):
        raise IngestError(422, problem)
    try:
        return _CALLBACK_URL.validate_python(url)  # what the contract adds: length, spaces
    except ValidationError as exc:
        problem = exc.errors()[0]["msg"].removeprefix("Value error, ")
        raise IngestError(422, f"the callback URL: {problem}") from None


def media_type_allowed(media: str, allowed: Sequence[str]) -> bool:
    """`media` matches an entry exactly, or its `type/*`, or `*/*`."""
    major = media.split("/", 1)[0]
    return any(entry in (media, f"{major}/*", "*/*") for entry in allowed)


def safe_file_name(raw: bytes | None) -> str:
    """The client's file name without directories or control characters, at most 255 long."""
    if not raw:
        return DEFAULT_NAME
    name = raw.decode("utf-8", errors="replace").replace("\\", "/").rsplit("/", 1)[-1]
    name = _UNSAFE_NAME.sub("", name).strip()
    return name[:MAX_NAME_LENGTH] or DEFAULT_NAME


PartKind = Literal["file", "notify", "callback", "other"]


@dataclass
class _Part:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    kind: PartKind = "other"
    value: bytearray = field(default_factory=bytearray)
    """A `notify` or `callback_url` part's bytes so far (one byte past the limit at most)."""

    @property
    def is_file(self) -> bool:
        return self.kind == "file"


Note = tuple[str, bytes, bytes]
"""("header", name, value), ("data", bytes, b""), or ("begin"|"headers"|"end"|"done", b"", b"")."""


class _Notes:
    """What the parser reported for one chunk, in order (the parser's callbacks are sync)."""

    def __init__(self) -> None:
        self.items: list[Note] = []
        self._field = bytearray()
        self._value = bytearray()

    def _mark(self, what: str) -> Callable[[], None]:
        return lambda: self.items.append((what, b"", b""))

    def _data(self, data: bytes, start: int, end: int) -> None:
        self.items.append(("data", data[start:end], b""))

    def _header_end(self) -> None:
        self.items.append(("header", bytes(self._field).lower(), bytes(self._value)))
        self._field.clear()
        self._value.clear()

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self._mark("begin"),
            "on_header_field": lambda data, start, end: self._field.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._value.extend(data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._mark("headers"),
            "on_part_data": self._data,
            "on_part_end": self._mark("end"),
            "on_end": self._mark("done"),
        }

    def take(self) -> list[Note]:
        items, self.items = self.items, []
        return items


class _Sink:
    """Hashes, counts and writes the file part's bytes in blocks; enforces the size limit."""

    def __init__(self, upload: BlobUpload, max_bytes: int) -> None:
        self.upload = upload
        self.size = 0
        self._max_bytes = max_bytes
        self._hash = hashlib.sha256()
        self._block = bytearray()
        self._written_at = time.monotonic()

    async def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self._max_bytes:
            raise IngestError(413, f"file larger than {self._max_bytes} bytes")
        self._block += data
        if (
            len(self._block) >= BLOCK_SIZE
            or time.monotonic() - self._written_at >= WRITE_THROUGH_SECONDS
        ):
            await self._flush()

    async def _flush(self) -> None:
        block, self._block = self._block, bytearray()
        if block:
            # hashlib and file writes release the GIL: hash and write one block in parallel.
            await asyncio.gather(
                asyncio.to_thread(self._hash.update, block), self.upload.write(block)
            )
        self._written_at = time.monotonic()

    async def finish(self) -> str:
        await self._flush()
        return self._hash.hexdigest()


async def receive_upload(
    body: AsyncIterator[bytes],
    content_type: str | None,
    *,
    store: BlobStore,
    key: str,
    max_bytes: int,
    allowed_types: Sequence[str],
    channels: Collection[Channel] = CHANNELS,
) -> ReceivedFile:
    """Stream the `file` part of a multipart/form-data body into the blob `key` and commit it.

    Raises `IngestError` (400 malformed, 413 too large, 415 not multipart or a media type not
    allowed; 422 a `notify` target or `callback_url` the notifier could not deliver to, on
    `channels`) having removed anything written.
    """
    media, options = parse_options_header(content_type)
    if media != b"multipart/form-data":
        raise IngestError(415, "send the file as multipart/form-data in a part named 'file'")
    boundary = options.get(b"boundary")
    if not boundary:
        raise IngestError(400, "multipart/form-data without a boundary")
    notes = _Notes()
    try:
        parser = MultipartParser(boundary, notes.callbacks())
    except ValueError as exc:
        raise IngestError(400, f"unusable multipart boundary: {exc}") from exc
    receiver = _Receiver(store, key, max_bytes, allowed_types, channels)
    try:
        await _feed(body, parser, notes, receiver, max_bytes + FRAMING_ALLOWANCE)
        return await receiver.finish()
    except BaseException:
        await receiver.abort()
        raise


async def _feed(
    body: AsyncIterator[bytes],
    parser: MultipartParser,
    notes: _Notes,
    receiver: _Receiver,
    max_request_bytes: int,
) -> None:
    read = 0
    try:
        async for chunk in body:
            read += len(chunk)
            if read > max_request_bytes:
                raise IngestError(413, f"request larger than {max_request_bytes} bytes")
            try:
                parser.write(chunk)
            except MultipartParseError as exc:
                raise IngestError(400, f"malformed multipart body: {exc}") from exc
            await receiver.act(notes.take())
            # What is not the file is parsed at a few MB/s, the file at hundreds: bounded by
            # itself, or a body of tiny form fields kept the loop busy for minutes.
            if read - receiver.file_bytes > FRAMING_ALLOWANCE:
                raise IngestError(
                    413, f"more than {FRAMING_ALLOWANCE} bytes besides the file (form fields)"
                )
    except ClientDisconnect:
        # Gone mid-upload: nothing is announced and the partial blob goes, as for any refusal
        # (it was a 500 with a traceback in the log, as if the gateway had failed).
        raise IngestError(400, "the client disconnected before the upload was complete") from None


class _Receiver:
    def __init__(
        self,
        store: BlobStore,
        key: str,
        max_bytes: int,
        allowed_types: Sequence[str],
        channels: Collection[Channel],
    ) -> None:
        self._store = store
        self._channels = channels
        self._key = key
        self._max_bytes = max_bytes
        self._allowed = allowed_types
        self._part = _Part()
        self._sink: _Sink | None = None
        self._name = DEFAULT_NAME
        self._type = DEFAULT_TYPE
        self._file_done = False
        self._body_done = False
        self._notify: list[NotifyTarget] = []
        self._callback_url: str | None = None
        self._parts = 0

    @property
    def file_bytes(self) -> int:
        """The file's bytes received so far."""
        return 0 if self._sink is None else self._sink.size

    async def act(self, notes: list[Note]) -> None:
        for kind, value, extra in notes:
            if kind == "begin":
                self._parts += 1
                if self._parts > MAX_PARTS:
                    raise IngestError(400, f"more than {MAX_PARTS} parts in the multipart body")
                self._part = _Part()
            elif kind == "header":
                self._part.headers[value] = extra
            elif kind == "headers":
                await self._start_part()
            elif kind == "data" and self._part.is_file:
                assert self._sink is not None
                await self._sink.write(value)
            elif kind == "data" and self._part.kind in ("notify", "callback"):
                self._gather(value)
            elif kind == "end" and self._part.is_file:
                self._file_done = True
                self._part = _Part()
            elif kind == "end" and self._part.kind == "notify":
                raw = decode_value(bytes(self._part.value), "a notify target")
                add_target(self._notify, raw, self._channels)
                self._part = _Part()
            elif kind == "end" and self._part.kind == "callback":
                self._take_callback_url(bytes(self._part.value))
                self._part = _Part()
            elif kind == "done":
                self._body_done = True

    def _gather(self, data: bytes) -> None:
        room = MAX_VALUE_BYTES + 1 - len(self._part.value)  # one byte more shows it is too long
        self._part.value += data[: max(room, 0)]

    def _take_callback_url(self, raw: bytes) -> None:
        url = parse_callback_url(raw, self._channels)
        if url is None:
            return
        if self._callback_url is not None:
            raise IngestError(422, "one callback_url per upload")
        self._callback_url = url

    async def _start_part(self) -> None:
        disposition, params = parse_options_header(self._part.headers.get(b"content-disposition"))
        name = params.get(b"name") if disposition == b"form-data" else None
        if name == NOTIFY_FIELD.encode():
            self._part.kind = "notify"
            return
        if name in CALLBACK_FIELDS:
            self._part.kind = "callback"
            return
        if name != FILE_FIELD.encode():
            return  # another form field: read past it
        if self._sink is not None:
            raise IngestError(400, "one file per request: more than one part named 'file'")
        declared, type_params = parse_options_header(self._part.headers.get(b"content-type"))
        media = declared.decode("latin-1") or DEFAULT_TYPE
        charset = type_params.get(b"charset", b"").decode("latin-1").lower()
        if charset and charset not in UTF8_CHARSETS:
            # The analysis reads text as UTF-8: refused now, not dead-lettered later.
            raise IngestError(
                415, f"text is read as UTF-8, and this file is {charset!r}: convert it first"
            )
        if not _MEDIA_TYPE.fullmatch(media):
            raise IngestError(415, f"not a media type: {media!r}")
        if not media_type_allowed(media, self._allowed):
            raise IngestError(
                415, f"files of type {media!r} are not accepted; accepted: {list(self._allowed)}"
            )
        self._type = media
        self._name = safe_file_name(params.get(b"filename"))
        self._part.kind = "file"
        self._sink = _Sink(await self._store.put_stream(self._key), self._max_bytes)

    async def finish(self) -> ReceivedFile:
        if not self._body_done:
            raise IngestError(400, "the multipart body ended early (no closing boundary)")
        if self._sink is None or not self._file_done:
            raise IngestError(400, "no part named 'file' in the multipart body")
        sha256 = await self._sink.finish()
        await self._sink.upload.commit()
        return ReceivedFile(
            self._key,
            self._name,
            self._type,
            self._sink.size,
            sha256,
            tuple(self._notify),
            self._callback_url,
        )

    async def abort(self) -> None:
        if self._sink is not None:
            await self._sink.upload.abort()
