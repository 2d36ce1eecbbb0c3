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
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


class CpuPool:
    def __init__(self, workers: int = 0) -> None:
        # spawn, not fork: forking a process that runs an event loop and sockets is unsafe.
        self._executor = ProcessPoolExecutor(
            max_workers=workers or os.cpu_count() or 1,
            mp_context=multiprocessing.get_context("spawn"),
        )

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        if kwargs:
            raise TypeError("pass positional arguments; they are pickled to the worker")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        # ProcessPoolExecutor cannot stop a running task (`terminate_workers` is Python 3.14+):
        # end the workers, or shutdown (and the interpreter's exit hook) waits for their tasks.
        workers = list((self._executor._processes or {}).values())
        self._executor.shutdown(wait=False, cancel_futures=True)
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.join(timeout=5)
