"""The CPU pool: work runs in another process, and a dead worker does not break the pool."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from services.messaging.cpu import CpuPool, WorkerLost


def square(n: int) -> int:
    return n * n


def die(code: int) -> int:
    os._exit(code)


def once_released(gate: str, value: int) -> int:
    """Work that is in flight until the test opens `gate` (a file)."""
    while not os.path.exists(gate):
        time.sleep(0.01)
    return value


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


async def test_jobs_beside_a_dying_worker_run_again_and_only_its_own_job_fails(
    tmp_path: Path,
) -> None:
    pool = CpuPool(4)
    gate = tmp_path / "gate"
    try:
        neighbours = [asyncio.create_task(pool.run(once_released, str(gate), n)) for n in (1, 2, 3)]
        with pytest.raises(WorkerLost):
            await pool.run(die, 137)  # broke the pool under the neighbours, then died alone
        gate.touch()
        assert await asyncio.gather(*neighbours) == [1, 2, 3]
        assert await pool.run(square, 4) == 16
    finally:
        pool.close()


async def test_every_worker_starts_with_the_first_job() -> None:
    """CPython starts spawn workers on demand after waking the thread that watches them, which
    can then miss the death of the newest one: its jobs would wait for ever. All workers
    start with the first job instead (this pins the CPython internals that relies on)."""
    pool = CpuPool(3)
    try:
        assert await pool.run(square, 2) == 4
        workers = pool._executor._processes or {}
        assert len(workers) == 3 and all(p.is_alive() for p in workers.values())
    finally:
        pool.close()
