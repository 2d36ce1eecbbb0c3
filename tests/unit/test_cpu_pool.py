"""The CPU pool: work runs in another process, and a dead worker does not break the pool."""

from __future__ import annotations

import os

import pytest

from services.messaging.cpu import CpuPool, WorkerLost


def square(n: int) -> int:
    return n * n


def die(code: int) -> int:
    os._exit(code)


async def test_work_runs_in_a_worker_process() -> None:
    pool = CpuPool(1)
    try:
        assert await pool.run(square, 7) == 49
    finally:
        pool.close()


async def test_a_worker_that_dies_is_a_transient_failure_and_the_pool_recovers() -> None:
    pool = CpuPool(1)
    try:
        with pytest.raises(WorkerLost):
            await pool.run(die, 9)
        assert await pool.run(square, 3) == 9
    finally:
        pool.close()
