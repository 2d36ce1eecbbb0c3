"""Status reporting: what happens to each event, told to the gateway as batched events.

A consumer notes each transition (`processing`, `succeeded`, `retrying`, `dead_lettered`,
`skipped_duplicate`, `cancelled`; the gateway also takes `dead_lettered` from the letter) here;
a background task publishes them as one `status.reported` event every `interval` (or sooner
when the batch is full). Reporting is off the acknowledgement path — a slow or absent broker
delays status, never work — and a batch that could not be published is kept and sent with the
next one (bounded; the oldest transitions are dropped first, with a warning, if the broker
stays away for long). A crash loses what was noted and not sent; the inbox tells `succeeded`
and `cancelled` again at the next start.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from datetime import UTC, datetime
from typing import Any

from contracts.tracking import MAX_TRANSITIONS, State, StatusReported, StatusReportedData
from services.messaging.errors import BrokerUnavailable, Unroutable
from services.messaging.logs import get_logger
from services.messaging.publisher import Publisher, envelope_body

log = get_logger("status")

DEFAULT_INTERVAL = 0.5
"""Seconds between reports (`COURIER_STATUS_REPORT_INTERVAL_MS`'s default)."""
MAX_PENDING = 100_000
DROP_WARNING_SECONDS = 10.0
"""At most one warning this often while a full backlog drops transitions (one per drop
buried the logs under thousands of lines a second)."""


class StatusReporter:
    def __init__(
        self,
        service: str,
        publisher: Publisher,
        exchange: str,
        interval: float = DEFAULT_INTERVAL,
    ) -> None:
        self._service = service
        self._publisher = publisher
        self._exchange = exchange
        self._interval = interval
        self._pending: deque[dict[str, Any]] = deque(maxlen=MAX_PENDING)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._dropped = 0
        self._warned_at = -math.inf

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
        now = time.monotonic()
        if now - self._warned_at >= DROP_WARNING_SECONDS:
            self._warned_at = now
            log.warning(
                "status backlog full; dropping the oldest transitions",
                extra={"dropped": self._dropped},  # since the start
            )

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self._interval):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.flush()
            except Exception:  # never let status reporting die quietly
                log.exception("status report failed; trying again")

    @property
    def pending(self) -> int:
        """Transitions noted and not yet published."""
        return len(self._pending)

    async def flush(self) -> None:
        """Publish what was pending when the flush began, in batches; keep what the broker did
        not take. What is noted meanwhile waits for the next round: draining until empty would,
        under steady traffic, publish a tiny report per confirmation round trip."""
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
                await self._publisher.publish_event(
                    event,
                    exchange=self._exchange,
                    body=envelope_body(event, {"transitions": batch}),
                )
            except (BrokerUnavailable, Unroutable):
                # Back in front: older than anything noted meanwhile. If that filled the
                # backlog, the batch's oldest give way (extendleft would push out the newest).
                excess = len(batch) - (MAX_PENDING - len(self._pending))
                if excess > 0:
                    self._dropping(excess)
                    batch = batch[excess:]
                self._pending.extendleft(reversed(batch))
                log.warning(
                    "could not report status; will retry", extra={"pending": len(self._pending)}
                )
                return

    async def close(self) -> None:
        """Stop the loop and send what is left (best effort at shutdown)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.flush()
