"""Housekeeping rounds: run at once and then every interval; a closing service lets the round
under way finish (bounded) instead of cutting its store statement in the middle."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack

import pytest

from services.messaging import periodic
from services.messaging.periodic import run_every


async def test_a_round_runs_at_once_and_again_after_the_interval() -> None:
    loop = asyncio.get_running_loop()
    rounds: list[float] = []
    third = asyncio.Event()

    async def work() -> None:
        rounds.append(loop.time())
        if len(rounds) == 3:
            third.set()

    began = loop.time()
    async with AsyncExitStack() as stack:
        run_every(stack, 0.05, "test", work)
        await asyncio.wait_for(third.wait(), 5)
    assert rounds[0] - began < 0.05
    assert all(later - earlier >= 0.049 for earlier, later in itertools.pairwise(rounds))


async def close_during_a_round(work: Callable[[], Awaitable[None]]) -> None:
    """Start the housekeeping of `work`, and close the service once its first round began."""
    started = asyncio.Event()

    async def round_() -> None:
        started.set()
        await work()

    async with AsyncExitStack() as stack:
        run_every(stack, 3600, "test", round_)
        await started.wait()


async def test_closing_lets_the_round_under_way_finish() -> None:
    finished = []

    async def work() -> None:
        await asyncio.sleep(0.1)  # a prune's statement, say
        finished.append(True)

    await close_during_a_round(work)
    assert finished == [True]


async def test_a_round_that_will_not_finish_is_cancelled_after_a_while(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(periodic, "FINISH_SECONDS", 0.05)
    cancelled = []

    async def work() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    await close_during_a_round(work)
    assert cancelled == [True]


async def test_a_failed_round_is_logged_and_the_next_one_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls = 0

    async def work() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("the store hiccupped")

    async with AsyncExitStack() as stack:
        run_every(stack, 0.02, "test", work)
        await asyncio.sleep(0.07)
    assert calls >= 2
    assert "housekeeping failed; trying again later" in caplog.text
