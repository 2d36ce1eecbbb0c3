"""The status projection: what happened to each event, per consuming service, with history.

The gateway records what it accepted (`pending` for every service that will work on it); the
services report their transitions as `status.reported` events, which the gateway applies here.
Each service keeps owning its data: the projection is built from the events, never by reading
another service's tables. A transition only moves a service's state if it is at least as new as
the one shown, so late or repeated reports do not move a state backwards.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from contracts.envelope import Envelope
from contracts.events import DatasetProcessed
from contracts.topology import workers_of
from contracts.tracking import State, StatusReported, Transition
from services.messaging.logs import get_logger
from services.messaging.store import migrate

log = get_logger("gateway.tracking")

metadata = MetaData()
events = Table(
    "tracking_events",
    metadata,
    Column("event_id", String(128), primary_key=True),
    Column("event_type", String(128), nullable=True),
    Column("accepted_at", DateTime(timezone=True), nullable=True),
    Column("cancel_requested_at", DateTime(timezone=True), nullable=True),
)
states = Table(
    "tracking_states",
    metadata,
    Column("event_id", String(128), primary_key=True),
    Column("service", String(64), primary_key=True),
    Column("state", String(32), nullable=False),
    Column("attempt", Integer, nullable=True),
    Column("next_attempt_at", DateTime(timezone=True), nullable=True),
    Column("reason", String(64), nullable=True),
    Column("group_key", String(64), nullable=True),
    Column("detail", Text, nullable=True),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)
history = Table(
    "tracking_history",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("event_id", String(128), nullable=False),
    Column("service", String(64), nullable=False),
    Column("state", String(32), nullable=False),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("attempt", Integer, nullable=True),
    Column("reason", String(64), nullable=True),
    Column("detail", Text, nullable=True),
    Index("ix_tracking_history_event", "event_id", "at"),
)
results = Table(
    "dataset_results",
    metadata,
    Column("dataset_id", String(128), primary_key=True),
    Column("event_id", String(128), nullable=False),
    Column("processed_at", DateTime(timezone=True), nullable=False),
    Column("summary", JSON, nullable=False),
)

ACCEPT_BATCH_SECONDS = 0.05


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


class Tracking:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._accepted: list[tuple[Envelope, datetime]] = []
        self._flushed = asyncio.Event()
        # Held while a batch is written: a reader waits for it instead of missing the batch.
        self._flush_lock = asyncio.Lock()
        self._writer: asyncio.Task[None] | None = None

    async def start(self) -> None:
        async def create(conn: AsyncConnection) -> None:
            await conn.run_sync(metadata.create_all)

        await migrate(self._engine, "gateway.tracking", [create])
        self._writer = asyncio.get_running_loop().create_task(self._write_accepted())

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
        await self._flush_accepted()

    # --- accepted events (group-committed off the request path) -------------------------------

    def accepted(self, event: Envelope, at: datetime | None = None) -> None:
        """Note an event the broker confirmed; written within ~50 ms with others.

        `at` is when the gateway started publishing it: a consumer may report work on the event
        before the confirm reaches the gateway, so the accept time must not be taken after it."""
        self._accepted.append((event, at or datetime.now(UTC)))

    async def _write_accepted(self) -> None:
        while True:
            await asyncio.sleep(ACCEPT_BATCH_SECONDS)
            try:
                await self._flush_accepted()
            except Exception:
                log.exception("could not record accepted events; retrying")

    async def _flush_accepted(self) -> None:
        async with self._flush_lock:
            batch, self._accepted = self._accepted, []
            if not batch:
                return
            try:
                async with self._engine.begin() as conn:
                    for event, at in batch:
                        await self._ensure_event(conn, event.id, event.type, accepted_at=at)
                        for service in workers_of(event.type):
                            await self._apply(
                                conn,
                                Transition.model_construct(
                                    event_id=event.id,
                                    event_type=event.type,
                                    service=service,
                                    state="pending",
                                    at=at,
                                ),
                            )
            except BaseException:
                self._accepted[:0] = batch  # keep them for the next round
                raise

    # --- transitions ---------------------------------------------------------------------------

    async def apply_reported(self, event: StatusReported, conn: AsyncConnection) -> None:
        """Handler of `status.reported` (stateful: same transaction as the gateway's inbox)."""
        for transition in event.data.transitions:
            await self._ensure_event(conn, transition.event_id, transition.event_type)
            await self._apply(conn, transition)

    async def apply(self, transitions: Iterable[Transition]) -> None:
        async with self._engine.begin() as conn:
            for transition in transitions:
                await self._ensure_event(conn, transition.event_id, transition.event_type)
                await self._apply(conn, transition)

    async def _ensure_event(
        self,
        conn: AsyncConnection,
        event_id: str,
        event_type: str | None,
        accepted_at: datetime | None = None,
    ) -> None:
        existing = (
            await conn.execute(
                select(events.c.event_type, events.c.accepted_at).where(
                    events.c.event_id == event_id
                )
            )
        ).first()
        if existing is None:
            try:
                async with conn.begin_nested():
                    await conn.execute(
                        events.insert().values(
                            event_id=event_id, event_type=event_type, accepted_at=accepted_at
                        )
                    )
                return
            except IntegrityError:
                pass  # recorded meanwhile by a concurrent writer
        if accepted_at is not None:  # the first accept counts; a resent event changes nothing
            await conn.execute(
                update(events)
                .where(events.c.event_id == event_id, events.c.accepted_at.is_(None))
                .values(accepted_at=accepted_at, event_type=event_type)
            )

    async def _apply(self, conn: AsyncConnection, t: Transition) -> None:
        await conn.execute(
            history.insert().values(
                event_id=t.event_id,
                service=t.service,
                state=t.state,
                at=t.at,
                attempt=t.attempt,
                reason=t.reason,
                detail=t.detail,
            )
        )
        values = {
            "state": t.state,
            "attempt": t.attempt,
            "next_attempt_at": t.next_attempt_at,
            "reason": t.reason,
            "group_key": t.group,
            "detail": t.detail,
            "updated_at": t.at,
        }
        if t.state == "pending":
            # The weakest state: shown only until a service reports anything (an event resent
            # with the same id is not pending again).
            exists = await conn.scalar(
                select(states.c.state).where(
                    states.c.event_id == t.event_id, states.c.service == t.service
                )
            )
            if exists is not None:
                return
        else:
            moved = await conn.execute(
                update(states)
                .where(
                    and_(
                        states.c.event_id == t.event_id,
                        states.c.service == t.service,
                        or_(states.c.updated_at <= t.at, states.c.state == "pending"),
                    )
                )
                .values(**values)
            )
            if moved.rowcount:
                return
        try:
            async with conn.begin_nested():
                await conn.execute(
                    states.insert().values(event_id=t.event_id, service=t.service, **values)
                )
        except IntegrityError:
            pass  # a newer state is shown already: keep it

    # --- results and cancellation ---------------------------------------------------------------

    async def record_result(self, event: DatasetProcessed, conn: AsyncConnection) -> None:
        """Handler of `dataset.processed` (stateful)."""
        summary = event.data.model_dump(mode="json")
        exists = await conn.scalar(
            select(results.c.dataset_id).where(results.c.dataset_id == event.data.dataset_id)
        )
        if exists is None:
            await conn.execute(
                results.insert().values(
                    dataset_id=event.data.dataset_id,
                    event_id=event.id,
                    processed_at=event.time,
                    summary=summary,
                )
            )

    async def result(self, dataset_id: str) -> dict[str, Any] | None:
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(select(results).where(results.c.dataset_id == dataset_id))
            ).first()
        if row is None:
            return None
        return {
            "dataset_id": row.dataset_id,
            "processed_at": _utc(row.processed_at),
            "event_id": row.event_id,
            **row.summary,
        }

    async def request_cancel(self, event_id: str) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(
                update(events)
                .where(events.c.event_id == event_id, events.c.cancel_requested_at.is_(None))
                .values(cancel_requested_at=datetime.now(UTC))
            )

    # --- reading --------------------------------------------------------------------------------

    async def status(self, event_id: str) -> dict[str, Any] | None:
        """The event's fate per service, with history; None if never seen."""
        await self._flush_accepted()  # what this process accepted is visible at once
        async with self._engine.connect() as conn:
            event = (
                await conn.execute(select(events).where(events.c.event_id == event_id))
            ).first()
            if event is None:
                return None
            rows = (
                await conn.execute(
                    select(states).where(states.c.event_id == event_id).order_by(states.c.service)
                )
            ).all()
            steps = (
                await conn.execute(
                    select(history)
                    .where(history.c.event_id == event_id)
                    .order_by(history.c.at, history.c.id)
                )
            ).all()
        services: dict[str, dict[str, Any]] = {}
        for row in rows:
            services[row.service] = {
                "state": row.state,
                "attempt": row.attempt,
                "next_attempt_at": _utc(row.next_attempt_at),
                "reason": row.reason,
                "group": row.group_key,
                "detail": row.detail,
                "updated_at": _utc(row.updated_at),
                "history": [],
            }
        for step in steps:
            services.setdefault(step.service, {"state": step.state, "history": []})[
                "history"
            ].append(
                {
                    "state": step.state,
                    "at": _utc(step.at),
                    "attempt": step.attempt,
                    "reason": step.reason,
                    "detail": step.detail,
                }
            )
        return {
            "id": event.event_id,
            "type": event.event_type,
            "accepted_at": _utc(event.accepted_at),
            "cancel_requested_at": _utc(event.cancel_requested_at),
            "services": services,
        }


def states_of(status: dict[str, Any]) -> dict[str, State]:
    return {service: info["state"] for service, info in status["services"].items()}
