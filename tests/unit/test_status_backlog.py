"""The status reporter's backlog while the broker is away: bounded, and said once in a while."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from services.messaging.errors import BrokerUnavailable
from services.messaging.publisher import Publisher
from services.messaging.status import StatusReporter


class RefusesOnce(Publisher):
    """The broker refuses the first report, after `meanwhile` ran (while the publish was on its
    way), and takes the later ones: their bodies are kept."""

    def __init__(self, meanwhile: Callable[[], None]) -> None:
        super().__init__("amqp://unused")
        self._meanwhile: Callable[[], None] | None = meanwhile
        self.taken: list[bytes] = []

    async def publish_event(self, *args: Any, body: bytes | None = None, **kwargs: Any) -> None:
        await asyncio.sleep(0)
        if self._meanwhile is not None:
            self._meanwhile()
            self._meanwhile = None
            raise BrokerUnavailable("the broker is away")
        assert body is not None
        self.taken.append(body)


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

    publisher = RefusesOnce(noted_meanwhile)
    reporter = StatusReporter("processor", publisher, "events")
    for n in range(10):
        reporter.report(f"e{n}", "dataset.submitted", "processing")
    await reporter.flush()  # refused
    await reporter.flush()
    # 16 noted, room for 10: the 6 oldest gave way; the newest are reported, in order.
    reported = [
        t["event_id"] for body in publisher.taken for t in orjson.loads(body)["data"]["transitions"]
    ]
    assert reported == [f"e{n}" for n in range(6, 16)]


class Refuses(Publisher):
    """A broker that refuses every report while `away`."""

    def __init__(self) -> None:
        super().__init__("amqp://unused")
        self.away = True

    async def publish_event(self, *args: Any, **kwargs: Any) -> None:
        await asyncio.sleep(0)
        if self.away:
            raise BrokerUnavailable("the broker is away")


async def test_refused_reports_are_said_once_in_a_while_and_their_end_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker = Refuses()
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
