"""HTTP routes: event ingest and health."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import orjson
from fastapi import APIRouter, HTTPException, Request, status
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from pydantic_core import to_jsonable_python
from starlette.convertors import Convertor, register_url_convertor
from starlette.requests import ClientDisconnect

from contracts.envelope import Envelope, is_event_id
from contracts.events import IngestEvent
from contracts.topology import events_exchange, workers_of
from contracts.tracking import CancellationRequested, CancellationRequestedData
from services.gateway.broker import BrokerLink
from services.gateway.deps import Broker, Settings, TrackingDep
from services.gateway.idempotency import MAX_KEY_LENGTH, Claim, IdempotencyKeys, fingerprint
from services.gateway.ingest import (
    BATCH,
    JSON,
    STRUCTURED,
    IngestError,
    media_type,
    parse_batch,
    parse_event,
)
from services.gateway.settings import GatewaySettings
from services.gateway.tracking import Tracking, states_of
from services.messaging.errors import BrokerUnavailable, Unpublishable, Unroutable
from services.messaging.logs import Throttle, event_context, get_logger
from services.messaging.store import STORE_ERRORS

log = get_logger("gateway")
router = APIRouter()


class Accepted(BaseModel):
    id: str
    type: str
    status_url: str


class BatchAccepted(BaseModel):
    events: list[Accepted]


class Problem(BaseModel):
    detail: Any


def _event_body_schema(ref: str) -> dict[str, Any]:
    return {
        "required": True,
        "content": {JSON: {"schema": {"$ref": ref}}, STRUCTURED: {"schema": {"$ref": ref}}},
    }


_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": Problem, "description": "Malformed JSON, or a bad Idempotency-Key"},
    408: {
        "model": Problem,
        "description": "The body arrived too slowly (COURIER_MIN_BODY_RATE, "
        "COURIER_BODY_IDLE_TIMEOUT_SECONDS)",
    },
    413: {"model": Problem, "description": "Body or batch too large"},
    415: {"model": Problem, "description": "Unsupported content type"},
    409: {
        "model": Problem,
        "description": "The Idempotency-Key was used with another request, or its request is "
        "still in progress",
    },
    422: {"model": Problem, "description": "Not a valid event (or X-Correlation-ID)"},
    500: {"model": Problem, "description": "No queue is bound for the event type"},
    503: {"model": Problem, "description": "The broker did not take the event; retry later"},
}

STORE_AWAY: dict[int | str, dict[str, Any]] = {
    503: {
        "model": Problem,
        "description": "The gateway could not reach its store; retry later (Retry-After)",
    }
}
"""What a read answers while the gateway's store is away (`store_away`)."""

INGEST_HEADERS: list[dict[str, Any]] = [
    {
        "name": "Idempotency-Key",
        "in": "header",
        "required": False,
        "schema": {"type": "string", "minLength": 1, "maxLength": MAX_KEY_LENGTH},
        "description": "The same key and request publish once: a repeat gets the first "
        "response, another request with the key 409.",
    },
    {
        "name": "X-Correlation-ID",
        "in": "header",
        "required": False,
        "schema": {"type": "string"},
        "description": "The correlation id of what is published (cut to 128 characters).",
    },
]
"""Headers the ingest routes read (besides, in binary mode, the event's `ce-*` attributes)."""


def status_url(event_id: str) -> str:
    return f"/v1/events/{path_segment(event_id)}"


def path_segment(event_id: str) -> str:
    """An id as one URL path segment: any text but control characters, so `?`, `#`, `/` and
    `%` are escaped, and the `Location` header stays ASCII (a response header must be). The
    ids `.` and `..` are escaped whole: as they are, clients resolve them as dot segments
    (`/v1/events/..` is `/v1/`)."""
    if event_id in (".", ".."):
        return "%2E" * len(event_id)
    return quote(event_id, safe="")


class _EventIdConvertor(Convertor[str]):
    """An id in a path: any text, `/` included (escaped in the URLs the gateway gives, but
    servers decode it before routing), except one that ends in `/`, so that a trailing slash
    still redirects (`POST /v1/events/` to `/v1/events`)."""

    regex = ".*[^/]"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("event_id", _EventIdConvertor())


def unknown_unless_id(event_id: str, what: str = "event") -> None:
    """A 404 for a path that cannot hold an id (a NUL: PostgreSQL would refuse the query)."""
    if not is_event_id(event_id):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no {what} {event_id!r} is known")


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise IngestError(413, f"body larger than {limit} bytes")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise IngestError(413, f"body larger than {limit} bytes")
    except ClientDisconnect:
        # The client went away mid-body: nothing was published; no one is left to answer.
        raise IngestError(400, "the client disconnected before the body was complete") from None
    return bytes(body)


def problem(exc: IngestError) -> HTTPException:
    return HTTPException(exc.status, exc.detail)


async def publish_confirmed(broker: Broker, settings: Settings, event: Envelope) -> None:
    """Publish one event and return once the broker confirmed it; else an HTTPException."""
    with event_context(event.id, event.correlation()):
        try:
            await broker.publisher.publish_event(
                event, exchange=events_exchange(settings.namespace)
            )
        except (Unroutable, BrokerUnavailable, Unpublishable) as exc:
            raise _refusal(event, exc, settings) from exc


_refusals_logged = Throttle()
"""The broker refusing events (not connected, a full queue): every request meets it."""
_store_failures_logged = Throttle()
"""The store failing the reads no route handles (status polls): every request meets it."""


def _refusal(
    event: Envelope,
    failure: Unroutable | BrokerUnavailable | Unpublishable,
    settings: GatewaySettings,
) -> HTTPException:
    """The answer for an event the broker did not take, logged with the event's ids."""
    with event_context(event.id, event.correlation()):
        if isinstance(failure, Unpublishable):  # the contract admits what AMQP cannot carry
            log.error("an accepted event cannot be published", exc_info=failure)
            return HTTPException(
                status.HTTP_500_INTERNAL_SERVER_ERROR, f"event {event.id!r} cannot be published"
            )
        if isinstance(failure, Unroutable):
            log.error(
                "no queue bound for an accepted event type",
                extra={"type": event.type},
                exc_info=failure,
            )
            return HTTPException(
                status.HTTP_500_INTERNAL_SERVER_ERROR,
                f"no queue is bound for event type {event.type!r}; the topology is incomplete",
            )
        retry = {"Retry-After": str(settings.retry_after_seconds)}
        if isinstance(failure, BrokerUnavailable) and failure.maybe_published:
            # At least once: the broker may have it. Retried under the same id (or the same
            # Idempotency-Key, which keeps the ids), the consumers drop the second copy.
            log.warning("broker did not confirm the event", extra={"error": str(failure)})
            return HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE,
                f"the broker did not confirm event {event.id!r} ({failure}): it may have "
                "been accepted; retry with the same event id or Idempotency-Key",
                headers=retry,
            )
        suppressed = _refusals_logged()
        if suppressed is not None:  # the client has its 503; one line per outage's stretch
            log.warning(
                "broker did not take the event",
                extra={"error": str(failure), "suppressed": suppressed},
            )
        return HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            f"the broker did not take the event: {failure}",
            headers=retry,
        )


class FastJSONResponse(JSONResponse):
    """JSON rendered by orjson (the ingest routes answer thousands of times a second)."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def _accepted(
    events: Sequence[IngestEvent], tracking: Tracking, at: datetime
) -> list[dict[str, str]]:
    """Note the events as accepted; their `Accepted` bodies (built as plain dicts: hot path)."""
    for event in events:
        tracking.accepted(event, at)
    return [{"id": e.id, "type": e.type, "status_url": status_url(e.id)} for e in events]


async def note_callbacks(
    tracking: Tracking, events: Sequence[Envelope], settings: GatewaySettings
) -> None:
    """Store the events' callback URLs before publishing; 503 if the store is not there
    (nothing was published: the client may simply retry)."""
    try:
        await tracking.note_callbacks(events)
    except STORE_ERRORS as exc:
        log.exception("could not store callback URLs; refusing the events")
        raise store_unavailable(settings, "store the callback URL") from exc


def store_unavailable(settings: GatewaySettings, what: str) -> HTTPException:
    """The answer when the gateway's store failed before anything was published: the client
    may simply retry."""
    return HTTPException(
        status.HTTP_503_SERVICE_UNAVAILABLE,
        f"the gateway could not {what}; retry later",
        headers={"Retry-After": str(settings.retry_after_seconds)},
    )


async def store_away(request: Request, exc: Exception) -> Response:
    """A store failure no route handled (a status read, a result, a file's record): an outage
    to wait out, a 503 the client retries, not a 500 that blames the request."""
    suppressed = _store_failures_logged()
    if suppressed is not None:  # the client has its 503; one line per outage's stretch
        log.error(
            "the store failed a request",
            exc_info=exc,
            extra={"path": request.url.path, "suppressed": suppressed},
        )
    answer = store_unavailable(request.app.state.settings, "reach its store")
    return await http_exception_handler(request, answer)


def _ingest_state(request: Request) -> tuple[BrokerLink, GatewaySettings, Tracking]:
    """What the ingest routes need, read from the app directly: FastAPI's dependency
    resolution costs more per request than the rest of the route's own work but the publish."""
    state = request.app.state
    return state.broker, state.settings, state.tracking


def idempotency_key(request: Request) -> str | None:
    """The request's `Idempotency-Key`, if it has one (400 if it is empty or too long)."""
    key = request.headers.get("idempotency-key")
    if key is not None and not 0 < len(key) <= MAX_KEY_LENGTH:
        raise HTTPException(400, f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} characters")
    return key


async def claim_key(
    keys: IdempotencyKeys, key: str, request_id: str, ids: list[str], settings: GatewaySettings
) -> Claim:
    """Take `key` for this request (`publish`, under the ids the claim holds), or find the
    response of an earlier one (`done`). A request with the key in progress elsewhere is
    waited for; still busy, or the key taken by another request: 409."""
    try:
        claim = await keys.claim(key, request_id, ids)
        if claim.kind == "busy":
            try:
                async with asyncio.timeout(settings.publish_timeout * 2):
                    waited = await keys.wait(key, request_id)
            except TimeoutError:
                waited = None
            claim = waited or await keys.claim(key, request_id, ids)
    except STORE_ERRORS as exc:
        log.exception("could not claim an Idempotency-Key")
        raise store_unavailable(settings, "check the Idempotency-Key") from exc
    if claim.kind == "busy":
        raise HTTPException(409, "a request with this Idempotency-Key is still in progress")
    if claim.kind == "conflict":
        raise HTTPException(409, "this Idempotency-Key was used with a different request")
    return claim


def replayed(claim: Claim) -> JSONResponse:
    """The first response of a key's request, again."""
    stored = claim.response
    headers = {"Idempotent-Replayed": "true"}
    if stored.get("location"):
        headers["Location"] = stored["location"]
    return JSONResponse(stored["body"], status_code=claim.status_code or 202, headers=headers)


async def settle_key(
    keys: IdempotencyKeys,
    key: str,
    claim: Claim,
    response: Callable[[], Awaitable[JSONResponse]],
) -> JSONResponse:
    """Answer a claimed key's request with `response()`, and keep the answer for repeats.
    Failing, or answered with an error, the key is released: a repeat publishes again, under
    the same ids."""
    try:
        answer = await response()
    except BaseException:
        await _release(keys, key, claim)
        raise
    if answer.status_code >= 300:
        await _release(keys, key, claim)
        return answer
    stored = {"body": orjson.loads(answer.body), "location": answer.headers.get("location")}
    try:
        await keys.complete(key, claim, answer.status_code, stored)
    except STORE_ERRORS:
        # The events are the broker's: say so. Unrecorded, the key frees itself when its
        # lease ends, and a repeat publishes the same ids again (the consumers drop it).
        log.exception("could not record the response for an Idempotency-Key")
    return answer


async def _release(keys: IdempotencyKeys, key: str, claim: Claim) -> None:
    """Free the key for a repeat. If the store will not, the key's lease frees it (a repeat
    meanwhile gets 409): the answer being given (a partial failure that lists what was
    published, a "may have been accepted") must still reach the client."""
    try:
        await keys.release(key, claim)
    except STORE_ERRORS:
        log.exception("could not release an Idempotency-Key; its lease will")


async def _idempotent(
    request: Request,
    body: bytes,
    events: list[IngestEvent],
    settings: Settings,
    publish: Callable[[list[IngestEvent]], Awaitable[JSONResponse]],
) -> JSONResponse:
    """Publish once per `Idempotency-Key`: a repeat gets the first response (see idempotency)."""
    key = idempotency_key(request)
    if key is None:
        return await publish(events)
    keys: IdempotencyKeys = request.app.state.idempotency
    # In binary mode the event's attributes are headers: they are part of the request.
    attributes = sorted(
        f"{name}:{value}"
        for name, value in request.headers.items()
        if name.startswith("ce-") or name == "x-correlation-id"
    )
    request_id = fingerprint(
        request.method,
        request.url.path,
        media_type(request.headers.get("content-type")),
        *attributes,
        body,
    )
    claim = await claim_key(keys, key, request_id, [event.id for event in events], settings)
    if claim.kind == "done":
        return replayed(claim)
    # Publish under the ids this key holds, so a retry after a failure reuses them.
    events = [
        event if event.id == event_id else event.model_copy(update={"id": event_id})
        for event, event_id in zip(events, claim.event_ids, strict=True)
    ]
    return await settle_key(keys, key, claim, lambda: publish(events))


@router.post(
    "/v1/events",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=Accepted,
    responses=_ERRORS,
    openapi_extra={
        "requestBody": _event_body_schema("#/components/schemas/IngestEvent"),
        "parameters": INGEST_HEADERS,
    },
    summary="Submit one event (plain JSON, or a CloudEvent in structured or binary mode)",
)
async def submit_event(request: Request) -> JSONResponse:
    broker, settings, tracking = _ingest_state(request)
    try:
        body = await read_body(request, settings.max_body_bytes)
        event = parse_event(
            request.headers.get("content-type"), request.headers, body, settings.notify_channels
        )
    except IngestError as exc:
        raise problem(exc) from exc

    async def publish(events: list[IngestEvent]) -> JSONResponse:
        [one] = events
        await note_callbacks(tracking, events, settings)
        at = datetime.now(UTC)  # before the publish: a consumer may report before the confirm
        await publish_confirmed(broker, settings, one)
        [accepted] = _accepted(events, tracking, at)
        return FastJSONResponse(
            accepted, status_code=202, headers={"Location": accepted["status_url"]}
        )

    return await _idempotent(request, body, [event], settings, publish)


@router.post(
    "/v1/events/batch",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=BatchAccepted,
    responses=_ERRORS,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                media: {
                    "schema": {
                        "type": "array",
                        "items": {"$ref": "#/components/schemas/IngestEvent"},
                        "minItems": 1,
                    }
                }
                for media in (JSON, BATCH)
            },
        },
        "parameters": INGEST_HEADERS,
    },
    summary="Submit several events: all validated first, then published with pipelined confirms",
)
async def submit_batch(request: Request) -> JSONResponse:
    broker, settings, tracking = _ingest_state(request)
    try:
        body = await read_body(request, settings.max_body_bytes)
        events = parse_batch(
            request.headers.get("content-type"),
            request.headers,
            body,
            settings.max_batch_events,
            settings.notify_channels,
        )
    except IngestError as exc:
        raise problem(exc) from exc

    async def publish(events: list[IngestEvent]) -> JSONResponse:
        await note_callbacks(tracking, events, settings)
        at = datetime.now(UTC)  # before the publish: a consumer may report before the confirm
        outcomes = await broker.publisher.publish_events(
            events, exchange=events_exchange(settings.namespace)
        )
        if any(outcome is not None for outcome in outcomes):
            refusals = [
                None if outcome is None else _refusal(event, outcome, settings)
                for event, outcome in zip(events, outcomes, strict=True)
            ]
            _accepted([e for e, o in zip(events, outcomes, strict=True) if o is None], tracking, at)
            unconfirmed = [isinstance(o, BrokerUnavailable) and o.maybe_published for o in outcomes]
            return _partial_failure(events, refusals, unconfirmed)
        return FastJSONResponse({"events": _accepted(events, tracking, at)}, status_code=202)

    return await _idempotent(request, body, list(events), settings, publish)


def _partial_failure(
    events: Sequence[IngestEvent],
    refusals: Sequence[HTTPException | None],
    unconfirmed: Sequence[bool],
) -> JSONResponse:
    """Some events were confirmed, some not: say exactly which, so a retry can resend the rest."""
    worst = max((r for r in refusals if r is not None), key=lambda r: r.status_code)
    return JSONResponse(
        status_code=worst.status_code,
        headers=worst.headers,
        content={
            "detail": worst.detail,
            "published": [e.id for e, r in zip(events, refusals, strict=True) if r is None],
            "failed": [e.id for e, r in zip(events, refusals, strict=True) if r is not None],
            # Of the failed, those the broker may have all the same: resend them by id.
            "unconfirmed": [e.id for e, u in zip(events, unconfirmed, strict=True) if u],
        },
    )


@router.get(
    "/v1/events/{event_id:event_id}",
    summary="An event's fate: per consuming service, its state and history",
    responses={404: {"model": Problem, "description": "Unknown event id"}, **STORE_AWAY},
)
async def event_status(event_id: str, tracking: TrackingDep) -> dict[str, Any]:
    unknown_unless_id(event_id)
    found = await tracking.status_seen(event_id)
    if found is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no event {event_id!r} is known")
    if found["type"] == "dataset.submitted":
        found["result_url"] = f"/v1/datasets/{path_segment(event_id)}"
    elif found["type"] == "file.uploaded":
        found["result_url"] = f"/v1/files/{path_segment(event_id)}"
    return found


async def _cancel(event_id: str, broker: Broker, settings: Settings, tracking: Tracking) -> Any:
    unknown_unless_id(event_id)
    found = await tracking.status_seen(event_id)
    if found is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no event {event_id!r} is known")
    # Processed means succeeded at some point: a later skipped duplicate or replay of the same
    # event does not make it cancellable again.
    done = sorted(
        service
        for service, info in found["services"].items()
        if any(step["state"] == "succeeded" for step in info["history"])
    )
    if done:
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"already processed by {', '.join(done)}; too late to cancel"
        )
    request = CancellationRequested(data=CancellationRequestedData(event_id=event_id))
    try:
        await broker.publisher.publish_event(request, exchange=events_exchange(settings.namespace))
    except (BrokerUnavailable, Unroutable) as exc:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            f"the broker did not take the cancellation: {exc}",
            headers={"Retry-After": str(settings.retry_after_seconds)},
        ) from exc
    try:
        await tracking.request_cancel(event_id)
    except STORE_ERRORS:
        # The cancellation is the broker's and takes effect: only the status's
        # `cancel_requested_at` misses it. A 503 would ask for a retry that changes nothing.
        log.exception("could not note the cancellation request", extra={"event_id": event_id})
    return JSONResponse(
        {"id": event_id, "status": "cancellation_requested", "status_url": status_url(event_id)},
        status_code=status.HTTP_202_ACCEPTED,
    )


_CANCEL_RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {"model": Problem, "description": "Unknown event id"},
    409: {"model": Problem, "description": "A service already processed the event"},
    503: {"model": Problem, "description": "The broker did not take the cancellation"},
}


@router.delete(
    "/v1/events/{event_id:event_id}",
    status_code=status.HTTP_202_ACCEPTED,
    responses=_CANCEL_RESPONSES,
    summary="Cancel an event no service has processed yet (durable; every service skips it)",
)
async def cancel_event(
    event_id: str, broker: Broker, settings: Settings, tracking: TrackingDep
) -> Any:
    return await _cancel(event_id, broker, settings, tracking)


@router.post(
    "/v1/events/{event_id:event_id}:cancel",
    status_code=status.HTTP_202_ACCEPTED,
    responses=_CANCEL_RESPONSES,
    summary="Cancel an event (the same as DELETE)",
)
async def cancel_event_post(
    event_id: str, broker: Broker, settings: Settings, tracking: TrackingDep
) -> Any:
    return await _cancel(event_id, broker, settings, tracking)


@router.get(
    "/v1/datasets/{dataset_id:event_id}",
    summary="A processed dataset's summary (202 with the status while not done yet)",
    responses={
        202: {"description": "Not processed yet: the event's status"},
        404: {"model": Problem, "description": "Unknown dataset"},
        409: {
            "description": "Cancelled or dead-lettered: no summary comes (unless a replay "
            "brings one); the event's status, with the reason"
        },
        **STORE_AWAY,
    },
)
async def dataset_result(dataset_id: str, tracking: TrackingDep) -> Any:
    unknown_unless_id(dataset_id, "dataset")
    result = await tracking.result(dataset_id)
    if result is not None:
        return result
    found = await tracking.status_seen(dataset_id)
    if found is None or found["type"] not in (None, "dataset.submitted"):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no dataset {dataset_id!r} is known")
    # A client polls while it gets 202: for a dataset that will not be summarised, a 202 kept
    # it polling for ever, the failure unseen.
    states = states_of(found)
    ended = any(
        states.get(worker) in ("cancelled", "dead_lettered")
        for worker in workers_of("dataset.submitted")
    )
    code = status.HTTP_409_CONFLICT if ended else status.HTTP_202_ACCEPTED
    # Encoded as FastAPI encodes a returned dict (times end in `Z`), like `GET /v1/events/{id}`.
    return JSONResponse(to_jsonable_python(found), status_code=code)


@router.get("/healthz", summary="Liveness: the process runs")
async def healthz() -> dict[str, str]:
    return {"status": "alive"}


class Readiness(BaseModel):
    ready: bool
    topology_error: str | None = None
    publishing_blocked: bool | None = None
    """True while the broker blocks publishing (a memory or disk alarm)."""


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={
        503: {
            "model": Readiness,
            "description": "Not connected to the broker (yet), or it blocks publishing",
        }
    },
    summary="Readiness: connected to the broker with the topology declared",
)
async def readyz(broker: Broker) -> JSONResponse:
    ready = broker.ready
    body: dict[str, Any] = {"ready": ready}
    if broker.topology_error:
        body["topology_error"] = broker.topology_error
    if broker.publisher.blocked:
        body["publishing_blocked"] = True
    return JSONResponse(status_code=200 if ready else 503, content=body)
