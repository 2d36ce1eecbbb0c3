"""Group commit: concurrent calls share batches, a quiet call does not wait, failures reach
every caller of their batch, unless isolated: then only the caller whose item fails alone."""

from __future__ import annotations

import asyncio
import sqlite3
import time
import traceback

import pytest

from services.messaging.batching import Batcher, for_one_caller
from services.messaging.store import row_may_be_at_fault


class Store:
    """Records each batch it is given; optionally slow, optionally failing once."""

    def __init__(self, seconds: float = 0.0, fail_first: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.seconds = seconds
        self.fail_first = fail_first

    async def write(self, items: list[int]) -> list[int]:
        self.batches.append(items)
        await asyncio.sleep(self.seconds)
        if self.fail_first and len(self.batches) == 1:
            raise OSError("the disk is away")
        return [item * 10 for item in items]


async def test_calls_that_arrive_during_a_batch_go_together_as_the_next_one() -> None:
    store = Store(seconds=0.05)
    batcher = Batcher(store.write)
    first = asyncio.ensure_future(batcher.submit(1))
    await asyncio.sleep(0.01)  # the first batch is running
    results = await asyncio.gather(first, *(batcher.submit(n) for n in (2, 3, 4)))
    assert results == [10, 20, 30, 40]
    assert store.batches == [[1], [2, 3, 4]]


async def test_a_quiet_call_runs_at_once() -> None:
    store = Store()
    batcher = Batcher(store.write)
    started = time.monotonic()
    assert await batcher.submit(7) == 70
    assert time.monotonic() - started < 0.05
    assert store.batches == [[7]]


async def test_with_a_linger_calls_arriving_within_it_share_one_batch() -> None:
    # Margins of tenths of a second: a loaded CI host oversleeps by tens of milliseconds.
    store = Store()
    batcher = Batcher(store.write, linger=0.5)
    first = asyncio.ensure_future(batcher.submit(1))
    await asyncio.sleep(0.05)  # one at a time, as at a steady rate
    second = asyncio.ensure_future(batcher.submit(2))
    await asyncio.sleep(0.05)
    assert list(await asyncio.gather(first, second, batcher.submit(3))) == [10, 20, 30]
    assert store.batches == [[1, 2, 3]]


async def test_every_batch_lingers_not_only_the_first() -> None:
    store = Store(seconds=0.5)
    batcher = Batcher(store.write, linger=0.5)
    first = asyncio.ensure_future(batcher.submit(1))
    await asyncio.sleep(0.75)  # lingered until 0.5, being written until 1.0
    second = asyncio.ensure_future(batcher.submit(2))
    await asyncio.sleep(0.5)  # written; the next one lingers (until 1.5) for company
    third = asyncio.ensure_future(batcher.submit(3))
    assert list(await asyncio.gather(first, second, third)) == [10, 20, 30]
    assert store.batches == [[1], [2, 3]]


async def test_a_full_batch_does_not_wait_out_the_linger() -> None:
    store = Store()
    batcher = Batcher(store.write, max_size=2, linger=10.0)
    full = asyncio.gather(batcher.submit(1), batcher.submit(2))
    assert list(await asyncio.wait_for(full, 1.0)) == [10, 20]
    assert store.batches == [[1, 2]]


async def test_a_failed_batch_fails_each_of_its_callers_and_the_next_batch_still_runs() -> None:
    store = Store(seconds=0.05, fail_first=True)
    batcher = Batcher(store.write)
    first = asyncio.ensure_future(batcher.submit(1))
    await asyncio.sleep(0.01)
    later = asyncio.ensure_future(batcher.submit(2))
    with pytest.raises(OSError, match="the disk is away"):
        await first
    assert await later == 20
    assert store.batches == [[1], [2]]


async def test_a_batch_whose_work_was_cancelled_leaves_the_next_batch_running() -> None:
    # Work cancelled under the batch (an executor shut down, a shared future cancelled), not
    # the batcher: the calls that arrived meanwhile waited for the next call to come along.
    class CancelledOnce(Store):
        async def write(self, items: list[int]) -> list[int]:
            self.batches.append(items)
            await asyncio.sleep(self.seconds)
            if len(self.batches) == 1:
                raise asyncio.CancelledError
            return [item * 10 for item in items]

    store = CancelledOnce(seconds=0.05)
    batcher = Batcher(store.write)
    first = asyncio.ensure_future(batcher.submit(1))
    await asyncio.sleep(0.01)
    later = asyncio.ensure_future(batcher.submit(2))
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await asyncio.wait_for(later, 1) == 20


async def test_the_callers_of_a_failed_batch_each_raise_an_exception_of_their_own() -> None:
    """One object raised in many tasks would chain all their tracebacks into one."""
    store = Store(seconds=0.05, fail_first=True)
    batcher = Batcher(store.write, linger=0.01)
    outcomes = await asyncio.gather(batcher.submit(1), batcher.submit(2), return_exceptions=True)
    first, second = outcomes
    assert isinstance(first, OSError) and isinstance(second, OSError)
    assert first is not second
    assert str(first) == str(second) == "the disk is away"
    for each in (first, second):  # the raise site stays the innermost frame
        assert traceback.extract_tb(each.__traceback__)[-1].name == "write"


def test_a_callers_copy_keeps_the_failures_chain_and_notes_of_its_own() -> None:
    shared = OSError("the disk is away")
    shared.__cause__ = ConnectionError("reset")
    shared.add_note("batch of 3")
    copy = for_one_caller(shared)
    copy.add_note("this caller's")

    assert isinstance(copy.__cause__, ConnectionError)
    assert shared.__notes__ == ["batch of 3"]
    assert copy.__notes__ == ["batch of 3", "this caller's"]


class Refusing:
    """A store that refuses any batch holding a negative item (a row breaking a constraint),
    or, when `away`, every batch."""

    def __init__(self, away: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.away = away

    async def write(self, items: list[int]) -> list[int]:
        self.batches.append(items)
        await asyncio.sleep(0)
        if self.away:
            raise ConnectionRefusedError("the store is away")
        if any(item < 0 for item in items):
            raise sqlite3.IntegrityError("CHECK constraint failed: item >= 0")
        return [item * 10 for item in items]


async def _three_at_once(batcher: Batcher[int, int]) -> list[int | BaseException]:
    futures = [batcher.enqueue(item) for item in (1, -2, 3)]
    return await asyncio.gather(*futures, return_exceptions=True)


async def test_with_isolation_one_bad_row_fails_only_its_own_caller() -> None:
    store = Refusing()
    batcher = Batcher(store.write, isolate=row_may_be_at_fault)
    first, second, third = await _three_at_once(batcher)
    assert (first, third) == (10, 30)
    assert isinstance(second, sqlite3.IntegrityError)
    assert store.batches == [[1, -2, 3], [1], [-2], [3]]


async def test_an_outage_is_not_tried_row_by_row() -> None:
    store = Refusing(away=True)
    batcher = Batcher(store.write, isolate=row_may_be_at_fault)
    outcomes = await _three_at_once(batcher)
    assert all(isinstance(outcome, ConnectionRefusedError) for outcome in outcomes)
    assert store.batches == [[1, -2, 3]]  # not hammered once per row


async def test_without_isolation_a_bad_row_fails_its_whole_batch() -> None:
    store = Refusing()
    batcher = Batcher(store.write)
    outcomes = await _three_at_once(batcher)
    assert all(isinstance(outcome, sqlite3.IntegrityError) for outcome in outcomes)
    assert store.batches == [[1, -2, 3]]
