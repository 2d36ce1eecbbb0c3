"""A status transition or report that can never go out is said and dropped alone."""

from __future__ import annotations

import logging

import pytest

from services.messaging.status import StatusReporter
from tests.support.status_broker import StatusBroker


async def test_a_transition_that_cannot_be_serialised_does_not_take_its_batch_with_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    publisher = StatusBroker()
    reporter = StatusReporter("notifier", publisher, "events")
    reporter.report("e1", "notification.requested", "processing")
    reporter.report("e2", "notification.requested", "retrying", detail="h\udce9te")  # a bug
    reporter.report("e3", "notification.requested", "processing")
    with caplog.at_level(logging.ERROR, logger="courier.status"):
        assert await reporter.flush()
    assert publisher.reported() == ["e1", "e3"]
    [said] = [r for r in caplog.records if "cannot be serialised" in r.message]
    assert said.event_id == "e2"  # type: ignore[attr-defined]


async def test_a_report_that_cannot_be_framed_is_said_and_not_sent_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    publisher = StatusBroker(unframeable=1)
    reporter = StatusReporter("notifier", publisher, "events")
    reporter.report("e1", "notification.requested", "processing")
    with caplog.at_level(logging.ERROR, logger="courier.status"):
        await reporter.flush()
    [said] = [r for r in caplog.records if "cannot be published" in r.message]
    assert said.dropped == 1  # type: ignore[attr-defined]
    reporter.report("e2", "notification.requested", "processing")
    await reporter.flush()
    assert publisher.reported() == ["e2"]  # the next round goes on; the first is not retried
