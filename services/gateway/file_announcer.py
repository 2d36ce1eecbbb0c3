"""Announcing again the uploads whose `file.uploaded` the broker never confirmed.

An upload is recorded with its announcement before the publish. A publish written but never
confirmed (the client was told the file "may have been accepted"), or a gateway that died
between the record and the confirm, leaves the announcement in the record: the broker may have
it, or not. Left so, the file would show `pending` until retention forgot it, never analysed,
with no one told. A periodic sweep publishes each such announcement again, under the file's
id, once it is older than a publish could take: the processor's inbox drops the second copy
when the first one did land.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Final, Literal

from pydantic import ValidationError

from contracts.events import EVENT_ADAPTER
from services.gateway.broker import BrokerLink
from services.gateway.files import Files, Unannounced
from services.gateway.tracking import Tracking
from services.messaging.errors import BrokerUnavailable, Unpublishable, Unroutable
from services.messaging.logs import event_context, get_logger

log = get_logger("gateway.files")

SWEEP_PAGE: Final = 100


class FileAnnouncer:
    def __init__(self, files: Files, broker: BrokerLink, exchange: str, tracking: Tracking) -> None:
        self._files = files
        self._broker = broker
        self._exchange = exchange
        self._tracking = tracking

    async def sweep(self) -> int:
        """Publish the announcements that are due again; how many the broker confirmed. A
        pass stops at the first the broker does not take: the claim of the rest runs out,
        and the next pass takes them. It takes what was due when it began, so that one
        failing for good (logged) is tried once per pass, not again and again within it."""
        if not self._broker.ready:  # connected, and the topology declared
            return 0  # the next pass; the records keep them meanwhile
        began = datetime.now(UTC)
        confirmed = 0
        while due := await self._files.unannounced(due_by=began, limit=SWEEP_PAGE):
            for file in due:
                outcome = await self._announce(file)
                if outcome == "away":
                    return confirmed
                confirmed += outcome == "confirmed"
        return confirmed

    async def _announce(self, file: Unannounced) -> Literal["confirmed", "failed", "away"]:
        """Publish one announcement, confirmed; "failed" if it cannot be (logged), "away" if
        the broker is."""
        try:
            event = EVENT_ADAPTER.validate_json(file.announcement)
        except ValidationError:
            # Written by this gateway from a validated event: only a hand-edited record gets
            # here, and nothing would ever make it publishable.
            log.exception("a file's stored announcement is unreadable; dropped")
            await self._files.announced(file.file_id, file.due)
            return "failed"
        with event_context(event.id, event.correlation()):
            try:
                await self._broker.publisher.publish_event(
                    event, exchange=self._exchange, body=file.announcement
                )
            except BrokerUnavailable as exc:
                log.warning("could not announce a file again; the next sweep tries", exc_info=exc)
                return "away"
            except (Unroutable, Unpublishable):
                # A topology fault: logged each pass until fixed, the file kept meanwhile.
                log.exception(
                    "could not announce a file again: no queue takes it, or AMQP cannot carry it"
                )
                return "failed"
            log.warning("announced a file whose first announcement was never confirmed")
            self._tracking.accepted(event, file.uploaded_at)
            await self._files.announced(file.file_id, file.due)
        return "confirmed"
