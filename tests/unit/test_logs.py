"""Log lines are JSON objects carrying the service, the event id and the correlation id."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import aiosqlite
import pytest
from aio_pika.tools import OneShotCallback

from services.messaging.logs import Throttle, configure_logging, event_context, get_logger


@pytest.fixture(autouse=True)
def _logging_restored(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # restored after the test
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    yield
    root.handlers[:], root.level = handlers, level
    logging.captureWarnings(False)


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


def _stderr_of(code: str) -> tuple[int, list[str]]:
    ran = subprocess.run(  # this interpreter, a fixed program
        [sys.executable, "-c", code],
        cwd=Path(__file__).parents[2],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ran.stdout == ""
    return ran.returncode, ran.stderr.splitlines()


def test_a_crash_a_thread_s_crash_and_a_library_s_warning_are_json_lines_too() -> None:
    """A service that dies of an exception nobody caught (a notifier whose log file cannot be
    created) printed Python's plain-text traceback among its JSON lines, as did a thread's
    uncaught exception and every `warnings.warn` of a library."""
    code, lines = _stderr_of(
        "import threading, warnings\n"
        "from services.messaging.logs import configure_logging\n"
        "configure_logging('INFO', 'notifier')\n"
        "warnings.warn('deprecated thing', DeprecationWarning, stacklevel=1)\n"
        "worker = threading.Thread(target=lambda: 1 / 0)\n"
        "worker.start(); worker.join()\n"
        "raise FileExistsError('data/notifications.jsonl')\n"
    )
    assert code == 1
    logged = [json.loads(line) for line in lines]  # every line is one JSON object
    assert [(line["level"], line["service"]) for line in logged] == [
        ("WARNING", "notifier"),
        ("CRITICAL", "notifier"),
        ("CRITICAL", "notifier"),
    ]
    assert "deprecated thing" in str(logged[0]["message"])
    assert "ZeroDivisionError" in str(logged[1]["exc_info"])
    assert "FileExistsError: data/notifications.jsonl" in str(logged[2]["exc_info"])


async def test_the_sqlite_driver_logs_no_statement_with_its_values_at_debug(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """aiosqlite logs every operation at DEBUG with its statement and values: a gateway at
    `COURIER_LOG_LEVEL=DEBUG` wrote ~2,000 such lines in 8 idle seconds, burying its own, and
    among them the `notify` targets and callback URL of an upload, tokens included."""
    configure_logging("DEBUG", "gateway")
    async with aiosqlite.connect(":memory:") as db:
        await db.execute("CREATE TABLE t (url TEXT)")
        await db.execute("INSERT INTO t VALUES (?)", ("https://hooks.example.com/?token=s3cret",))
    get_logger("consumer").debug("handled")
    assert [line["message"] for line in _lines(capsys)] == ["handled"]


async def test_the_amqp_clients_lines_on_other_failures_than_a_lost_connection_are_kept(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The service says a lost connection in its own line, and the AMQP client's lines about
    it are left out (see `test_connection`); not its lines about anything else: a frame it
    could not read, a callback that failed otherwise."""
    configure_logging("INFO", "processor")

    async def on_message() -> None: ...

    logging.getLogger("aiormq.connection").warning(
        "Cancelling cause reader exited abnormally", exc_info=ValueError("malformed frame")
    )
    logging.getLogger("aio_pika.tools").error(
        "Callback %r error: %s: %s", OneShotCallback(on_message), "KeyError", KeyError("x")
    )
    lines = _lines(capsys)
    assert [(line["logger"], line["level"]) for line in lines] == [
        ("aiormq.connection", "WARNING"),
        ("aio_pika.tools", "ERROR"),
    ]
    assert "malformed frame" in str(lines[0]["exc_info"])
