"""A process pool for CPU-bound handler work, so the event loop keeps acking, heart-beating
and answering health checks while a handler computes.

A worker that dies (killed for memory, a crash in native code) breaks the whole pool: every job
in it fails, the one that killed it and its neighbours alike. The pool is replaced, and each of
those jobs runs again alone, in a process of its own: only the one that dies again is a
`WorkerLost`. (Failing them all would charge each neighbour an attempt, and, retried together
from the same delay tier, the culprit would take them down again until all were dead-lettered.)

Closing the pool stops work still running in it: by then the service gave up on those handlers
(the shutdown timeout passed) and their messages went back to the queue, so the work is redone
elsewhere. Waiting for it instead would keep the process alive past its shutdown timeout.
"""

from __future__ import annotations

import asyncio
import ctypes
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Final, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


class WorkerLost(Exception):
    """A pool worker died (killed, out of memory) while computing this job, and did so again
    when the job ran alone: a transient failure; the retry runs on a fresh worker."""


PR_SET_PDEATHSIG: Final = 1  # <linux/prctl.h>


def _end_with(parent: int) -> None:
    """A worker's initializer: end when the service process that started it ends. Killed
    (`kill -9`, out of memory), the service takes nothing down with it: its workers went on
    with the abandoned job, then idled for ever, a few more at each crash."""
    if not _death_signal_set():  # not Linux: look for the parent every second
        threading.Thread(target=_watch, args=(parent,), daemon=True).start()
    elif os.getppid() != parent:  # it ended before the signal was asked for
        os._exit(1)


def _death_signal_set() -> bool:
    """SIGKILL this process when its parent ends (Linux's PR_SET_PDEATHSIG); whether it is.
    Strictly, when the parent's thread that started it ends: the pool's launcher, which lives
    as long as the pool."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(1)


def _new_executor(workers: int) -> ProcessPoolExecutor:
    # spawn, not fork: forking a process that runs an event loop and sockets is unsafe.
    executor = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_end_with,
        initargs=(os.getpid(),),
    )
    # With spawn, CPython starts workers on demand, in `submit` *after* waking its manager
    # thread: the manager may then never watch the new worker, and if that one dies, the pool
    # is not marked broken and its jobs wait for ever (reproduced here: 6 runs in 18 under
    # load). Launch every worker with the first job instead, before the manager thread starts,
    # as CPython does for fork.
    executor._safe_to_dynamically_spawn_children = False  # type: ignore[attr-defined]  # CPython private
    return executor


def _launch(executor: ProcessPoolExecutor) -> None:
    """Start the executor's workers: all of them start with its first job (a no-op)."""
    executor.submit(int)


def _terminate(executor: ProcessPoolExecutor) -> None:
    # ProcessPoolExecutor cannot stop a running task (`terminate_workers` is Python 3.14+):
    # end the workers, or shutdown (and the interpreter's exit hook) waits for their tasks.
    workers = list((executor._processes or {}).values())
    executor.shutdown(wait=False, cancel_futures=True)
    for worker in workers:
        worker.terminate()
    for worker in workers:
        worker.join(timeout=5)


def worker_count(configured: int = 0) -> int:
    """The pool's processes: as configured, or one per CPU for 0."""
    return configured or os.cpu_count() or 1


class CpuPool:
    def __init__(self, workers: int = 0) -> None:
        self._workers = worker_count(workers)
        # Spawning the workers blocks the thread that does it for 7-64 ms (measured here): not
        # the event loop's, which keeps acking meanwhile. One thread for the pool's life, since
        # the workers end with the thread that started them (`_death_signal_set`).
        self._launcher = ThreadPoolExecutor(1, thread_name_prefix="cpu-pool-launcher")
        self._executor = _new_executor(self._workers)
        self._launched: asyncio.Future[None] | None = None  # the current executor's
        self._alone: set[ProcessPoolExecutor] = set()  # jobs running again on their own
        # Jobs at once, in the pool or running again alone: while the jobs of a broken pool run
        # again, the replacement pool takes no more beside them (twice the work at once, just
        # after a worker was killed for memory, would put the innocent ones at risk too).
        self._slots = asyncio.Semaphore(self._workers)

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        if kwargs:
            raise TypeError("pass positional arguments; they are pickled to the worker")
        async with self._slots:
            executor = self._executor
            try:
                await self._started(executor)
                return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)
            except BrokenProcessPool:
                # A broken pool refuses every later task: replace it (once, whoever sees it
                # first).
                if self._executor is executor:
                    self._executor = _new_executor(self._workers)
                    self._launched = None
                    executor.shutdown(wait=False, cancel_futures=True)
            return await self._run_alone(fn, *args)

    async def _started(self, executor: ProcessPoolExecutor) -> None:
        """The pool's workers are started (once; a start that failed is tried again)."""
        if self._launched is None:
            self._launched = self._launch(executor)
            # Seen even if every caller waiting for it was cancelled meanwhile (the next one
            # tries again), rather than logged as never retrieved.
            self._launched.add_done_callback(lambda done: done.cancelled() or done.exception())
        launched = self._launched
        try:
            await asyncio.shield(launched)  # one caller's cancellation stops no one's start
        except Exception:
            if self._launched is launched:
                self._launched = None
            raise

    def _launch(self, executor: ProcessPoolExecutor) -> asyncio.Future[None]:
        return asyncio.get_running_loop().run_in_executor(self._launcher, _launch, executor)

    async def _run_alone(self, fn: Callable[..., T], *args: object) -> T:
        """`fn(*args)` in a process of its own: if that dies too, this job is the culprit."""
        executor = _new_executor(1)
        self._alone.add(executor)
        try:
            await self._launch(executor)
            return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)
        except BrokenProcessPool as exc:
            raise WorkerLost(
                f"a CPU worker died while computing {fn.__name__}, twice (once alone)"
            ) from exc
        finally:
            self._alone.discard(executor)
            _terminate(executor)  # idle once done; still computing if the caller gave up

    def close(self) -> None:
        for executor in (self._executor, *self._alone):
            _terminate(executor)
        self._alone.clear()
        self._launcher.shutdown(wait=False, cancel_futures=True)
