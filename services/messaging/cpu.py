"""A process pool for CPU-bound handler work, so the event loop keeps acking, heart-beating
and answering health checks while a handler computes.

Closing the pool stops work still running in it: by then the service gave up on those handlers
(the shutdown timeout passed) and their messages went back to the queue, so the work is redone
elsewhere. Waiting for it instead would keep the process alive past its shutdown timeout.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


class WorkerLost(Exception):
    """A pool worker died (killed, out of memory) while computing: a transient failure; the
    pool was rebuilt, so the retry runs on a fresh worker."""


class CpuPool:
    def __init__(self, workers: int = 0) -> None:
        self._workers = workers or os.cpu_count() or 1
        self._executor = self._new_executor()

    def _new_executor(self) -> ProcessPoolExecutor:
        # spawn, not fork: forking a process that runs an event loop and sockets is unsafe.
        return ProcessPoolExecutor(
            max_workers=self._workers, mp_context=multiprocessing.get_context("spawn")
        )

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        if kwargs:
            raise TypeError("pass positional arguments; they are pickled to the worker")
        executor = self._executor
        try:
            return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)
        except BrokenProcessPool as exc:
            # A broken pool refuses every later task: replace it (once, whoever sees it first).
            if self._executor is executor:
                self._executor = self._new_executor()
                executor.shutdown(wait=False, cancel_futures=True)
            raise WorkerLost(f"a CPU worker died while computing {fn.__name__}") from exc

    def close(self) -> None:
        # ProcessPoolExecutor cannot stop a running task (`terminate_workers` is Python 3.14+):
        # end the workers, or shutdown (and the interpreter's exit hook) waits for their tasks.
        workers = list((self._executor._processes or {}).values())
        self._executor.shutdown(wait=False, cancel_futures=True)
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.join(timeout=5)
