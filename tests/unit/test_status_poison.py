"""A status transition or report that can never go out is said and dropped alone."""

from __future__ import annotations

import logging
from typing import Any

import orjson
import pytest

from services.messaging.errors import Unpublishable
from services.messaging.publisher import Publisher
from services.messaging.status import StatusReporter


class Takes(Publisher):
    """Takes every report (keeps its body), except those it is told cannot be framed."""

    def __init__(self, unframeable: int = 0) -> None:
        super().__init__("amqp://unused")
        self.unframeable = unframeable
        self.taken: list[bytes] = []

    async def publish_event(self, *args: Any, body: bytes | None = None, **kwargs: Any) -> None:
        if self.unframeable:
            self.unframeable -= 1
            raise Unpublishable("the message cannot be framed")
        assert body is not None
        self.taken.append(body)

    def reported(self) -> list[str]:
        return [
            t["event_id"] for body in self.taken for t in orjson.loads(body)["data"]["transitions"]
        ]


async def test_a_transition_that_cannot_be_serialised_does_not_take_its_batch_with_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    publisher = Takes()
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
    publisher = Takes(unframeable=1)
    reporter = StatusReporter("notifier", publisher, "events")
    reporter.report("e1", "notification.requested", "processing")
    with caplog.at_level(logging.ERROR, logger="courier.status"):
        await reporter.flush()
    [said] = [r for r in caplog.records if "cannot be published" in r.message]
    assert said.dropped == 1  # type: ignore[attr-defined]
    reporter.report("e2", "notification.requested", "processing")
    await reporter.flush()
    assert publisher.reported() == ["e2"]  # the next round goes on; the first is not retried
