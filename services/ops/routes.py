"""The ops API under `/v1/ops`: list, show, group, replay and discard dead letters.

Every route needs an ops token; every replay and discard (dry runs included) is recorded with
who, when, what and how many, and listed under `/v1/ops/actions`.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    field_validator,
    model_validator,
)

from services.messaging.store import STORE_ERRORS
from services.ops.auth import Operator, authenticate, bounded
from services.ops.operations import Operations, Outcome
from services.ops.store import FailureStore, Filter, InvalidCursor, Status, utc_bound


class Problem(BaseModel):
    detail: Any


class _OpsRoute(APIRoute):
    """An ops route that checks the token before it reads the request's body, and reads at most
    COURIER_MAX_BODY_BYTES of it (413 beyond). FastAPI reads and parses a JSON body before it
    solves the route's dependencies, the token's among them: anyone could make the gateway
    read and parse a body of any size before its 401."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            await authenticate(request)
            limit: int = request.app.state.settings.max_body_bytes
            declared = request.headers.get("content-length", "")
            if declared.isascii() and declared.isdigit() and int(declared) > limit:
                raise HTTPException(
                    status.HTTP_413_CONTENT_TOO_LARGE, f"body larger than {limit} bytes"
                )
            return await handler(Request(request.scope, bounded(request.receive, limit)))

        return guarded


router = APIRouter(
    prefix="/v1/ops",
    route_class=_OpsRoute,
    tags=["ops"],
    responses={
        401: {"model": Problem, "description": "No bearer token"},
        403: {"model": Problem, "description": "A token COURIER_OPS_TOKENS does not hold"},
        413: {"model": Problem, "description": "A body larger than COURIER_MAX_BODY_BYTES"},
        503: {"model": Problem, "description": "The failure store is unavailable; retry later"},
    },
)
_BAD_BODY: dict[int | str, dict[str, Any]] = {
    # Malformed JSON text is a 422 (`json_invalid`), as every validation error of the body.
    400: {"model": Problem, "description": "The body cannot be read (not UTF-8 text)"}
}


def _storable(value: str) -> str:
    if "\x00" in value:  # PostgreSQL refuses it in text: the query would fail
        raise ValueError("no stored value holds a NUL character")
    return value


def _utc_bound(value: datetime) -> datetime:
    """A time the store can compare with (`utc_bound`): one out of range in UTC is refused."""
    try:
        utc_bound(value)
    except OverflowError as exc:  # 0001-01-01T00:00:00+01:00 is before year 1 in UTC
        raise ValueError("out of range once in UTC") from exc
    return value


Text = Annotated[str, AfterValidator(_storable)]
Criterion = Annotated[Text, Field(min_length=1, max_length=200)]
"""A filter's value. Never empty: an empty text narrows nothing, so a selection by `text: ""`
(a client's unset variable) took every dead letter past the "all" guard."""
LetterId = Annotated[Text, Field(min_length=1, max_length=64)]
Bound = Annotated[datetime, AfterValidator(_utc_bound)]


@contextmanager
def _store_away_is_503(what: str) -> Iterator[None]:
    """The store failing is an outage to wait out (503), not the request's fault (500)."""
    try:
        yield
    except STORE_ERRORS as exc:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            f"the failure store could not {what}: {exc.__class__.__name__}; retry later",
            headers={"Retry-After": "5"},
        ) from exc


class Selection(BaseModel):
    """Which dead letters: explicit ids, or filters (all of them must match)."""

    model_config = ConfigDict(extra="forbid")

    ids: list[LetterId] = Field(default_factory=list, max_length=10_000)
    service: Criterion | None = None
    event_type: Criterion | None = None
    group: Criterion | None = None
    reason: Criterion | None = None
    exception_type: Criterion | None = None
    since: Bound | None = None
    until: Bound | None = None
    text: Criterion | None = None
    exclude_ids: list[LetterId] = Field(
        default_factory=list,
        max_length=10_000,
        description="Letters not to take: a batched replay passes the ones it left dead.",
    )
    # Strict: a safety switch takes JSON's `true`, not "yes" or 1.
    all: StrictBool = Field(default=False, description="Required to select without any filter.")

    @model_validator(mode="after")
    def _not_everything_by_accident(self) -> Selection:
        criteria = self.model_dump(
            exclude={"all", "dry_run", "limit", "rate", "reason_text", "exclude_ids"}
        )
        if not self.all and not any(v not in (None, []) for v in criteria.values()):
            raise ValueError('select by ids or a filter, or say "all": true')
        return self

    def to_filter(self) -> Filter:
        return Filter(
            ids=tuple(self.ids),
            service=self.service,
            event_type=self.event_type,
            group=self.group,
            reason=self.reason,
            exception_type=self.exception_type,
            since=self.since,
            until=self.until,
            text=self.text,
            exclude_ids=tuple(self.exclude_ids),
        )


class ReplayRequest(Selection):
    dry_run: StrictBool = False
    limit: int = Field(default=100, ge=1, le=10_000, description="Most letters moved.")
    # At least a letter each 1000 s, as the CLI's --rate: the request is paced by it.
    rate: float = Field(default=100.0, ge=0.001, le=10_000, description="Most letters per second.")


def _said(value: str) -> str:
    if not value.strip():
        raise ValueError("must say why: the audit trail keeps it")
    return value


class DiscardRequest(Selection):
    reason_text: Annotated[
        Text, AfterValidator(_said), Field(min_length=1, max_length=1000, alias="why")
    ]
    dry_run: StrictBool = False
    limit: int = Field(default=100, ge=1, le=10_000)
    # By its alias only: the body says `why`.
    model_config = ConfigDict(extra="forbid")


class ListQuery(BaseModel):
    service: Text | None = None
    event_type: Text | None = None
    group: Text | None = None
    reason: Text | None = None
    exception_type: Text | None = None
    since: Bound | None = None
    until: Bound | None = None
    text: Text | None = None
    status: Status | Literal["any"] = "dead"
    """`any`: letters in every state (a query string cannot leave a default out)."""
    limit: int = Field(default=50, ge=1, le=500)
    cursor: str | None = None

    @field_validator(
        "service", "event_type", "group", "reason", "exception_type", "text", mode="before"
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # `?service=` (a client's unset variable) narrows nothing, as `?text=` never did; it
        # matched no letter. Reading is harmless; replays and discards refuse an empty filter.
        return None if value == "" else value

    def to_filter(self) -> Filter:
        return Filter(
            service=self.service,
            event_type=self.event_type,
            group=self.group,
            reason=self.reason,
            exception_type=self.exception_type,
            since=self.since,
            until=self.until,
            text=self.text,
            status=None if self.status == "any" else self.status,
        )


class OutcomeResponse(BaseModel):
    action_id: str
    dry_run: bool
    count: int
    ids: list[str]
    error: str | None = None
    skipped: dict[str, str] = {}
    """Letters a replay left dead, and why (no queue takes them)."""


def _store(request: Request) -> FailureStore:
    store: FailureStore = request.app.state.failures
    return store


def _operations(request: Request) -> Operations:
    operations: Operations = request.app.state.operations
    return operations


def _outcome(outcome: Outcome) -> OutcomeResponse:
    return OutcomeResponse(**outcome.__dict__)


@router.get("/dead-letters", summary="List dead letters, newest first, with filters and paging")
async def list_dead_letters(
    request: Request, actor: Operator, query: Annotated[ListQuery, Query()]
) -> dict[str, Any]:
    store = _store(request)
    try:
        with _store_away_is_503("list dead letters"):
            page = await store.page(query.to_filter(), limit=query.limit, cursor=query.cursor)
    except InvalidCursor as exc:
        # Shaped as every other 422 of the route (a validation error of the query).
        error = {"type": "value_error", "loc": ("query", "cursor"), "msg": str(exc)}
        raise RequestValidationError([{**error, "input": query.cursor}]) from None
    return {"items": page.items, "next_cursor": page.next_cursor}


@router.get(
    "/dead-letters/{letter_id}",
    responses={404: {"model": Problem, "description": "No such dead letter"}},
    summary="One dead letter: payload, error, history",
)
async def show_dead_letter(request: Request, actor: Operator, letter_id: str) -> dict[str, Any]:
    if "\x00" in letter_id:
        item = None  # no letter's id holds one
    else:
        with _store_away_is_503("read the dead letter"):
            item = await _store(request).get(letter_id)
    if item is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no dead letter {letter_id!r}")
    body: bytes = item.pop("body")
    try:
        item["payload"] = orjson.loads(body)
    except orjson.JSONDecodeError:
        item["payload_text"] = body.decode(errors="replace")
    item.pop("claim", None)
    return item


@router.get("/count", summary="How many dead letters match (the list's filters)")
async def count_dead_letters(
    request: Request, actor: Operator, query: Annotated[ListQuery, Query()]
) -> dict[str, int]:
    with _store_away_is_503("count dead letters"):
        return {"count": await _store(request).count(query.to_filter())}


@router.get("/groups", summary="Dead letters grouped by failure fingerprint")
async def groups(
    request: Request, actor: Operator, query: Annotated[ListQuery, Query()]
) -> dict[str, Any]:
    with _store_away_is_503("group dead letters"):
        found = await _store(request).groups(query.to_filter(), limit=query.limit)
    return {"groups": [group.__dict__ for group in found]}


@router.post(
    "/replays", response_model=OutcomeResponse, responses=_BAD_BODY, summary="Replay dead letters"
)
async def replay(request: Request, actor: Operator, body: ReplayRequest) -> Any:
    with _store_away_is_503("start the replay"):  # a failure midway is in the outcome
        outcome = await _operations(request).replay(
            body.to_filter(), actor=actor, limit=body.limit, rate=body.rate, dry_run=body.dry_run
        )
    if outcome.error is not None:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            {"error": outcome.error, **_outcome(outcome).model_dump()},
            headers={"Retry-After": "5"},
        )
    return _outcome(outcome)


@router.post(
    "/discards", response_model=OutcomeResponse, responses=_BAD_BODY, summary="Discard dead letters"
)
async def discard(request: Request, actor: Operator, body: DiscardRequest) -> Any:
    with _store_away_is_503("discard"):
        outcome = await _operations(request).discard(
            body.to_filter(),
            actor=actor,
            limit=body.limit,
            reason=body.reason_text,
            dry_run=body.dry_run,
        )
    return _outcome(outcome)


@router.get("/actions", summary="Every replay and discard: who, when, what, how many")
async def list_actions(
    request: Request, actor: Operator, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> dict[str, Any]:
    with _store_away_is_503("list actions"):
        return {"actions": await _store(request).actions(limit=limit)}
