"""Retry policy: which failures are permanent, how often to retry at once, and the delay tiers.

Two stages, as in Dramatiq and Celery but without holding messages in worker memory:

1. immediate retries inside the handler call (tenacity, jittered exponential, ~1 s in total) for
   blips such as a dropped connection;
2. delayed retries through the broker: the message is republished (confirmed) into a delay-tier
   queue whose TTL dead-letters it back into the work queue, then the original is acked.

After the last tier the message is dead-lettered with reason `retries_exhausted`.

A handler that knows how long to wait (an HTTP `Retry-After`) raises `RetryLater`: no immediate
retry, and the delayed retry uses the first tier at least that long. A failure marked with
`no_immediate_retry` goes to the delay tiers at once too.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from pydantic import ValidationError
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

from services.messaging.errors import PermanentError, RetryLater, wants_no_immediate_retry

T = TypeVar("T")

IMMEDIATE_BUDGET_SECONDS = 1.0
FIRST_RETRY_MAX_WAIT = 0.1


@dataclass(frozen=True)
class RetryPolicy:
    delays: tuple[int, ...]
    """Delayed retries, in seconds; each must be one of the service's declared delay tiers."""
    immediate: int = 2
    """Extra in-process attempts of a transient failure before a delayed retry."""
    permanent: tuple[type[BaseException], ...] = ()
    """Exception types that retrying cannot fix, on top of `PermanentError`."""

    def is_permanent(self, exc: BaseException) -> bool:
        return isinstance(exc, (PermanentError, ValidationError, *self.permanent))

    def next_delay(self, attempt: int, exc: BaseException | None = None) -> int | None:
        """Delay before attempt `attempt + 1`, or None when `attempt` was the last one.

        When `exc` asks for a minimum delay (`RetryLater`) longer than this attempt's tier, the
        first of the policy's tiers at least that long is used instead (the longest if none is).
        """
        if not 1 <= attempt <= len(self.delays):
            return None
        delay = self.delays[attempt - 1]
        wanted = min_delay_of(exc)
        if delay < wanted:
            delay = next((tier for tier in self.delays if tier >= wanted), self.delays[-1])
        return delay

    @property
    def max_attempts(self) -> int:
        return len(self.delays) + 1

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run `fn`, retrying transient failures a few times at once, within a time budget that
        the first attempt counts against (a slow failure goes straight to a delay tier)."""
        started = time.monotonic()
        try:
            return await fn()
        except Exception as exc:
            left = IMMEDIATE_BUDGET_SECONDS - (time.monotonic() - started)
            if self.immediate == 0 or not self._retry_at_once(exc) or left <= 0:
                raise
        # A blip. The retry machinery is built only now: almost every call succeeds at once,
        # and building it for each call costs more than a no-op handler.
        await asyncio.sleep(random.uniform(0, min(FIRST_RETRY_MAX_WAIT, left)))  # jitter
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.immediate) | stop_after_delay(left),
            wait=wait_random_exponential(multiplier=0.05, max=0.4),
            retry=retry_if_exception(self._retry_at_once),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await fn()
        raise AssertionError("unreachable: tenacity reraises the last failure")

    def _retry_at_once(self, exc: BaseException) -> bool:
        # Only failures of the handler: never a cancellation (a shutdown, a closed channel),
        # which must stop the handler rather than run it again.
        return (
            isinstance(exc, Exception)
            and not self.is_permanent(exc)
            and min_delay_of(exc) == 0
            and not wants_no_immediate_retry(exc)
        )


def min_delay_of(exc: BaseException | None) -> float:
    """How long `exc` asks to wait before the next attempt; 0 for an ordinary failure."""
    return exc.min_delay if isinstance(exc, RetryLater) else 0.0
