"""Housekeeping that runs for the life of a service (pruning, purging), and never dies quietly:
a failed round is logged and tried again at the next one."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack

from services.messaging.logs import get_logger

log = get_logger("periodic")


async def _every(interval: float, name: str, work: Callable[[], Awaitable[object]]) -> None:
    while True:
        try:
            await work()
        except Exception:
            log.exception("housekeeping failed; trying again later", extra={"job": name})
        await asyncio.sleep(interval)


def run_every(
    stack: AsyncExitStack, interval: float, name: str, work: Callable[[], Awaitable[object]]
) -> None:
    """Run `work` now and every `interval` seconds until `stack` closes."""
    task = asyncio.get_running_loop().create_task(_every(interval, name, work), name=name)
    stack.callback(task.cancel)
