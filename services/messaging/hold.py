"""Holding a delivery while a dependency is away: the pauses between tries.

A consumer whose store or broker is briefly unavailable keeps the delivery and tries again,
rather than returning it to its queue: every return counts as a delivery, and a quorum queue
with a delivery limit dead-letters (or, without a dead-letter target, drops) a message past it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

LONGEST_PAUSE = 30.0
MAX_HOLD_SECONDS = 600.0
"""How long a delivery is held at most (well under RabbitMQ's 30-minute `consumer_timeout`,
which would close the channel over it)."""


def hold_pauses(first: float) -> Iterator[float]:
    """The pauses before each new try: doubling from `first` up to LONGEST_PAUSE, for as long as
    the next one still ends within MAX_HOLD_SECONDS of the start."""
    give_up_at = time.monotonic() + MAX_HOLD_SECONDS
    pause = first
    while time.monotonic() + pause <= give_up_at:
        yield pause
        pause = min(pause * 2, LONGEST_PAUSE)
