"""Acknowledgements, coalesced: one `basic.ack(multiple=True)` for a run of settled deliveries.

A consumer settles its deliveries out of order (handlers take different times). Acks are sent
once per turn of the event loop: the run of settled deliveries from the oldest unsettled one
on with a single multiple ack, the settled deliveries beyond a gap one by one (so a slow
handler never holds back the acks of the others, and the prefetch window keeps moving). An ack
is sent only for a delivery that was settled, by a background task: no handler waits for it,
and if it is lost with the connection, the broker redelivers the message and the inbox
recognises it.

Tags are per channel: a robust channel that reconnects is a new channel with new tags, and the
old one's unsent acks are moot (the broker redelivers those messages).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import weakref
from dataclasses import dataclass, field
from typing import cast

from aiormq import spec
from aiormq.abc import AbstractChannel, DeliveredMessage
from aiormq.exceptions import AMQPError, ChannelInvalidStateError

from services.messaging.logs import get_logger

log = get_logger("acks")

RETRY_SECONDS = 1.0
"""Pause before acks that could not be written are tried again."""


@dataclass
class _Pending:
    outstanding: list[int] = field(default_factory=list)
    """Delivery tags received and not yet acked, ascending."""
    settled: set[int] = field(default_factory=set)
    """Of those, the ones whose ack is due."""


class Acks:
    def __init__(self) -> None:
        self._channels: weakref.WeakKeyDictionary[AbstractChannel, _Pending] = (
            weakref.WeakKeyDictionary()
        )
        self._sender: asyncio.Task[None] | None = None

    def delivered(self, channel: AbstractChannel, tag: int) -> None:
        """A delivery arrived: it holds back a multiple ack until it is settled."""
        bisect.insort(self._channels.setdefault(channel, _Pending()).outstanding, tag)

    def settle(self, channel: AbstractChannel, tag: int) -> None:
        """The delivery's work is done: ack it with the next flush."""
        pending = self._channels.get(channel)
        if pending is None:
            return  # its channel is gone: the broker redelivers the message anyway
        pending.settled.add(tag)
        self._send_soon()

    def is_settled(self, channel: AbstractChannel, tag: int) -> bool:
        """Whether the delivery was settled (its ack sent or due)."""
        pending = self._channels.get(channel)
        return pending is not None and (
            tag in pending.settled or not _is_outstanding(pending.outstanding, tag)
        )

    def forget(self, channel: AbstractChannel, tag: int) -> None:
        """The delivery was settled otherwise (rejected back to the queue): no ack for it."""
        pending = self._channels.get(channel)
        if pending is not None and tag in pending.outstanding:
            pending.outstanding.remove(tag)
            pending.settled.discard(tag)

    async def _send_due(self) -> None:
        # Acks settled while a flush is being written go out with the next round.
        while any(pending.settled for pending in self._channels.values()):
            for channel, pending in list(self._channels.items()):
                if not await self._flush_channel(channel, pending):
                    # Put back: tried again shortly, not in a tight loop, and not left for
                    # the broker's consumer timeout to redeliver.
                    asyncio.get_running_loop().call_later(RETRY_SECONDS, self._send_soon)
                    return

    def _send_soon(self) -> None:
        if self._sender is None or self._sender.done():
            self._sender = asyncio.get_running_loop().create_task(self._send_due())

    async def flush(self) -> None:
        """Send every ack that is due and wait until it is written (before closing)."""
        if self._sender is not None:
            await asyncio.gather(self._sender, return_exceptions=True)
        await self._send_due()

    async def _flush_channel(self, channel: AbstractChannel, pending: _Pending) -> bool:
        """Send the channel's due acks; False if some could not be written (put back)."""
        run = 0
        while run < len(pending.outstanding) and pending.outstanding[run] in pending.settled:
            run += 1
        acks = [(pending.outstanding[run - 1], True)] if run else []
        acks += [(tag, False) for tag in pending.outstanding[run:] if tag in pending.settled]
        covered = pending.outstanding[:run]  # what the multiple ack settles
        pending.settled.clear()  # all in `acks` now (a tag that is not outstanding is moot)
        del pending.outstanding[:run]
        for tag, _ in acks[1 if run else 0 :]:
            pending.outstanding.remove(tag)
        written = 0
        try:
            for tag, multiple in acks:
                await channel.basic_ack(tag, multiple=multiple)
                written += 1
        except (AMQPError, ChannelInvalidStateError, ConnectionError):
            # The channel closed under us: its unacked messages go back to the queue.
            log.info("channel closed before its acks were sent; the broker redelivers")
            with contextlib.suppress(KeyError):
                del self._channels[channel]
        except Exception:  # e.g. aiormq failing its futures on close: keep the sender alive
            log.exception("acks not written; trying again shortly")
            # Only the unwritten ones: acking a tag twice would close the channel.
            unwritten = [tag for tag, _ in acks[written:]]
            if run and written == 0:
                unwritten[:1] = covered
            for tag in unwritten:
                bisect.insort(pending.outstanding, tag)
            pending.settled.update(unwritten)
            return False
        return True


def _is_outstanding(outstanding: list[int], tag: int) -> bool:
    at = bisect.bisect_left(outstanding, tag)
    return at < len(outstanding) and outstanding[at] == tag


def delivery_tag(message: DeliveredMessage) -> int:
    """A consumed delivery's tag (aiormq's type also covers basic.get answers and returns)."""
    return cast(int, cast(spec.Basic.Deliver, message.delivery).delivery_tag)
