"""A circuit breaker per webhook receiver: one that did not answer in time is not asked again
for a while.

A receiver that accepts connections and never answers holds each delivery to it for the whole
webhook timeout, and with them the notifier's prefetch window: every other notification,
callbacks included, waited behind them (a batch of 64 such webhooks held a log notification
for 19 s, and each round of their retries would again). After a delivery to a receiver timed
out, its deliveries fail at once for `cooldown` seconds, as transient (`ReceiverCoolingDown`, a
`RetryLater` for the rest of the cooldown: retried through the delay tiers, an attempt spent
each). Then one delivery is let through as a trial while the others still fail at once: any
outcome but a timeout closes the breaker, a timeout opens it again. Failures that come at once
(a refused connection, a `503`) hold nothing and do not count.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from services.messaging.errors import RetryLater

MAX_TRACKED: Final = 10_000
"""Receivers whose breaker is open at most (timed out, not answered since): past that, those
whose cooldown is over are forgotten (the next delivery to such a receiver is not a trial)."""


class ReceiverCoolingDown(RetryLater):
    """A delivery not attempted: its receiver did not answer in time lately."""

    def __init__(self, receiver: str, remaining: float) -> None:
        super().__init__(
            f"{receiver} did not answer in time lately; not asked again for {remaining:.0f} s",
            min_delay=remaining,
        )


@dataclass
class _Open:
    until: float
    trial: bool = False  # a delivery let through after the cooldown is under way


class ReceiverBreaker:
    def __init__(self, cooldown: float, clock: Callable[[], float] = time.monotonic) -> None:
        """`cooldown`: seconds a receiver that timed out is not asked; 0: never held back."""
        self._cooldown = cooldown
        self._clock = clock
        self._open: dict[str, _Open] = {}

    def enter(self, receiver: str) -> None:
        """Before a delivery to `receiver`: raises `ReceiverCoolingDown` while it must not be
        asked; after its cooldown, lets one delivery through as the trial."""
        state = self._open.get(receiver)
        if state is None:
            return
        remaining = state.until - self._clock()
        if remaining > 0 or state.trial:
            raise ReceiverCoolingDown(receiver, max(remaining, 1.0))
        state.trial = True

    def settle(self, receiver: str, *, timed_out: bool) -> None:
        """After a delivery to `receiver` (whatever its outcome): a timeout opens its breaker
        (again), anything else closes it."""
        if not timed_out:
            self._open.pop(receiver, None)
            return
        if self._cooldown <= 0:
            return
        now = self._clock()
        if len(self._open) >= MAX_TRACKED:
            self._open = {r: s for r, s in self._open.items() if s.until > now or s.trial}
        self._open[receiver] = _Open(now + self._cooldown)
