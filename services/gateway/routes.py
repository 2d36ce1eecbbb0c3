"""HTTP routes: event ingest and health."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, HTTPException, Request, Response, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from contracts.events import IngestEvent
from contracts.topology import events_exchange
from services.gateway.deps import Broker, Settings
from services.gateway.ingest import BATCH, JSON, STRUCTURED, IngestError, parse_batch, parse_event
from services.messaging.errors import BrokerUnavailable, Unroutable
from services.messaging.logs import event_context, get_logger

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
    400: {"model": Problem, "description": "Malformed JSON"},
    413: {"model": Problem, "description": "Body or batch too large"},
    415: {"model": Problem, "description": "Unsupported content type"},
    422: {"model": Problem, "description": "Not a valid event"},
    500: {"model": Problem, "description": "No queue is bound for the event type"},
    503: {"model": Problem, "description": "The broker did not take the event; retry later"},
}


def status_url(event_id: str) -> str:
    return f"/v1/events/{event_id}"


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise IngestError(413, f"body larger than {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise IngestError(413, f"body larger than {limit} bytes")
    return bytes(body)


def _problem(exc: IngestError) -> HTTPException:
    return HTTPException(exc.status, exc.detail)


async def _publish(broker: Broker, settings: Settings, event: IngestEvent) -> None:
    with event_context(event.id, event.correlation()):
        try:
            await broker.publisher.publish_event(
                event, exchange=events_exchange(settings.namespace)
            )
        except Unroutable as exc:
            log.exception("no queue bound for an accepted event type", extra={"type": event.type})
            raise HTTPException(
                status.HTTP_500_INTERNAL_SERVER_ERROR,
                f"no queue is bound for event type {event.type!r}; the topology is incomplete",
            ) from exc
        except BrokerUnavailable as exc:
            log.warning("broker did not take the event", extra={"error": str(exc)})
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE,
                f"the broker did not take the event: {exc}",
                headers={"Retry-After": str(settings.retry_after_seconds)},
            ) from exc


@router.post(
    "/v1/events",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=Accepted,
    responses=_ERRORS,
    openapi_extra={"requestBody": _event_body_schema("#/components/schemas/IngestEvent")},
    summary="Submit one event (plain JSON, or a CloudEvent in structured or binary mode)",
)
async def submit_event(
    request: Request, response: Response, broker: Broker, settings: Settings
) -> Accepted:
    try:
        body = await read_body(request, settings.max_body_bytes)
        event = parse_event(request.headers.get("content-type"), request.headers, body)
    except IngestError as exc:
        raise _problem(exc) from exc
    await _publish(broker, settings, event)
    response.headers["Location"] = status_url(event.id)
    return Accepted(id=event.id, type=event.type, status_url=status_url(event.id))


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
                    }
                }
                for media in (JSON, BATCH)
            },
        }
    },
    summary="Submit several events: all validated first, then published with pipelined confirms",
)
async def submit_batch(request: Request, broker: Broker, settings: Settings) -> Any:
    try:
        body = await read_body(request, settings.max_body_bytes)
        events = parse_batch(
            request.headers.get("content-type"), request.headers, body, settings.max_batch_events
        )
    except IngestError as exc:
        raise _problem(exc) from exc
    outcomes = await asyncio.gather(
        *(_publish(broker, settings, event) for event in events), return_exceptions=True
    )
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    if not failures:
        return BatchAccepted(
            events=[Accepted(id=e.id, type=e.type, status_url=status_url(e.id)) for e in events]
        )
    return _partial_failure(events, outcomes, failures)


def _partial_failure(
    events: Sequence[IngestEvent],
    outcomes: Sequence[BaseException | None],
    failures: Sequence[BaseException],
) -> JSONResponse:
    """Some events were confirmed, some not: say exactly which, so a retry can resend the rest."""
    for failure in failures:
        if not isinstance(failure, HTTPException):
            raise failure
    http_failures = [f for f in failures if isinstance(f, HTTPException)]
    worst = max(http_failures, key=lambda f: f.status_code)
    return JSONResponse(
        status_code=worst.status_code,
        headers=worst.headers,
        content={
            "detail": worst.detail,
            "published": [e.id for e, o in zip(events, outcomes, strict=True) if o is None],
            "failed": [e.id for e, o in zip(events, outcomes, strict=True) if o is not None],
        },
    )


@router.get("/healthz", summary="Liveness: the process runs")
async def healthz() -> dict[str, str]:
    return {"status": "alive"}


@router.get("/readyz", summary="Readiness: connected to the broker with the topology declared")
async def readyz(broker: Broker) -> JSONResponse:
    ready = broker.ready
    body: dict[str, Any] = {"ready": ready}
    if broker.topology_error:
        body["topology_error"] = broker.topology_error
    return JSONResponse(status_code=200 if ready else 503, content=body)
