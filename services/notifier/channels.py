"""Delivery channels. Each takes a `Notification` and delivers it, or raises.

`log` (here), `webhook` (`webhook.py`) and `email` (`mail.py`); `Channels` picks the channel
and records every attempt in the deliveries record (`deliveries.py`).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import orjson
from tenacity import AsyncRetrying, stop_after_delay, wait_exponential

from contracts.envelope import Envelope
from contracts.notify import Channel
from services.messaging.batching import Batcher
from services.messaging.errors import PermanentError
from services.messaging.logs import get_logger
from services.messaging.store import store_checked

if TYPE_CHECKING:
    from services.notifier.deliveries import Deliveries


log = get_logger("notifier.channels")


@dataclass(frozen=True)
class Notification:
    event_id: str
    """Also the idempotency key a receiver can dedup on."""
    correlation_id: str
    channel: Channel
    recipient: str
    subject: str
    body: str
    event: Envelope = field(repr=False, compare=False)
    """The event that asked for the notification (what a webhook receives, less its
    `callbackurl`)."""


def _drop_partial_line(path: Path) -> None:
    """Cut a last line a crash left unfinished (a process killed, or the machine stopped, in
    the middle of a write): its batch was not synced, so not acknowledged, and comes again;
    kept, the next line would be glued to it, unreadable. At start only: the file is this
    process's alone (`COURIER_NOTIFY_LOG`)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return
    try:
        size = end = os.fstat(fd).st_size
        while end > 0:  # back to the last newline, a block at a time
            start = max(0, end - 65536)
            cut = os.pread(fd, end - start, start).rfind(b"\n")
            if cut >= 0:
                end = start + cut + 1
                break
            end = start
        if end < size:
            log.warning(
                "dropped an unfinished last line of the log channel's file (a crash mid-write)",
                extra={"path": str(path), "bytes": size - end},
            )
            os.ftruncate(fd, end)
            os.fsync(fd)
    finally:
        os.close(fd)


class DeliveryChannel(Protocol):
    async def deliver(self, notification: Notification) -> None: ...


class LogChannel:
    """Appends one JSON line per notification to a file, durably (fsync) before returning.

    Lines that arrive together are written and synced together (group commit): one fsync per
    batch instead of one per notification, each waiting its turn."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lines: Batcher[bytes, None] = Batcher(self._append_all)
        path.parent.mkdir(parents=True, exist_ok=True)
        _drop_partial_line(path)

    def _append(self, lines: list[bytes]) -> None:
        fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            end = os.fstat(fd).st_size
            data = memoryview(b"".join(lines))
            try:
                while data:  # a write may take part of the buffer (a full disk raises next time)
                    data = data[os.write(fd, data) :]
                os.fsync(fd)
            except OSError:
                # The batch fails and is retried: leave no part of it, or the retry's first
                # line would be glued to a fragment and its other lines be there twice.
                os.ftruncate(fd, end)
                raise
        finally:
            os.close(fd)

    async def _append_all(self, lines: list[bytes]) -> list[None]:
        await asyncio.to_thread(self._append, lines)
        return [None] * len(lines)

    async def deliver(self, notification: Notification) -> None:
        record = {
            "event_id": notification.event_id,
            "correlation_id": notification.correlation_id,
            "channel": notification.channel,
            "recipient": notification.recipient,
            "subject": notification.subject,
            "body": notification.body,
            "delivered_at": datetime.now(UTC).isoformat(),
        }
        await self._lines.submit(orjson.dumps(record) + b"\n")


class Unconfigured:
    """A channel this deployment has not set up: delivering on it is a permanent failure."""

    def __init__(self, channel: Channel) -> None:
        self._channel = channel

    async def deliver(self, notification: Notification) -> None:
        raise PermanentError(f"the {self._channel!r} channel is not configured")


RECORD_BUDGET_SECONDS = 5.0
MAX_UNRECORDED = 10_000
"""Notifications remembered as sent while the store would not take their record."""


def _retrieved(task: asyncio.Future[None]) -> None:
    """A shielded send whose caller was cancelled: its failure is logged here, not lost."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.warning("a delivery finished after its caller gave up, failing", exc_info=exc)


class Channels:
    """Delivers on the notification's channel, at most once per event id once it succeeded."""

    def __init__(self, by_name: dict[Channel, DeliveryChannel], deliveries: Deliveries) -> None:
        self._by_name = by_name
        self._deliveries = deliveries
        # Sent, but the store did not take the `delivered` record (an outage longer than the
        # budget): the handler failed, and its retry must record, not send again.
        self._unrecorded: dict[str, None] = {}  # oldest first
        self._sending: dict[str, asyncio.Future[None]] = {}  # by notification id

    async def deliver(self, notification: Notification) -> None:
        # The send and its record go together. Cancelled in between (the broker closed the
        # channel under the delivery, as in a graceful restart), a sent notification went
        # unrecorded and its redelivery sent it again: they finish, and the redelivery finds
        # the record. (A stop's drain still bounds them: the store then refuses, said.)
        key = notification.event_id
        # A redelivery can come while that send still runs: a connection lost with a cluster
        # node is back on another in milliseconds, and the consumer's hold on the id went
        # with the cancelled delivery. It waits for the send, then finds its record.
        while (earlier := self._sending.get(key)) is not None:
            await asyncio.wait({earlier})
        sending = asyncio.ensure_future(self._deliver(notification))
        self._sending[key] = sending
        sending.add_done_callback(lambda _: self._sending.pop(key, None))
        try:
            await asyncio.shield(sending)
        except asyncio.CancelledError:
            sending.add_done_callback(_retrieved)
            raise

    async def _deliver(self, notification: Notification) -> None:
        if notification.event_id in self._unrecorded:
            log.info("sent before the store went away; recording it, not sending again")
            await self._record(notification)
            return
        if await store_checked(
            self._deliveries.delivered_already(notification.event_id), "read the deliveries record"
        ):
            # An earlier attempt delivered, then died before the inbox recorded the event.
            log.info(
                "already delivered; not sending again", extra={"channel": notification.channel}
            )
            return
        try:
            await self._by_name[notification.channel].deliver(notification)
        except Exception as exc:
            summary = f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}"
            permanent = isinstance(exc, PermanentError)
            try:
                await self._deliveries.failed(notification, summary, permanent=permanent)
            except Exception:  # the delivery's own failure is what counts; keep it
                log.exception("could not record a failed delivery")
            raise
        await self._record(notification)

    async def refused_before(self, notification: Notification) -> str | None:
        """The error of a target's permanent refusal of this notification, if it refused."""
        record = await store_checked(
            self._deliveries.get(notification.event_id), "read the deliveries record"
        )
        if record is None or record.outcome != "rejected":
            return None
        return record.last_error or "refused"

    async def _record(self, notification: Notification) -> None:
        """Record a sent notification as delivered, through a store blip; through a longer
        outage it stays remembered here (the failure is raised: the event is retried)."""
        try:
            await self._deliveries.delivered(notification)
        except Exception:  # retried below, within the budget
            log.warning("could not record a delivery; retrying", exc_info=True)
            try:
                await store_checked(
                    self._record_patiently(notification), "record a sent notification"
                )
            except Exception:
                self._unrecorded[notification.event_id] = None
                if len(self._unrecorded) > MAX_UNRECORDED:
                    del self._unrecorded[next(iter(self._unrecorded))]
                raise
        self._unrecorded.pop(notification.event_id, None)

    async def _record_patiently(self, notification: Notification) -> None:
        # Built only after a failure: tenacity's machinery costs more than the record itself.
        async for attempt in AsyncRetrying(
            stop=stop_after_delay(RECORD_BUDGET_SECONDS),
            wait=wait_exponential(multiplier=0.05, max=1),
            reraise=True,
        ):
            with attempt:
                await self._deliveries.delivered(notification)
