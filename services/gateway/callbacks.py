"""Callbacks: posting an event's final status to the URL its client gave (`callbackurl`).

The gateway finds out when an event is settled, because the status projection is where every
service's transitions meet; the notifier does the posting, through its webhook channel (signed,
SSRF-guarded, retried, dead-lettered when it cannot be delivered). Between them travels an
explicit `callback.requested` event.

An event is settled once every service that works on it (`workers_of`) is in a final state.
The outcome is `dead_lettered` if any of them dead-lettered it, else `succeeded` (a skipped
duplicate had succeeded before); an event only cancelled is settled with nothing to post.

Each check runs after the transitions that may settle an event were committed (a check inside
their transaction could miss a second service's final state committed beside it), and publishes
with confirm before it returns, so the caller acknowledges what triggered it (a status report, a
dead letter) only once the request is with the broker. Only then is it marked as published: a
crash in between publishes it again when the trigger comes back, under the same id (derived
from the event id and the outcome), which the notifier's inbox drops.

A replayed dead letter that then succeeds settles again, with another outcome: a second
callback. The same outcome again (dead-lettered, replayed, dead-lettered) posts nothing new.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal, Protocol

from pydantic import ValidationError
from sqlalchemy import Connection, Row, bindparam, or_, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from contracts.envelope import Envelope
from contracts.topology import workers_of
from contracts.tracking import (
    MAX_DETAIL,
    MAX_LABEL,
    CallbackOutcome,
    CallbackRequested,
    CallbackRequestedData,
    ServiceOutcome,
    callback_id,
)
from services.gateway.tracking import ENDING_STATES, events, states
from services.messaging.logs import event_context, get_logger
from services.messaging.store import BatchRunner, as_utc, raw_sqlite, select_in

log = get_logger("gateway.callbacks")

SWEEP_PAGE: Final = 500

Settled = CallbackOutcome | Literal["cancelled"]


class EventPublisher(Protocol):
    """What callbacks need of `services.messaging.publisher.Publisher`."""

    @property
    def ready(self) -> bool: ...

    async def publish_event(self, event: Envelope, *, exchange: str) -> None: ...


@dataclass(frozen=True)
class Settlement:
    event_id: str
    outcome: Settled
    at: datetime
    """When the last service reached its final state."""
    request: CallbackRequested | None
    """What to publish; None when there is nothing to post (cancelled)."""


def settle(
    event_type: str | None, services: Mapping[str, ServiceOutcome]
) -> tuple[Settled, datetime] | None:
    """The outcome and settlement time if every worker of the event is done with it."""
    workers = workers_of(event_type) if event_type else ()
    finals = [services[w] for w in workers if w in services]
    if not workers or len(finals) < len(workers):
        return None
    if any(final.state not in ENDING_STATES for final in finals):
        return None
    at = max(final.updated_at for final in finals)
    found = {final.state for final in finals}
    if "dead_lettered" in found:
        return "dead_lettered", at
    if found & {"succeeded", "skipped_duplicate"}:
        return "succeeded", at
    return "cancelled", at


def _service_outcome(row: Row[*tuple[Any, ...]]) -> ServiceOutcome:
    # Cut to the callback's limits: rows written before the projection cut escaped details
    # (or by hand) may be longer, and an unbuildable callback is never sent.
    return ServiceOutcome(
        state=row.state,
        attempt=row.attempt,
        reason=_cut(row.reason, MAX_LABEL),
        group=_cut(row.group_key, MAX_LABEL),
        detail=_cut(row.detail, MAX_DETAIL),
        updated_at=as_utc(row.updated_at),
    )


def _cut(text: str | None, limit: int) -> str | None:
    return None if text is None else text[:limit]


DUE_CHUNK = 500
"""Event ids per look-up: after a store outage thousands of accepts are written at once, and
one statement with all their ids would pass the databases' bound-parameter limits (32,766 on
SQLite, 32,767 on PostgreSQL)."""


def _due(conn: Connection, event_ids: Collection[str]) -> list[Settlement]:
    """Settled events among `event_ids` that have a callback URL not yet called for this outcome.

    One query per `DUE_CHUNK` ids; events without a callback URL do not even come back."""
    wanted = sorted(_with_callback_url(conn, event_ids))
    rows: list[Row[*tuple[Any, ...]]] = []
    for at in range(0, len(wanted), DUE_CHUNK):
        rows += _due_rows(conn, wanted[at : at + DUE_CHUNK])
    by_event: dict[str, list[Row[*tuple[Any, ...]]]] = {}
    for row in rows:
        by_event.setdefault(row.event_id, []).append(row)
    due: list[Settlement] = []
    for event_id, event_rows in by_event.items():
        try:
            settlement = _settlement(event_id, event_rows)
        except ValidationError:
            # Rows no callback can carry: said, and skipped, so that one event does not hold
            # back the callbacks of every other (the sweep would fail on its page for ever).
            log.exception("cannot build this event's callback", extra={"event_id": event_id})
            continue
        if settlement is not None:
            due.append(settlement)
    return due


def _with_callback_url(conn: Connection, event_ids: Collection[str]) -> Collection[str]:
    """The ids among `event_ids` that have a callback URL (on SQLite; elsewhere all of them,
    which the join finds as cheaply). Every status report asks about each event it ends, and
    most have none: through SQLAlchemy's expanding IN and join that cost ~10 µs per event."""
    raw = raw_sqlite(conn)
    if raw is None:
        return event_ids
    query = f"SELECT event_id FROM {events.name} WHERE callback_url IS NOT NULL AND event_id IN"  # noqa: S608
    return [event_id for (event_id,) in select_in(raw, query, list(event_ids), DUE_CHUNK)]


def _due_rows(conn: Connection, event_ids: list[str]) -> Sequence[Row[*tuple[Any, ...]]]:
    return conn.execute(
        select(
            events.c.event_id,
            events.c.event_type,
            events.c.callback_url,
            events.c.callback_outcome,
            events.c.callback_correlation,
            states.c.service,
            states.c.state,
            states.c.attempt,
            states.c.reason,
            states.c.group_key,
            states.c.detail,
            states.c.updated_at,
        )
        .join(states, states.c.event_seq == events.c.seq)
        .where(events.c.event_id.in_(event_ids), events.c.callback_url.is_not(None))
    ).all()


def _settlement(event_id: str, event_rows: list[Row[*tuple[Any, ...]]]) -> Settlement | None:
    """The event's settlement, if it is settled with an outcome not called back yet."""
    first = event_rows[0]
    services = {row.service: _service_outcome(row) for row in event_rows}
    settled = settle(first.event_type, services)
    if settled is None or settled[0] == first.callback_outcome:
        return None
    outcome, at = settled
    request = None
    if outcome != "cancelled":
        request = CallbackRequested(
            id=callback_id(event_id, outcome),
            subject=event_id,
            correlationid=first.callback_correlation,
            data=CallbackRequestedData(
                event_id=event_id,
                event_type=first.event_type,
                outcome=outcome,
                settled_at=at,
                callback_url=first.callback_url,
                services={w: services[w] for w in workers_of(first.event_type)},
            ),
        )
    return Settlement(event_id, outcome, at, request)


def _mark(conn: Connection, done: Sequence[Settlement]) -> None:
    """Note what was published. A settlement older than the one noted (a slow, concurrent
    check) does not overwrite it."""
    conn.execute(
        update(events)
        .where(
            events.c.event_id == bindparam("eid"),
            or_(
                events.c.callback_settled_at.is_(None),
                events.c.callback_settled_at <= bindparam("settled"),
            ),
        )
        .values(callback_outcome=bindparam("outcome"), callback_settled_at=bindparam("settled"))
        .execution_options(synchronize_session=False),
        [{"eid": s.event_id, "outcome": s.outcome, "settled": s.at} for s in done],
    )


def _open(conn: Connection, after: str, limit: int) -> list[str]:
    """A page of events still waiting for their first callback (a partial index holds them)."""
    return list(
        conn.scalars(
            select(events.c.event_id)
            .where(
                events.c.callback_url.is_not(None),
                events.c.callback_outcome.is_(None),
                events.c.event_id > after,
            )
            .order_by(events.c.event_id)
            .limit(limit)
        )
    )


class Callbacks:
    def __init__(self, engine: AsyncEngine, publisher: EventPublisher, exchange: str) -> None:
        self._runner = BatchRunner(engine)
        self._publisher = publisher
        self._exchange = exchange
        self._publishing = asyncio.Lock()

    def close(self) -> None:
        self._runner.close()

    async def publish_settled(self, event_ids: Collection[str]) -> None:
        """Publish the callback requests that are due among `event_ids`, each confirmed, then
        mark them. Raises (after marking the ones that went out) if any publish failed."""
        due = await self._runner.run(lambda conn: _due(conn, event_ids))
        if not due:
            return  # the usual answer, found without waiting for anyone
        # Checks run side by side (status reports, the accept writer, the sweep) and may find
        # the same settlement: publish one batch at a time and look again under the lock, so
        # that what another check just published and marked is not published twice. (Another
        # gateway process may still do so: the same id, which the notifier's inbox drops.)
        async with self._publishing:
            again = await self._runner.run(lambda conn: _due(conn, [s.event_id for s in due]))
            if again:
                await self._publish_and_mark(again)

    async def _publish_and_mark(self, due: Sequence[Settlement]) -> None:
        sent = [s for s in due if s.request is not None]
        outcomes = await asyncio.gather(
            *(self._publish(s.request) for s in sent if s.request is not None),
            return_exceptions=True,
        )
        done = [s for s in due if s.request is None]
        done += [s for s, outcome in zip(sent, outcomes, strict=True) if outcome is None]
        if done:
            await self._runner.run(lambda conn: _mark(conn, done))
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    async def _publish(self, request: CallbackRequested) -> None:
        await self._publisher.publish_event(request, exchange=self._exchange)
        # About the settled event, under its correlation id: not the one of the report being
        # handled that settled it.
        with event_context(request.data.event_id, request.correlationid):
            log.info("callback requested", extra={"outcome": request.data.outcome})

    async def sweep(self) -> None:
        """Publish callbacks no trigger will bring back: an event settled before its accept
        was written, whose check then failed or died with the process. Periodic."""
        if not self._publisher.ready:
            return  # the next round; nothing is lost meanwhile
        after = ""
        while page := await self._runner.run(
            functools.partial(_open, after=after, limit=SWEEP_PAGE)
        ):
            await self.publish_settled(page)
            after = page[-1]
