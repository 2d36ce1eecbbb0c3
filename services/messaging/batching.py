"""Coalescing concurrent calls into batches (group commit), without adding latency.

The first call runs at once; calls that arrive while a batch is running wait for it and then go
together as the next batch. Under load, N concurrent handlers cost one round trip to the store
instead of N, and a quiet service pays nothing extra.

Work that nobody waits for in a hurry can `linger`: the first call of a batch then waits that
long for others to join it (PostgreSQL's `commit_delay`, Kafka's `linger.ms`). At a steady
rate, where calls arrive one at a time, that turns a store round trip per call into one per
interval. A full batch (`max_size`) goes at once: sized to half a consumer's prefetch window,
the linger then never holds back a loaded consumer.

A batch that fails fails every caller in it. Where one item can be the cause (a row the store
refuses), `isolate` says which failures to retry item by item: only the caller whose item
fails alone then sees a failure, the others their results.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")


class Batcher(Generic[In, Out]):
    def __init__(
        self,
        run: Callable[[list[In]], Awaitable[Sequence[Out]]],
        max_size: int = 500,
        linger: float = 0.0,
        isolate: Callable[[BaseException], bool] | None = None,
    ) -> None:
        self._run = run
        self._max_size = max_size
        self._linger = linger
        self._isolate = isolate
        self._pending: list[tuple[In, asyncio.Future[Out]]] = []
        self._task: asyncio.Task[None] | None = None
        self._full = asyncio.Event()  # ends a linger

    async def submit(self, item: In) -> Out:
        return await self.enqueue(item)

    def enqueue(self, item: In) -> asyncio.Future[Out]:
        """`submit` without a coroutine: the future of the item's outcome (many items can be
        awaited together with `asyncio.gather`, which then needs no task per item)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Out] = loop.create_future()
        self._pending.append((item, future))
        if len(self._pending) == self._max_size:
            self._full.set()  # a full batch waits for nobody
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._drain())
        return future

    async def _drain(self) -> None:
        while self._pending:
            if self._linger and len(self._pending) < self._max_size:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._linger):
                        await self._full.wait()
            self._full.clear()
            batch = self._pending[: self._max_size]
            del self._pending[: self._max_size]
            try:
                results = await self._run([item for item, _ in batch])
            except BaseException as exc:
                if self._worth_isolating(batch, exc):
                    await self._one_by_one(batch)
                    continue
                _fail(batch, exc)
                if isinstance(exc, asyncio.CancelledError) and _stopping():
                    raise
                continue  # work cancelled under the batch: its callers saw it; the next runs
            _settle(batch, results)

    def _worth_isolating(
        self, batch: list[tuple[In, asyncio.Future[Out]]], exc: BaseException
    ) -> bool:
        return (
            len(batch) > 1
            and self._isolate is not None
            and isinstance(exc, Exception)
            and self._isolate(exc)
        )

    async def _one_by_one(self, batch: list[tuple[In, asyncio.Future[Out]]]) -> None:
        for at, (item, future) in enumerate(batch):
            try:
                results = await self._run([item])
            except asyncio.CancelledError as exc:
                if _stopping():
                    _fail(batch[at:], exc)
                    raise
                _fail([(item, future)], exc)
                continue
            except Exception as exc:  # noqa: BLE001  # this item's caller raises it
                _fail([(item, future)], exc)
                continue
            _settle([(item, future)], results)


def _stopping() -> bool:
    """Whether the draining task itself is being cancelled (not only work it awaited)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _settle(batch: Sequence[tuple[In, asyncio.Future[Out]]], results: Sequence[Out]) -> None:
    for (_, future), result in zip(batch, results, strict=True):
        if not future.done():  # its caller was cancelled
            future.set_result(result)


def _fail(batch: Sequence[tuple[In, asyncio.Future[Out]]], exc: BaseException) -> None:
    for _, future in batch:
        if not future.done():
            future.set_exception(for_one_caller(exc))


def for_one_caller(exc: BaseException) -> BaseException:
    """A failure shared by many waiters, as one of them raises it: a copy of its own.

    Raised in many tasks, one exception object gathers every task's frames into one traceback,
    so each caller's log would show the others' too. The copy keeps the original's traceback
    (each caller's frames go in front of it: the raise site stays the innermost frame, which
    failure fingerprints name), its cause and context, and a list of notes of its own. An
    exception that cannot be rebuilt from its arguments, and a cancellation, are passed on as
    they are."""
    if isinstance(exc, asyncio.CancelledError):
        return exc
    try:
        twin = copy.copy(exc)
    except Exception:  # noqa: BLE001  # an exception class that copy cannot rebuild
        return exc
    twin.__traceback__ = exc.__traceback__
    twin.__cause__ = exc.__cause__
    twin.__context__ = exc.__context__
    twin.__suppress_context__ = exc.__suppress_context__
    if hasattr(exc, "__notes__"):
        twin.__notes__ = list(exc.__notes__)
    return twin
