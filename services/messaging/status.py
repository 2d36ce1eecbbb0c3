"""Status reporting: what happens to each event, told to the gateway as batched events.

A consumer notes each transition (`processing`, `succeeded`, `retrying`, `dead_lettered`,
`skipped_duplicate`, `cancelled`; the gateway also takes `dead_lettered` from the letter) here;
a background task publishes them as one `status.reported` event every `interval` (or sooner
when the batch is full). Reporting is off the acknowledgement path — a slow or absent broker
delays status, never work — and a batch that could not be published is kept and sent with the
next one (bounded; the oldest transitions are dropped first, with a warning, if the broker
stays away for long).

A crash loses what was noted and not sent. The final outcomes (`succeeded`, `cancelled`) do not
depend on that: the inbox marks each as owing its report until the broker confirmed the report
(`Ledger`), and a reporter tells again what is still owed after `recover_after` seconds, its own
process's or another's of the service (a replica killed for good, a process that crashed), and
at start-up what is owed whatever its age.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol

import orjson

from contracts.tracking import MAX_TRANSITIONS, State, StatusReported, StatusReportedData
from services.messaging.errors import BrokerUnavailable, Unpublishable, Unroutable
from services.messaging.logs import Throttle, error_field, get_logger
from services.messaging.publisher import Publisher, envelope_body
from services.messaging.store import STORE_ERRORS

log = get_logger("status")

DEFAULT_INTERVAL = 0.5
"""Seconds between reports (`COURIER_STATUS_REPORT_INTERVAL_MS`'s default)."""
MAX_PENDING = 100_000
LEDGER_TIMEOUT = 5.0
"""Seconds a report round waits for the ledger (the store) to note what was reported: the
outcomes stay owed if it does not, and status reporting never waits long on the store."""
LOOKS_PER_AGE = 4
"""How often a reporter looks for owed outcomes: this many times per `recover_after`."""
DROP_WARNING_SECONDS = 10.0
"""At most one warning this often while a full backlog drops transitions (one per drop
buried the logs under thousands of lines a second), or while the broker refuses reports."""


@dataclass(frozen=True)
class Outcome:
    """How an event ended here, as its status report tells it: `succeeded` from its inbox
    record, `cancelled` from its cancellation once a delivery of it was skipped."""

    event_id: str
    event_type: str | None
    state: Literal["succeeded", "cancelled"]
    at: datetime
    attempt: int | None


class Ledger(Protocol):
    """Where final outcomes wait until their report is confirmed (the inbox)."""

    async def reported(self, transitions: Iterable[Mapping[str, Any]]) -> None:
        """The broker confirmed a report holding `transitions`."""

    async def unreported(self, settled_before: datetime | None, limit: int) -> list[Outcome]:
        """Outcomes still owed, oldest first."""


def _serialisable(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The transitions of `batch` that serialise; each that does not is said and dropped (a
    caller's bug, such as a string with a lone surrogate)."""
    kept = []
    for transition in batch:
        try:
            orjson.dumps(transition)
        except orjson.JSONEncodeError:
            log.exception(
                "a status transition cannot be serialised; dropped",
                extra={"event_id": transition.get("event_id"), "state": transition.get("state")},
            )
        else:
            kept.append(transition)
    return kept


class StatusReporter:
    def __init__(
        self,
        service: str,
        publisher: Publisher,
        exchange: str,
        interval: float = DEFAULT_INTERVAL,
        ledger: Ledger | None = None,
        recover_after: float = 0.0,
    ) -> None:
        """`ledger`: told which outcomes were reported, and asked which are owed. With
        `recover_after` > 0, a round whose report went out also tells again (at most
        `MAX_TRANSITIONS`, `LOOKS_PER_AGE` times per `recover_after`) outcomes still owed that
        long after they were settled: long past the round that should have reported them, so
        their report was lost."""
        self._service = service
        self._publisher = publisher
        self._exchange = exchange
        self._interval = interval
        self._ledger = ledger
        self._recover_after = recover_after
        self._pending: deque[dict[str, Any]] = deque(maxlen=MAX_PENDING)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        # Monotonic time before which no look: the store did not note the last reports, and
        # the same outcomes would be told again each round.
        self._quiet_until = -math.inf
        self._next_look = -math.inf  # monotonic time of the next look for owed outcomes
        self._catching_up: datetime | None = None  # `recover()`'s start, until all is told
        # A look reading the ledger: another meanwhile would read (and note) the same outcomes.
        self._looking = False
        self._dropped = 0
        self._drops_said = Throttle(DROP_WARNING_SECONDS)
        self._refusals = 0  # reports refused since the last one taken
        self._refusals_said = Throttle(DROP_WARNING_SECONDS)

    def report(
        self,
        event_id: str,
        event_type: str | None,
        state: State,
        at: datetime | None = None,
        **detail: Any,
    ) -> None:
        """Note a transition, made now unless `at` says when."""
        if len(self._pending) == MAX_PENDING:
            self._dropping(1)
        # A plain record, serialised once per batch with orjson (two per handled event: the
        # hot path pays for no model). Its fields are `Transition`'s; the gateway validates.
        self._pending.append(
            {
                "event_id": event_id,
                "event_type": event_type,
                "service": self._service,
                "state": state,
                "at": at or datetime.now(UTC),
                **detail,
            }
        )
        if len(self._pending) >= MAX_TRANSITIONS:
            self._wake.set()

    def _dropping(self, count: int) -> None:
        """Count transitions the full backlog drops (the oldest), and say so now and then."""
        self._dropped += count
        if self._drops_said() is not None:
            log.warning(
                "status backlog full; dropping the oldest transitions",
                extra={"dropped": self._dropped},  # since the start
            )

    def start(self, catch_up: bool = False) -> None:
        """Start the rounds. `catch_up`: the first rounds tell again everything owed when it
        started, whatever its age (what a crash took: none of it this process's), a batch a
        round (`recover`)."""
        if catch_up and self._ledger is not None:
            self._catching_up = datetime.now(UTC)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self._interval):
                    await self._wake.wait()
            except TimeoutError:
                pass
            if self._stopping:  # `close` sends what is left
                return
            self._wake.clear()
            try:
                went_out = await self.flush()
            except Exception:  # never let status reporting die quietly
                log.exception("status report failed; trying again")
                continue
            # Only after a report went out: while the broker refuses reports, what is owed is
            # pending here already, and telling it again would only pile it up.
            if went_out:
                try:
                    await self._look_for_owed()
                except (*STORE_ERRORS, TimeoutError) as exc:  # still owed: a later look
                    log.warning("could not read the outcomes owed a report", extra=error_field(exc))
                except Exception:  # the same, but not an outage: show where
                    log.exception("could not read the outcomes owed a report")

    async def _look_for_owed(self) -> None:
        """Tell again the rest of what was owed at the start, a batch a round; else, a few
        times per recovery age (an idle service does not poll its store each round), what is
        owed for that long."""
        now = time.monotonic()
        if now < self._quiet_until:
            return
        if self._catching_up is not None:
            await self.recover()
            return
        if self._recover_after > 0 and now >= self._next_look:
            self._next_look = now + self._recover_after / LOOKS_PER_AGE
            await self.recover(timedelta(seconds=self._recover_after))

    async def recover(self, age: timedelta | None = None) -> int:
        """Note again the outcomes the ledger has as owed for at least `age`, unless enough is
        pending already; how many. Without an age: those settled before the first such call
        (at start-up: what a crash took, none of it this process's), `MAX_TRANSITIONS` a call;
        the rounds tell the rest. A call while another reads the ledger notes nothing."""
        if self._ledger is None or self._looking or len(self._pending) >= MAX_TRANSITIONS:
            return 0
        if age is not None:
            before = datetime.now(UTC) - age
        else:
            before = self._catching_up = self._catching_up or datetime.now(UTC)
        self._looking = True
        try:
            owed = await self._ledger.unreported(before, MAX_TRANSITIONS)
        finally:
            self._looking = False
        if age is None and len(owed) < MAX_TRANSITIONS:
            self._catching_up = None  # all told
        for outcome in owed:
            detail = {} if outcome.attempt is None else {"attempt": outcome.attempt}
            # As first told (same time, same attempt): the gateway keeps a report once.
            self.report(
                outcome.event_id, outcome.event_type, outcome.state, at=outcome.at, **detail
            )
        if owed:
            log.info("reporting owed outcomes again", extra={"events": len(owed)})
        return len(owed)

    @property
    def pending(self) -> int:
        """Transitions noted and not yet published."""
        return len(self._pending)

    async def flush(self) -> bool:
        """Publish what was pending when the flush began, in batches; keep what the broker did
        not take. What is noted meanwhile waits for the next round: draining until empty would,
        under steady traffic, publish a tiny report per confirmation round trip. Whether all
        of it went out."""
        due = len(self._pending)
        while due > 0 and self._pending:
            size = min(due, len(self._pending), MAX_TRANSITIONS)
            due -= size
            batch = [self._pending.popleft() for _ in range(size)]
            # The envelope gives the message its id and properties; the body, serialised
            # straight from the records, carries the batch.
            event = StatusReported.model_construct(
                source=f"urn:courier:{self._service}",
                data=StatusReportedData.model_construct(transitions=[]),
            )
            try:
                body = envelope_body(event, {"transitions": batch})
            except orjson.JSONEncodeError:  # one transition must not take the others with it
                batch = _serialisable(batch)
                body = envelope_body(event, {"transitions": batch})
            try:
                await self._publisher.publish_event(event, exchange=self._exchange, body=body)
            except (BrokerUnavailable, Unroutable):
                # Back in front: older than anything noted meanwhile. If that filled the
                # backlog, the batch's oldest give way (extendleft would push out the newest).
                excess = len(batch) - (MAX_PENDING - len(self._pending))
                if excess > 0:
                    self._dropping(excess)
                    batch = batch[excess:]
                self._pending.extendleft(reversed(batch))
                self._refused()
                return False
            except Unpublishable:  # a bug: publishing it again cannot help
                log.exception("status report cannot be published", extra={"dropped": len(batch)})
                continue
            await self._confirmed(batch)
        if self._refusals:
            log.info("status reports go out again", extra={"refused": self._refusals})
            self._refusals = 0
            self._refusals_said.reset()
        return True

    def _refused(self) -> None:
        """Count a report the broker did not take, and say so now and then (every round, two a
        second, buried the logs while the broker stayed away)."""
        self._refusals += 1
        if self._refusals_said() is not None:
            log.warning(
                "could not report status; will retry",
                extra={"pending": len(self._pending), "refused": self._refusals},
            )

    async def _confirmed(self, batch: list[dict[str, Any]]) -> None:
        if self._ledger is None:
            return
        try:
            async with asyncio.timeout(LEDGER_TIMEOUT):
                await self._ledger.reported(batch)
        except Exception as exc:  # the outcomes stay owed: told again, harmlessly
            pause = max(self._interval, self._recover_after / LOOKS_PER_AGE)
            self._quiet_until = time.monotonic() + pause
            log.warning(
                "could not note the reported outcomes; they will be reported again",
                # An outage in a line (the deliveries held meanwhile say it at length); a bug
                # with its traceback.
                exc_info=not isinstance(exc, (*STORE_ERRORS, TimeoutError)),
                extra={"transitions": len(batch), **error_field(exc)},
            )

    async def close(self) -> None:
        """Stop the loop once its round is done (a round cut short could lose the batch it
        took, or leave reported outcomes owed) and send what is left (best effort at
        shutdown)."""
        if self._task is not None:
            self._stopping = True
            self._wake.set()
            try:
                await asyncio.gather(self._task, return_exceptions=True)
            finally:  # our caller gave up waiting
                self._task.cancel()
        await self.flush()
