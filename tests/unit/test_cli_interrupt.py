"""Ctrl-C in the CLI: exit code 130, and with `--json` one JSON document on stdout, whatever
the command was waiting for."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@contextmanager
def stalling_gateway() -> Iterator[tuple[str, threading.Event]]:
    """An ops API that takes every request and never answers (a slow store, say)."""
    arrived, release = threading.Event(), threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            arrived.set()
            release.wait(30)

        do_POST = do_GET

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", arrived
    finally:
        release.set()
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    "command",
    [
        ["dlq", "list", "--json"],
        ["dlq", "groups", "--json"],
        ["dlq", "replay", "--reason", "invalid", "--json"],  # while it counts its selection
        ["dlq", "replay", "--id", "x", "--dry-run", "--json"],
    ],
)
def test_ctrl_c_exits_130_with_one_json_document(command: list[str]) -> None:
    # Only a replay's or discard's batch request handled it: anywhere else click said
    # "Aborted!" and exited 1, which a script reads as an HTTP error, with no JSON.
    with stalling_gateway() as (url, arrived):
        process = subprocess.Popen(
            [sys.executable, "-m", "services.ops.cli", *command],
            env={**os.environ, "COURIER_URL": url, "COURIER_OPS_TOKEN": "t"},
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            # As from a terminal: a suite started in the background has SIGINT ignored, and
            # Python keeps an ignored SIGINT ignored.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        assert arrived.wait(20), "the CLI never called the gateway"
        time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=20)
    assert process.returncode == 130, (out, err)
    assert json.loads(out)["error"]["exit_code"] == 130
