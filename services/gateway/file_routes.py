"""HTTP routes for files: upload (streamed to blob storage), status and analysis, download."""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, HTTPException, Request, status
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from contracts.envelope import MAX_CALLBACK_URL, new_event_id
from contracts.files import FileUploaded, FileUploadedData
from contracts.notify import MAX_NOTIFY_TARGETS
from services.blobs import BlobStore
from services.gateway.broker import BrokerLink
from services.gateway.deps import BlobsDep, Broker, FilesDep, Settings, TrackingDep
from services.gateway.files import Files
from services.gateway.idempotency import IdempotencyKeys, fingerprint
from services.gateway.ingest import IngestError, correlation_header
from services.gateway.routes import (
    INGEST_HEADERS,
    STORE_AWAY,
    Problem,
    claim_key,
    idempotency_key,
    note_callbacks,
    path_segment,
    problem,
    publish_confirmed,
    replayed,
    settle_key,
    status_url,
    store_unavailable,
    unknown_unless_id,
)
from services.gateway.settings import GatewaySettings
from services.gateway.tracking import Tracking
from services.gateway.uploads import FRAMING_ALLOWANCE, ReceivedFile, receive_upload
from services.messaging.errors import BrokerUnavailable
from services.messaging.logs import event_context, get_logger
from services.messaging.publisher import event_body
from services.messaging.store import STORE_ERRORS

log = get_logger("gateway.files")
router = APIRouter()

PROCESSOR = "processor"


class FileAccepted(BaseModel):
    id: str
    type: str
    status_url: str
    file_url: str


def file_url(file_id: str) -> str:
    return f"/v1/files/{path_segment(file_id)}"


def content_disposition(name: str) -> str:
    """`attachment` with an ASCII fallback name and the exact name in RFC 5987 form."""
    fallback = "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else "_" for c in name)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"


_UPLOAD_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file"],
                "properties": {
                    "file": {"type": "string", "format": "binary"},
                    "notify": {
                        "type": "array",
                        "maxItems": MAX_NOTIFY_TARGETS,
                        "items": {"type": "string", "example": "email:ops@example.com"},
                        "description": "Targets to notify once the file is processed, each "
                        "`<channel>:<recipient>` (log, webhook, email); repeat the field",
                    },
                    "callback_url": {
                        "type": "string",
                        "format": "uri",
                        "maxLength": MAX_CALLBACK_URL,
                        "example": "https://shop.example/hooks/courier",
                        "description": "Where the analysis' outcome is posted once it is final, "
                        "succeeded or dead-lettered (a signed webhook, as for events)",
                    },
                },
            }
        }
    },
}


@router.post(
    "/v1/files",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=FileAccepted,
    responses={
        400: {
            "model": Problem,
            "description": "Malformed multipart body, no 'file' part, or a bad Idempotency-Key",
        },
        409: {
            "model": Problem,
            "description": "The Idempotency-Key was used for another upload, or its upload is "
            "still in progress",
        },
        408: {
            "model": Problem,
            "description": "The body arrived too slowly (COURIER_MIN_BODY_RATE, "
            "COURIER_BODY_IDLE_TIMEOUT_SECONDS)",
        },
        413: {"model": Problem, "description": "File larger than COURIER_MAX_UPLOAD_BYTES"},
        415: {
            "model": Problem,
            "description": "Not multipart, a file type not accepted, or text not in UTF-8",
        },
        422: {
            "model": Problem,
            "description": "A 'notify' target or a 'callback_url' that cannot be delivered to",
        },
        500: {"model": Problem, "description": "No queue is bound for file.uploaded"},
        503: {"model": Problem, "description": "The broker did not take the event; retry later"},
    },
    openapi_extra={"requestBody": _UPLOAD_BODY, "parameters": INGEST_HEADERS},
    summary="Upload one file (multipart part 'file'): streamed to storage, then analysed",
)
async def upload_file(
    request: Request,
    broker: Broker,
    settings: Settings,
    tracking: TrackingDep,
    files: FilesDep,
    blobs: BlobsDep,
) -> JSONResponse:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > settings.max_upload_bytes + FRAMING_ALLOWANCE:
        raise HTTPException(  # the declared length holds the file and the form's fields
            413,
            f"request body larger than {settings.max_upload_bytes} bytes of file "
            f"and {FRAMING_ALLOWANCE} bytes of form fields and framing",
        )
    key = idempotency_key(request)
    try:
        correlation = correlation_header(request.headers.get("x-correlation-id"))
    except IngestError as exc:  # refused before a byte of the file is taken
        raise problem(exc) from exc
    if not broker.ready:  # say so before taking a large body that could not be announced
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            "not connected to the broker",
            headers={"Retry-After": str(settings.retry_after_seconds)},
        )
    file_id = new_event_id()
    try:
        received = await receive_upload(
            request.stream(),
            request.headers.get("content-type"),
            store=blobs,
            key=file_id,
            max_bytes=settings.max_upload_bytes,
            allowed_types=settings.upload_types,
            channels=settings.notify_channels,
        )
    except IngestError as exc:
        raise problem(exc) from exc
    except OSError as exc:  # blob storage full, read-only, gone: its own words, not the store's
        log.exception("could not store an upload's bytes; refusing it")
        raise store_unavailable(settings, f"store the file ({exc.strerror or exc})") from exc
    upload = _Upload(received, correlation)
    gateway = _Gateway(broker, settings, tracking, files, blobs)
    if key is None:
        return await _announce(upload, file_id, gateway, keyed=False)
    return await _once_per_key(request, key, upload, gateway)


@dataclass(frozen=True)
class _Gateway:
    """What recording and announcing an upload takes."""

    broker: BrokerLink
    settings: GatewaySettings
    tracking: Tracking
    files: Files
    blobs: BlobStore


@dataclass(frozen=True)
class _Upload:
    received: ReceivedFile
    correlation: str | None

    def fingerprint(self, path: str) -> str:
        """What makes two uploads the same request: the file's content, name and type, its
        notify targets, callback URL and correlation id."""
        r = self.received
        targets = sorted(f"{t.channel}:{t.recipient}" for t in r.notify)  # a set, in effect
        # Only when given, so that keys claimed before the field existed still match: no
        # target's channel is `callback`.
        callback = [f"callback:{r.callback_url}"] if r.callback_url else []
        return fingerprint(
            "POST", path, r.sha256, r.name, r.content_type, *targets, *callback,
            self.correlation or "",
        )  # fmt: skip

    def announcement(self, file_id: str, blob: str) -> FileUploaded:
        """The `file.uploaded` of this upload, recorded as `file_id` with its bytes in `blob`."""
        r = self.received
        data = FileUploadedData(
            file_id=file_id,
            blob=blob,
            name=r.name,
            content_type=r.content_type,
            size=r.size,
            sha256=r.sha256,
            notify=list(r.notify),
        )
        return FileUploaded(
            id=file_id, correlationid=self.correlation, callbackurl=r.callback_url, data=data
        )


async def _once_per_key(
    request: Request, key: str, upload: _Upload, gateway: _Gateway
) -> JSONResponse:
    """The same `Idempotency-Key` and file: one file, announced once. A repeat gets the first
    response; the copy it sent is not kept. After a `503` the repeat announces the file under
    the first attempt's id, its stored copy if one was kept (the announcement may have landed:
    the processor drops a second one)."""
    keys: IdempotencyKeys = request.app.state.idempotency
    stored = upload.received.key
    request_id = upload.fingerprint(request.url.path)
    try:
        claim = await claim_key(keys, key, request_id, [stored], gateway.settings)
    except BaseException:
        await _discard(gateway.blobs, stored)
        raise
    if claim.kind == "done":
        await _discard(gateway.blobs, stored)
        return replayed(claim)
    [file_id] = claim.event_ids
    announce = functools.partial(_announce, upload, file_id, gateway, keyed=True)
    return await settle_key(keys, key, claim, announce)


async def _announce(
    upload: _Upload, file_id: str, gateway: _Gateway, *, keyed: bool
) -> JSONResponse:
    """Record the stored file as `file_id` and announce it (`file.uploaded`), confirmed.

    Under an `Idempotency-Key` (`keyed`) the id may be an earlier attempt's: its record and
    copy are used if it kept them. A keyed attempt that fails keeps its record and copy too,
    for the key's repeat (or another request that took the key over) to announce; retention
    removes them if none comes."""
    files, blobs, settings = gateway.files, gateway.blobs, gateway.settings
    received, correlation = upload.received, upload.correlation
    with event_context(file_id, correlation or file_id):
        accepted_at = datetime.now(UTC)  # before the publish: consumers may report sooner
        if received.callback_url is not None:
            # Before the record, which the sweep may announce: no announcement without its URL.
            try:
                await note_callbacks(
                    gateway.tracking, [upload.announcement(file_id, received.key)], settings
                )
            except BaseException:
                await _discard(blobs, received.key)
                raise
        try:
            recorded = await _record(file_id, upload, files, blobs, accepted_at)
        except STORE_ERRORS as exc:
            log.exception("could not record the file; refusing it")
            await _discard(blobs, received.key)
            raise store_unavailable(settings, "record the file") from exc
        event = recorded.event
        try:
            await publish_confirmed(gateway.broker, settings, event)
        except BaseException as exc:
            if _maybe_published(exc):
                # The processor may be about to read the file: it stays, and the record keeps
                # its announcement, which FileAnnouncer publishes again.
                if isinstance(exc, HTTPException):
                    raise _maybe_accepted(file_id, exc, keyed=keyed) from exc.__cause__
                raise
            pending = await _still_pending(gateway, file_id, recorded, upload, keyed=keyed)
            if pending is not None and isinstance(exc, HTTPException):
                raise _announced_later(file_id, exc, pending) from exc.__cause__
            raise
        gateway.tracking.accepted(event, accepted_at)
        await _announced(files, file_id, recorded.due)
        log.info(
            "file stored", extra={"size": received.size, "content_type": received.content_type}
        )
    accepted = FileAccepted(
        id=file_id, type=event.type, status_url=status_url(file_id), file_url=file_url(file_id)
    )
    return JSONResponse(
        accepted.model_dump(), status_code=202, headers={"Location": accepted.file_url}
    )


@dataclass(frozen=True)
class _Recorded:
    event: FileUploaded
    """The announcement, about to be published."""
    due: datetime
    """When the sweep would publish it again."""
    maybe_announced: bool
    """An earlier attempt under the same key left its announcement unconfirmed."""


async def _record(
    file_id: str, upload: _Upload, files: Files, blobs: BlobStore, at: datetime
) -> _Recorded:
    """Record the received copy as `file_id`, or find the copy an earlier attempt under the
    same key recorded (and drop this one), with the announcement about to be published."""
    received = upload.received
    earlier = None if file_id == received.key else await files.get(file_id)
    if earlier is None:
        event = upload.announcement(file_id, received.key)
        due = await files.add(event.data, at, announcement=event_body(event))
        return _Recorded(event, due, maybe_announced=False)
    maybe_announced = earlier["announce_at"] is not None
    kept: str = earlier["blob"]
    if await blobs.size(kept) is None:  # gone meanwhile (retention): this copy takes its place
        event = upload.announcement(file_id, received.key)
        due = await files.repoint(file_id, received.key, announcement=event_body(event))
        return _Recorded(event, due, maybe_announced)
    await _discard(blobs, received.key)
    event = upload.announcement(file_id, kept)
    due = await files.announcing(file_id, event_body(event))
    return _Recorded(event, due, maybe_announced)


async def _discard(blobs: BlobStore, key: str) -> None:
    """Delete the copy of an upload that no file record points to. A failure to delete is
    logged, not raised: the answer is about the upload (a failure before it, or a repeat's
    replay), and the retention sweep removes copies no record points to."""
    try:
        await blobs.delete(key)
    except OSError:
        log.exception("could not delete an unused copy; the retention sweep removes it")


async def _still_pending(
    gateway: _Gateway, file_id: str, recorded: _Recorded, upload: _Upload, *, keyed: bool
) -> str | None:
    """After a refusal that certainly announced nothing: take the announcement back, so the
    sweep does not announce the file behind the client's back. None if nothing will announce
    it, else why the sweep still will."""
    if not keyed and await _forget(gateway.files, file_id):
        # Not announced, so never processed: leave nothing behind.
        await _discard(gateway.blobs, upload.received.key)
        return None
    if recorded.maybe_announced:
        # The sweep makes sure, as that attempt's client was told.
        return "an earlier attempt under its Idempotency-Key may have been accepted"
    # The key's repeat announces it, if one comes.
    if await _announced(gateway.files, file_id, recorded.due):
        return None
    return "the gateway's store failed as it took the file back"


async def _announced(files: Files, file_id: str, due: datetime) -> bool:
    """Nothing is left to announce; whether that was noted. A store failing now is logged:
    the answer is about the publish, and a record that keeps its announcement is only
    announced once more."""
    try:
        await files.announced(file_id, due)
    except STORE_ERRORS:
        log.exception("could not note the file's announcement as settled")
        return False
    return True


def _announced_later(file_id: str, refusal: HTTPException, why: str) -> HTTPException:
    """The refusal of an upload whose announcement stays pending (`why`): the sweep publishes
    it once the broker takes it, so a client that uploaded again unawares would have the file
    analysed twice."""
    return HTTPException(
        refusal.status_code,
        f"{refusal.detail}; file {file_id!r} will be announced later all the same ({why}): "
        f"see {file_url(file_id)} before uploading it again",
        headers={**(refusal.headers or {}), "Location": file_url(file_id)},
    )


async def _forget(files: Files, file_id: str) -> bool:
    """Remove the record of a file that was never announced; whether that worked. A store
    failing now is logged (the answer is about the publish, which failed first), and the
    file's copy is then kept: a record never points at nothing."""
    try:
        await files.remove(file_id)
    except STORE_ERRORS:
        log.exception("could not remove the record of a file never announced")
        return False
    return True


def _maybe_accepted(file_id: str, refusal: HTTPException, *, keyed: bool) -> HTTPException:
    """The 503 of an upload the broker may have announced. A retry without the request's
    `Idempotency-Key` would upload a second file under a new id (analysed, and its targets
    told, twice): the client should look first, or, if it sent a key, repeat with it."""
    repeat = "; or upload it again with the same Idempotency-Key" if keyed else ""
    return HTTPException(
        status.HTTP_503_SERVICE_UNAVAILABLE,
        f"the broker did not confirm the upload of file {file_id!r}: it may have been accepted; "
        f"see {file_url(file_id)} (and its status) before uploading it again{repeat}",
        headers={**(refusal.headers or {}), "Location": file_url(file_id)},
    )


def _maybe_published(exc: BaseException) -> bool:
    """Whether the broker may have the event all the same (written, never confirmed), or
    the request was cancelled while publishing (shutting down), where no one can tell."""
    if isinstance(exc, asyncio.CancelledError):
        return True
    cause = exc.__cause__
    return isinstance(cause, BrokerUnavailable) and cause.maybe_published


def _processing(
    found: dict[str, Any] | None, analysed: bool, announce_at: datetime | None
) -> dict[str, Any]:
    if analysed:
        return {"status": "succeeded"}
    info = (found or {}).get("services", {}).get(PROCESSOR)
    if info is None and announce_at is not None:
        return {
            "status": "pending",
            "next_attempt_at": announce_at,
            "detail": "the broker has not confirmed the file's announcement; "
            "it is published again until it does",
        }
    if info is None:
        return {"status": "pending"}
    # "succeeded" is shown once the analysis is here too (the result may trail the report).
    state = "processing" if info["state"] == "succeeded" else info["state"]
    view = {"status": state, "attempt": info.get("attempt")}
    for key in ("next_attempt_at", "reason", "detail"):
        if info.get(key) is not None:
            view[key] = info[key]
    return view


@router.get(
    "/v1/files/{file_id}",
    summary="A file's record, its processing status and, once done, its analysis",
    responses={404: {"model": Problem, "description": "Unknown file"}, **STORE_AWAY},
)
async def file_status(file_id: str, files: FilesDep, tracking: TrackingDep) -> dict[str, Any]:
    unknown_unless_id(file_id, "file")
    record = await files.get(file_id)
    if record is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no file {file_id!r} is known")
    del record["blob"]
    announce_at = record.pop("announce_at")
    analysed = record["analysis"] is not None
    found = None if analysed else await tracking.status(file_id)
    return {
        **record,
        **_processing(found, analysed, announce_at),
        "status_url": status_url(file_id),
        "content_url": f"{file_url(file_id)}/content",
    }


@router.get(
    "/v1/files/{file_id}/content",
    summary="The uploaded bytes, streamed back as they were stored",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "The file"},
        404: {"model": Problem, "description": "Unknown file"},
        **STORE_AWAY,
    },
)
async def file_content(file_id: str, files: FilesDep, blobs: BlobsDep) -> StreamingResponse:
    unknown_unless_id(file_id, "file")
    record = await files.get(file_id)
    size = None if record is None else await blobs.size(record["blob"])
    if record is None or size is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no file {file_id!r} is stored")
    return StreamingResponse(
        blobs.stream(record["blob"]),
        headers={
            # As a header, not `media_type`: Starlette would add `charset=utf-8` to a text
            # type, a claim about bytes the gateway never decoded.
            "Content-Type": record["content_type"],
            "Content-Length": str(size),
            "Content-Disposition": content_disposition(record["name"]),
            "ETag": f'"{record["sha256"]}"',
            "X-Content-Type-Options": "nosniff",
        },
    )
