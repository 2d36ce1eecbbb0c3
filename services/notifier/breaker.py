"""A circuit breaker per webhook receiver: one that did not answer in time, several times in a
row, is not asked again for a while.

A receiver that accepts connections and never answers holds each delivery to it for the whole
webhook timeout, and with them the notifier's prefetch window: every other notification,
callbacks included, waited behind them (a batch of 64 such webhooks held a log notification
for 19 s, and each round of their retries would again). After `TIMEOUTS_TO_OPEN` deliveries to
a receiver timed out with no answer from it in between, its deliveries fail at once for
`cooldown` seconds, as transient (`ReceiverCoolingDown`, a `RetryLater` for the rest of the
cooldown: retried through the delay tiers, an attempt spent each). Then one delivery is let
through as a trial while the others still fail at once: any outcome but a timeout closes the
breaker, a timeout opens it again. An answer in between resets the count, so a host many
receivers share (one URL of it hanging, the others answering) is not held back for the one.
Failures that come at once (a refused connection, a `503`) hold nothing and do not count.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from services.messaging.errors import RetryLater

DEFAULT_COOLDOWN: Final = 30.0
"""Seconds a receiver that kept timing out is not asked (`COURIER_WEBHOOK_COOLDOWN`)."""
TIMEOUTS_TO_OPEN: Final = 3
"""Timeouts in a row, no answer between them, that hold a receiver back."""
MAX_TRACKED: Final = 10_000
"""Receivers with timeouts noted at most: past that, those not held back now are forgotten."""


class ReceiverCoolingDown(RetryLater):
    """A delivery not attempted: its receiver did not answer in time lately."""

    def __init__(self, receiver: str, remaining: float) -> None:
        super().__init__(
            f"{receiver} did not answer in time lately; not asked again for {remaining:.0f} s",
            min_delay=remaining,
        )


@dataclass
class _Timeouts:
    count: int = 0
    """Deliveries that timed out in a row, no answer between them."""
    until: float = -math.inf
    """When the receiver may be asked again (a trial), once held back."""
    trial: bool = False
    """A delivery let through after the cooldown is under way."""


class ReceiverBreaker:
    def __init__(self, cooldown: float, clock: Callable[[], float] = time.monotonic) -> None:
        """`cooldown`: seconds a receiver that kept timing out is not asked; 0: never held
        back."""
        self._cooldown = cooldown
        self._clock = clock
        self._receivers: dict[str, _Timeouts] = {}

    def enter(self, receiver: str) -> None:
        """Before a delivery to `receiver`: raises `ReceiverCoolingDown` while it must not be
        asked; after its cooldown, lets one delivery through as the trial."""
        state = self._receivers.get(receiver)
        if state is None or state.count < TIMEOUTS_TO_OPEN:
            return
        remaining = state.until - self._clock()
        if remaining > 0 or state.trial:
            raise ReceiverCoolingDown(receiver, max(remaining, 1.0))
        state.trial = True

    def settle(self, receiver: str, *, timed_out: bool) -> None:
        """After a delivery to `receiver` (whatever its outcome): a timeout counts, and once
        they are enough (a failed trial among them) holds it back (again); anything else is
        an answer and closes it."""
        if not timed_out:
            self._receivers.pop(receiver, None)
            return
        if self._cooldown <= 0:
            return
        now = self._clock()
        if len(self._receivers) >= MAX_TRACKED:
            self._receivers = {r: s for r, s in self._receivers.items() if s.until > now or s.trial}
        state = self._receivers.setdefault(receiver, _Timeouts())
        state.count += 1
        if state.count >= TIMEOUTS_TO_OPEN:
            state.until, state.trial = now + self._cooldown, False
