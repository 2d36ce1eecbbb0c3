"""How often a status reporter looks for owed outcomes, and a ledger that fails a round."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from services.messaging.status import Outcome, StatusReporter
from tests.support.status_broker import StatusBroker


class Ledger:
    """Owes `owed` for ever; counts the looks, and fails them while `failing`, and the noting
    of reports while `refusing`."""

    def __init__(
        self, failing: bool = False, refusing: bool = False, owed: list[Outcome] | None = None
    ) -> None:
        self.looks = 0
        self.failing = failing
        self.refusing = refusing
        self.owed = owed or []

    async def reported(self, transitions: Iterable[Mapping[str, Any]]) -> None:
        if self.refusing:
            raise OSError("disk full")

    async def unreported(self, settled_before: datetime | None, limit: int) -> list[Outcome]:
        self.looks += 1
        if self.failing:
            raise OSError("the store is away")
        return self.owed


async def run_for(reporter: StatusReporter, seconds: float) -> None:
    reporter.start()
    await asyncio.sleep(seconds)
    await reporter.close()


async def test_an_idle_reporter_looks_for_owed_outcomes_a_few_times_per_age_not_each_round() -> (
    None
):
    ledger = Ledger()
    # Some 35 rounds of 10 ms; an age of 0.4 s: a look every 0.1 s, not one each round.
    reporter = StatusReporter(
        "processor", StatusBroker(), "x", interval=0.01, ledger=ledger, recover_after=0.4
    )
    await run_for(reporter, 0.35)
    assert 1 <= ledger.looks <= 4, ledger.looks


async def test_a_look_the_store_fails_leaves_reporting_running() -> None:
    ledger, broker = Ledger(failing=True), StatusBroker()
    reporter = StatusReporter(
        "processor", broker, "x", interval=0.01, ledger=ledger, recover_after=0.04
    )
    reporter.start()
    await asyncio.sleep(0.1)
    reporter.report("e-1", "dataset.submitted", "succeeded", attempt=1)
    await asyncio.sleep(0.1)
    await reporter.close()
    assert ledger.looks >= 2  # it looked again after the failure
    assert broker.reports == 1  # and the transition went out meanwhile


async def test_while_the_store_does_not_note_reports_the_owed_are_not_told_each_round() -> None:
    """A store that reads but cannot write (a full disk): each telling stays owed. A start
    catching up on a thousand owed outcomes (a round each while the store notes them) pauses
    for a quarter of the recovery age after each failed noting."""
    at = datetime.now(UTC)
    owed = [Outcome(f"e-{i}", "dataset.submitted", "succeeded", at, 1) for i in range(1000)]
    ledger, broker = Ledger(refusing=True, owed=owed), StatusBroker()
    reporter = StatusReporter(
        "processor", broker, "x", interval=0.01, ledger=ledger, recover_after=0.4
    )
    assert await reporter.recover() == 1000  # catching up
    await run_for(reporter, 0.3)  # some 30 rounds
    assert broker.reports <= 4, broker.reports


class SlowLedger(Ledger):
    """A look that takes a while (a store reading a thousand rows under load)."""

    async def unreported(self, settled_before: datetime | None, limit: int) -> list[Outcome]:
        await asyncio.sleep(0.05)
        return await super().unreported(settled_before, limit)


async def test_a_look_begun_while_another_reads_the_ledger_notes_nothing_again() -> None:
    """Two looks at once would both read the same owed outcomes: each told twice."""
    at = datetime.now(UTC)
    owed = [Outcome(f"e-{i}", "dataset.submitted", "succeeded", at, 1) for i in range(3)]
    reporter = StatusReporter("processor", StatusBroker(), "x", ledger=SlowLedger(owed=owed))

    counts = await asyncio.gather(reporter.recover(), reporter.recover())

    assert sorted(counts) == [0, 3]
    assert reporter.pending == 3
