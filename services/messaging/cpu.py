"""A process pool for CPU-bound handler work, so the event loop keeps acking, heart-beating
and answering health checks while a handler computes.

A worker that dies (killed for memory, a crash in native code) breaks the whole pool: every job
in it fails, the one that killed it and its neighbours alike. The pool is replaced, and each of
those jobs runs again alone, in a process of its own: only the one that dies again is a
`WorkerLost`. (Failing them all would charge each neighbour an attempt, and, retried together
from the same delay tier, the culprit would take them down again until all were dead-lettered.)

A job's outcome comes back through a file, the pool's result pipe carrying only its name:
CPython's pool reads a result with a blocking `recv`, so a worker killed while it wrote one
larger than the pipe takes at once (a dataset's summary, ~90 kB) left the pool's manager
waiting for the rest for ever: the pool never marked broken, every later job hanging, and the
process unable to exit. A name is written at once.

Closing the pool stops work still running in it: by then the service gave up on those handlers
(the shutdown timeout passed) and their messages went back to the queue, so the work is redone
elsewhere. Waiting for it instead would keep the process alive past its shutdown timeout.
"""

from __future__ import annotations

import asyncio
import ctypes
import multiprocessing
import os
import pickle
import shutil
import signal
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Final, ParamSpec, TypeVar, cast

P = ParamSpec("P")
T = TypeVar("T")


class WorkerLost(Exception):
    """A pool worker died (killed, out of memory) while computing this job, and did so again
    when the job ran alone: a transient failure; the retry runs on a fresh worker."""


PR_SET_PDEATHSIG: Final = 1  # <linux/prctl.h>


def _end_with(parent: int) -> None:
    """A worker's initializer: end when the service process that started it ends. Killed
    (`kill -9`, out of memory), the service takes nothing down with it: its workers went on
    with the abandoned job, then idled for ever, a few more at each crash.

    SIGINT is the service's, not the worker's: Ctrl-C in a terminal signals the whole process
    group, and a worker that took it as its own KeyboardInterrupt ended the job the service was
    draining, whose KeyboardInterrupt then came back through the pool and ended the service in
    the middle of its drain, with plain-text tracebacks. The service ends its workers itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
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
    # SIGKILL, since the job was given up on and has nothing to clean up: a job deaf to SIGTERM
    # (a library's handler) went on for ever. Without a join: the executor's manager thread
    # reaps them, off the event loop (joined on it, they held the loop for 5 s each).
    workers = list((executor._processes or {}).values())
    executor.shutdown(wait=False, cancel_futures=True)
    for worker in workers:
        worker.kill()


class RemoteTraceback(Exception):
    """Where a job raised, in its worker: the cause of the exception the caller gets."""

    def __str__(self) -> str:
        return str(self.args[0])


def _outcome_in_file(directory: str, fn: Callable[..., object], *args: object) -> str:
    """In a worker: run `fn(*args)` and pickle its outcome to a new file of `directory`; the
    file's name is what goes back through the pool's pipe."""
    try:
        done, value, where = True, fn(*args), ""
    except Exception as exc:  # noqa: BLE001  # whatever it raised is its outcome
        done, value, where = False, exc, "".join(traceback.format_exception(exc))
    try:
        pickled = pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
    except Exception as exc:  # noqa: BLE001  # an outcome that does not pickle: say so
        failed = RuntimeError(f"the job's outcome cannot be sent back: {value!r}: {exc}")
        done, pickled = False, pickle.dumps(failed, pickle.HIGHEST_PROTOCOL)
    fd, path = tempfile.mkstemp(dir=directory)
    with os.fdopen(fd, "wb") as file:
        pickle.dump((done, where), file, pickle.HIGHEST_PROTOCOL)
        file.write(pickled)
    return path


def _read_outcome(path: str) -> tuple[bool, object, str]:
    """Whether the job returned, what it returned or raised, and where it raised. Written by
    this pool's own worker, in a directory only this user can enter."""
    try:
        with open(path, "rb") as file:
            done, where = pickle.load(file)  # noqa: S301
            try:
                return done, pickle.load(file), where  # noqa: S301
            except Exception as exc:  # noqa: BLE001  # an exception whose class cannot be rebuilt
                failed = RuntimeError(f"the job's outcome cannot be read back: {exc}")
                return False, failed, where
    finally:
        os.unlink(path)


OUTCOMES_PREFIX: Final = "courier-cpu-"


def _outcomes_directory() -> str:
    """A private directory for this process's job outcomes, named for its pid. Those of
    processes that ended without closing their pool (killed) are removed first."""
    base = tempfile.gettempdir()
    for entry in os.scandir(base):
        owner = entry.name.removeprefix(OUTCOMES_PREFIX).split("-", 1)[0]
        if entry.name.startswith(OUTCOMES_PREFIX) and owner.isdigit() and _ended(int(owner)):
            shutil.rmtree(entry.path, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{OUTCOMES_PREFIX}{os.getpid()}-", dir=base)


def _ended(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's
        return False
    return False


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
        self._outcomes = _outcomes_directory()

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        if kwargs:
            raise TypeError("pass positional arguments; they are pickled to the worker")
        async with self._slots:
            executor = self._executor
            try:
                await self._started(executor)
                return await self._call(executor, fn, *args)
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
            return await self._call(executor, fn, *args)
        except BrokenProcessPool as exc:
            raise WorkerLost(
                f"a CPU worker died while computing {fn.__name__}, twice (once alone)"
            ) from exc
        finally:
            self._alone.discard(executor)
            _terminate(executor)  # idle once done; still computing if the caller gave up

    async def _call(self, executor: ProcessPoolExecutor, fn: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        path = await loop.run_in_executor(executor, _outcome_in_file, self._outcomes, fn, *args)
        done, value, where = await asyncio.to_thread(_read_outcome, path)
        if done:
            return cast(T, value)
        assert isinstance(value, BaseException)
        raise value from RemoteTraceback(where)

    def close(self) -> None:
        for executor in (self._executor, *self._alone):
            _terminate(executor)
        self._alone.clear()
        self._launcher.shutdown(wait=False, cancel_futures=True)
        shutil.rmtree(self._outcomes, ignore_errors=True)  # those of jobs given up on
