"""Housekeeping that runs for the life of a service (pruning, purging), and never dies quietly:
a failed round is logged and tried again at the next one."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack

from services.messaging.logs import get_logger

log = get_logger("periodic")

FINISH_SECONDS = 10.0
"""How long a closing service lets a round under way finish before it cancels it."""


async def _every(
    interval: float, name: str, work: Callable[[], Awaitable[object]], stopping: asyncio.Event
) -> None:
    while not stopping.is_set():
        try:
            await work()
        except Exception:
            log.exception("housekeeping failed; trying again later", extra={"job": name})
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(interval):
                await stopping.wait()


async def _stop(task: asyncio.Task[None], stopping: asyncio.Event) -> None:
    # A round is left to finish rather than cut in the middle of its statement: a store
    # connection cancelled mid-query is closed later, in the background, after the store is
    # disposed (or never, once the loop is gone).
    stopping.set()
    try:
        await asyncio.wait_for(asyncio.shield(task), FINISH_SECONDS)
    except TimeoutError:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def run_every(
    stack: AsyncExitStack, interval: float, name: str, work: Callable[[], Awaitable[object]]
) -> None:
    """Run `work` now and every `interval` seconds until `stack` closes (which lets a round
    under way finish, for up to `FINISH_SECONDS`)."""
    stopping = asyncio.Event()
    task = asyncio.get_running_loop().create_task(_every(interval, name, work, stopping), name=name)
    stack.push_async_callback(_stop, task, stopping)
