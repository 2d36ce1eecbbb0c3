"""The notifier's `log` channel as the tests read it: one JSON line per notification."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson


def notification_lines(path: Path) -> list[dict[str, Any]]:
    """The notifications in the log so far.

    Asserted, not parsed blindly: the notifier may be appending a line as it is read, and its
    fragment's JSONDecodeError would fail a check at once (`eventually` retries an
    AssertionError only). Lines are whole once the file ends with a newline.
    """
    if not path.exists():
        return []
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), "a notification line is still being written"
    return [orjson.loads(line) for line in data.splitlines()]
