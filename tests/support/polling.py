"""Poll with a deadline (tenacity), never a fixed sleep."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from tenacity import AsyncRetrying, Retrying, retry_if_exception_type, stop_after_delay, wait_fixed

T = TypeVar("T")


async def eventually(check: Callable[[], Awaitable[T]], timeout: float = 10.0) -> T:
    """Await `check` until it stops raising AssertionError; reraise the last one at the deadline.
    Any other exception fails at once: assert on what is not there yet (`assert len(rows) == 1`)
    rather than unpack or index it (`[row] = rows` raises ValueError, which is not retried)."""
    async for attempt in AsyncRetrying(
        stop=stop_after_delay(timeout),
        wait=wait_fixed(0.05),
        retry=retry_if_exception_type(AssertionError),
        reraise=True,
    ):
        with attempt:
            return await check()
    raise AssertionError("unreachable")


def eventually_sync(check: Callable[[], T], timeout: float = 10.0) -> T:
    for attempt in Retrying(
        stop=stop_after_delay(timeout),
        wait=wait_fixed(0.05),
        retry=retry_if_exception_type(AssertionError),
        reraise=True,
    ):
        with attempt:
            return check()
    raise AssertionError("unreachable")
