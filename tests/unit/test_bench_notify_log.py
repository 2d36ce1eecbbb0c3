"""The end-to-end benchmark reads the notifier's log as it grows, a line only once complete."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import orjson

from bench.e2e_latency import NotifyLog

AT = datetime(2026, 12, 7, 1, 30, tzinfo=UTC)


def line(event_id: str) -> bytes:
    return orjson.dumps({"event_id": event_id, "delivered_at": AT.isoformat()}) + b"\n"


def test_only_appended_complete_lines_are_read(tmp_path: Path) -> None:
    path = tmp_path / "notifications.jsonl"
    log = NotifyLog(path)
    assert log.read() == {}  # no file yet
    first, second = line("a"), line("b")
    path.write_bytes(first + second[:10])  # the notifier is mid-way through the second line
    assert log.read() == {"a": AT.timestamp()}
    with path.open("ab") as file:
        file.write(second[10:] + line("c"))
    assert log.read() == {"a": AT.timestamp(), "b": AT.timestamp(), "c": AT.timestamp()}
    assert log.read() == {"a": AT.timestamp(), "b": AT.timestamp(), "c": AT.timestamp()}
