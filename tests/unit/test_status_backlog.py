"""The status reporter's backlog while the broker is away: bounded, and said once in a while."""

from __future__ import annotations

import logging

import pytest

from services.messaging.publisher import Publisher
from services.messaging.status import StatusReporter
from tests.support.status_broker import StatusBroker


def test_a_full_backlog_drops_the_oldest_and_warns_once_in_a_while(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # One warning per dropped transition buried the logs: thousands of lines a second.
    monkeypatch.setattr("services.messaging.status.MAX_PENDING", 10)
    reporter = StatusReporter("processor", Publisher("amqp://unused"), "events")
    with caplog.at_level(logging.WARNING, logger="courier.status"):
        for n in range(1000):
            reporter.report(f"e{n}", "dataset.submitted", "processing")
    assert reporter.pending == 10
    warnings = [r for r in caplog.records if "backlog full" in r.message]
    assert len(warnings) == 1


async def test_a_refused_report_returns_to_a_full_backlog_dropping_its_oldest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("services.messaging.status.MAX_PENDING", 10)
    reporter: StatusReporter

    def noted_meanwhile() -> None:
        for n in range(10, 16):
            reporter.report(f"e{n}", "dataset.submitted", "processing")

    publisher = StatusBroker(meanwhile=noted_meanwhile)
    reporter = StatusReporter("processor", publisher, "events")
    for n in range(10):
        reporter.report(f"e{n}", "dataset.submitted", "processing")
    await reporter.flush()  # refused
    await reporter.flush()
    # 16 noted, room for 10: the 6 oldest gave way; the newest are reported, in order.
    assert publisher.reported() == [f"e{n}" for n in range(6, 16)]


async def test_refused_reports_are_said_once_in_a_while_and_their_end_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker = StatusBroker(away=True)
    reporter = StatusReporter("processor", broker, "events")
    reporter.report("e-1", "dataset.submitted", "processing")
    with caplog.at_level(logging.INFO, logger="courier.status"):
        for _ in range(20):  # ten seconds of rounds
            assert not await reporter.flush()
        broker.away = False
        assert await reporter.flush()
    said = [r.message for r in caplog.records]
    assert said == ["could not report status; will retry", "status reports go out again"]
    assert caplog.records[-1].refused == 20  # type: ignore[attr-defined]
