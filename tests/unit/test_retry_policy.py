"""The retry policy: permanent versus transient, immediate retries, delay tiers."""

from __future__ import annotations

import asyncio
import time

import pytest
from pydantic import BaseModel, ValidationError

from services.messaging.errors import PermanentError, RetryLater, no_immediate_retry
from services.messaging.retry import IMMEDIATE_BUDGET_SECONDS, RetryPolicy, min_delay_of


class Flaky:
    def __init__(self, failures: int, exc: Exception) -> None:
        self.failures, self.exc, self.calls = failures, exc, 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.exc
        return "done"


def a_validation_error() -> ValidationError:
    class M(BaseModel):
        x: int

    try:
        M.model_validate({"x": "nope"})
    except ValidationError as exc:
        return exc
    raise AssertionError


def test_delays_are_consumed_in_order_then_exhausted() -> None:
    policy = RetryPolicy(delays=(5, 30))
    assert [policy.next_delay(a) for a in (1, 2, 3)] == [5, 30, None]
    assert policy.max_attempts == 3


@pytest.mark.parametrize(
    "exc", [PermanentError("no"), a_validation_error(), KeyError("configured")]
)
def test_permanent_errors_are_recognised(exc: Exception) -> None:
    assert RetryPolicy(delays=(1,), permanent=(KeyError,)).is_permanent(exc)


def test_anything_else_is_transient() -> None:
    assert not RetryPolicy(delays=(1,)).is_permanent(ConnectionResetError())


async def test_a_blip_is_retried_in_process() -> None:
    flaky = Flaky(failures=2, exc=ConnectionResetError())
    assert await RetryPolicy(delays=(1,), immediate=2).call(flaky) == "done"
    assert flaky.calls == 3


async def test_immediate_retries_are_bounded_in_count() -> None:
    flaky = Flaky(failures=10, exc=ConnectionResetError())
    with pytest.raises(ConnectionResetError):
        await RetryPolicy(delays=(1,), immediate=2).call(flaky)
    assert flaky.calls == 3


async def test_immediate_retries_are_bounded_in_time() -> None:
    flaky = Flaky(failures=100, exc=ConnectionResetError())
    started = time.monotonic()
    with pytest.raises(ConnectionResetError):
        await RetryPolicy(delays=(1,), immediate=10).call(flaky)
    assert time.monotonic() - started < IMMEDIATE_BUDGET_SECONDS + 0.5


async def test_a_failure_slower_than_the_budget_is_not_retried_in_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first attempt counts against the budget: a handler that took longer than it to
    fail (a webhook timing out) goes to a delay tier instead of failing slowly twice."""
    monkeypatch.setattr("services.messaging.retry.IMMEDIATE_BUDGET_SECONDS", 0.05)
    calls = 0

    async def slow_failure() -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.1)
        raise TimeoutError

    with pytest.raises(TimeoutError):
        await RetryPolicy(delays=(1,), immediate=2).call(slow_failure)
    assert calls == 1


async def test_a_permanent_error_is_not_retried_in_process() -> None:
    flaky = Flaky(failures=1, exc=PermanentError("bad input"))
    with pytest.raises(PermanentError):
        await RetryPolicy(delays=(1,), immediate=5).call(flaky)
    assert flaky.calls == 1


# --- RetryLater: a failure that says how long to wait -----------------------------------------


@pytest.mark.parametrize(
    ("attempt", "min_delay", "expected"),
    [
        (1, 0, 5),  # an ordinary tier
        (1, 5, 5),  # the tier is long enough already
        (1, 6, 30),  # raised to the first tier at least that long
        (1, 30, 30),
        (2, 1, 30),  # never shortened
        (1, 31, 120),
        (1, 10_000, 120),  # none is that long: the longest tier
        (3, 1, 120),
        (4, 60, None),  # the last attempt stays the last
    ],
)
def test_retry_later_picks_the_first_tier_at_least_that_long(
    attempt: int, min_delay: float, expected: int | None
) -> None:
    policy = RetryPolicy(delays=(5, 30, 120))
    assert policy.next_delay(attempt, RetryLater("busy", min_delay=min_delay)) == expected


def test_other_failures_keep_their_tier() -> None:
    policy = RetryPolicy(delays=(5, 30))
    assert policy.next_delay(1, ConnectionResetError()) == 5
    assert min_delay_of(ConnectionResetError()) == 0
    assert min_delay_of(RetryLater("busy", min_delay=-3)) == 0


def test_retry_later_is_transient() -> None:
    assert not RetryPolicy(delays=(1,)).is_permanent(RetryLater("busy", min_delay=2))


async def test_retry_later_with_a_delay_is_not_retried_in_process() -> None:
    flaky = Flaky(failures=1, exc=RetryLater("busy", min_delay=2))
    with pytest.raises(RetryLater):
        await RetryPolicy(delays=(1,), immediate=5).call(flaky)
    assert flaky.calls == 1


async def test_retry_later_without_a_delay_is_retried_in_process() -> None:
    flaky = Flaky(failures=1, exc=RetryLater("busy", min_delay=0))
    assert await RetryPolicy(delays=(1,), immediate=2).call(flaky) == "done"
    assert flaky.calls == 2


async def test_a_failure_marked_no_immediate_retry_waits_for_its_tier() -> None:
    policy = RetryPolicy(delays=(5, 30), immediate=5)
    flaky = Flaky(failures=1, exc=no_immediate_retry(ConnectionError("mail server busy")))
    with pytest.raises(ConnectionError) as caught:
        await policy.call(flaky)
    assert flaky.calls == 1
    assert not policy.is_permanent(caught.value)
    assert policy.next_delay(1, caught.value) == 5


async def test_a_cancellation_is_never_retried_in_process() -> None:
    import asyncio

    calls = 0

    async def cancelled() -> None:
        nonlocal calls
        calls += 1
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await RetryPolicy(delays=(1,), immediate=3).call(cancelled)
    assert calls == 1
