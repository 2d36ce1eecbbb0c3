"""The status reporter's backlog while the broker is away: bounded, and said once in a while."""

from __future__ import annotations

import logging

import pytest

from services.messaging.publisher import Publisher
from services.messaging.status import StatusReporter


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
