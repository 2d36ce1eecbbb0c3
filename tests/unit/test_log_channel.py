"""The log channel's file: one whole JSON line per notification, even when a write fails."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import orjson

from contracts.events import NotificationRequested, NotificationRequestedData
from services.notifier.channels import LogChannel, Notification

# A child process whose files may not grow past a limit (RLIMIT_FSIZE): writes beyond it fail
# with EFBIG, as on a full disk, after a write that took part of the buffer.
APPEND_UNDER_A_LIMIT = """
import resource, signal, sys
from pathlib import Path
from services.notifier.channels import LogChannel
path = Path(sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (path.stat().st_size + 10, resource.RLIM_INFINITY))
try:
    LogChannel(path)._append([b'{"event_id": "b"}\\n', b'{"event_id": "c"}\\n'])
except OSError as exc:
    print(exc.errno)
"""


def test_a_batch_that_fails_midway_leaves_no_part_of_itself(tmp_path: Path) -> None:
    # It left a fragment: the retry's first line was glued to it, its other lines there twice.
    path = tmp_path / "notifications.jsonl"
    path.write_bytes(b'{"event_id": "a"}\n')
    child = subprocess.run(
        [sys.executable, "-c", APPEND_UNDER_A_LIMIT, str(path)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[2],
    )
    assert child.stdout.strip() == "27"  # EFBIG: the batch failed
    assert path.read_bytes() == b'{"event_id": "a"}\n'


def notification(subject: str) -> Notification:
    event = NotificationRequested(data=NotificationRequestedData(recipient="ops", subject=subject))
    return Notification(event.id, event.id, "log", "ops", subject, "", event)


def test_a_line_a_crash_left_unfinished_is_dropped_at_start(tmp_path: Path) -> None:
    # Killed in the middle of its write, the notifier left part of a batch; the next start's
    # first line (the same notification, delivered again) was glued to it: unreadable.
    path = tmp_path / "notifications.jsonl"
    whole = b'{"event_id": "a"}\n' * 3
    path.write_bytes(whole + b'{"event_id": "b", "subj' + b"x" * 100_000)
    after = notification("after")
    asyncio.run(LogChannel(path).deliver(after))
    lines = path.read_bytes().splitlines()
    assert path.read_bytes().startswith(whole) and len(lines) == 4
    assert orjson.loads(lines[-1])["event_id"] == after.event_id


def test_a_file_of_whole_lines_is_kept_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "notifications.jsonl"
    path.write_bytes(b'{"event_id": "a"}\n')
    LogChannel(path)
    assert path.read_bytes() == b'{"event_id": "a"}\n'
