"""`courier dlq list --all-pages` over a large failure store: one page at a time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.support.http_stub import serving

REPO = Path(__file__).resolve().parents[2]
PAGES, PAGE = 12, 500
ERROR = "webhook answered 503: " + "upstream unavailable " * 40  # a receiver's long answer


def letter(n: int) -> dict[str, Any]:
    return {
        "id": f"letter-{n:06d}",
        "service": "notifier",
        "queue": "courier.notifier",
        "event_id": f"event-{n:06d}",
        "event_type": "notification.requested",
        "reason": "retries_exhausted",
        "attempts": 5,
        "replays": 0,
        "first_failure": "2030-01-01T00:00:00+00:00",
        "last_failure": "2030-01-01T00:00:00+00:00",
        "dead_lettered_at": "2030-01-01T00:00:00+00:00",
        "exception_type": "services.notifier.webhook.WebhookUnavailable",
        "exception_message": f"{ERROR} ({n})",
        "fingerprint": "f" * 32,
        "group_key": "g" * 16,
        "correlation_id": f"event-{n:06d}",
        "status": "dead",
        "closed_at": None,
    }


@contextmanager
def paged_ops_api(pages: int) -> Iterator[str]:
    """The list endpoint over `pages` pages of `PAGE` letters, each cursor the next page."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            query = parse_qs(urlsplit(self.path).query)
            number = int(query.get("cursor", ["0"])[0])
            page = {
                "items": [letter(number * PAGE + i) for i in range(PAGE)],
                "next_cursor": str(number + 1) if number + 1 < pages else None,
            }
            body = json.dumps(page).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    with serving(Handler, "paged-ops-api") as server:
        yield f"http://127.0.0.1:{server.server_address[1]}"


def peak_rss_kib(url: str, output: Path, *args: str) -> int:
    """Run `courier` in a process of its own, its stdout into `output`: its peak resident
    memory, as its parent (a wrapper process) reads it once it ended."""
    env = {**os.environ, "COURIER_URL": url, "COURIER_OPS_TOKEN": "t", "PYTHONPATH": str(REPO)}
    wrapper = (
        "import resource, subprocess, sys;"
        "subprocess.run(sys.argv[2:], stdout=open(sys.argv[1], 'wb'), check=True);"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    command = [sys.executable, "-m", "services.ops.cli", *args]
    done = subprocess.run(
        [sys.executable, "-c", wrapper, str(output), *command],
        env=env,
        capture_output=True,
        check=True,
        timeout=120,
    )
    return int(done.stdout)


@pytest.mark.parametrize("output", [["--json"], []], ids=["json", "table"])
def test_every_page_listed_holds_one_page_at_a_time(output: list[str], tmp_path: Path) -> None:
    # Every page was kept until the end: 50,000 letters took the CLI to 517 MiB with --json
    # (568 MiB for the table), and a larger store would take it out of memory.
    with paged_ops_api(PAGES) as url:
        listing = ["dlq", "list", "--limit", str(PAGE), *output]
        one_page = peak_rss_kib(url, tmp_path / "one", *listing)
        every_page = peak_rss_kib(url, tmp_path / "every", *listing, "--all-pages")
    out = (tmp_path / "every").read_bytes()
    assert every_page - one_page < 16 * 1024, (one_page, every_page)
    if output:
        document = json.loads(out)
        ids = [item["id"] for item in document["items"]]
        assert ids == [f"letter-{n:06d}" for n in range(PAGES * PAGE)]
        assert document["next_cursor"] is None
    else:
        text = out.decode()
        assert "letter-000000" in text and f"letter-{PAGES * PAGE - 1:06d}" in text
