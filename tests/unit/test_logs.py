"""Log lines are JSON objects carrying the service, the event id and the correlation id."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from services.messaging.logs import Throttle, configure_logging, event_context, get_logger


@pytest.fixture(autouse=True)
def _logging_restored() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level


def _lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, object]]:
    return [json.loads(line) for line in capsys.readouterr().err.splitlines()]


def test_a_line_carries_the_service_and_the_ids_of_the_event_at_hand(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("INFO", "processor")  # here: its handler writes to the captured stderr
    with event_context("evt-1", "corr-1"):
        get_logger("consumer").warning("retrying", extra={"attempt": 2})
    [line] = _lines(capsys)
    assert (line["message"], line["level"], line["attempt"]) == ("retrying", "WARNING", 2)
    assert (line["service"], line["event_id"], line["correlation_id"]) == (
        "processor",
        "evt-1",
        "corr-1",
    )


def test_uvicorns_coloured_copy_of_its_message_is_left_out(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("INFO", "gateway")
    logging.getLogger("uvicorn.error").info(
        "Started server process [%d]", 7, extra={"color_message": "\x1b[36m%d\x1b[0m"}
    )
    [line] = _lines(capsys)
    assert line["message"] == "Started server process [7]"
    assert "color_message" not in line


def test_a_throttle_lets_one_line_a_stretch_through_and_counts_the_others() -> None:
    now = [0.0]
    throttle = Throttle(10.0, clock=lambda: now[0])
    assert throttle() == 0
    assert [throttle() for _ in range(5)] == [None] * 5
    now[0] = 10.0
    assert throttle() == 5
    assert throttle() is None
