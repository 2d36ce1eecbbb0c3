"""A stand-in for the gateway's ops API on 127.0.0.1, for CLI tests that need no broker.

It answers each path under `/v1/ops` with a canned JSON document (404 for any other path) and
records the requests it got. It runs in a thread of the test process (stdlib HTTP server).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import urlsplit

from tests.support.http_stub import serving

PREFIX = "/v1/ops"


@dataclass(frozen=True)
class Answer:
    document: Any
    status: int = 200
    delay: float = 0.0
    """Seconds before it is sent (a gateway at work)."""


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    """Under `/v1/ops`, without the query."""
    authorization: str | None


class FakeOpsApi:
    def __init__(self, answers: Mapping[str, Answer]) -> None:
        self._answers = dict(answers)
        self._requests: list[Request] = []
        self._lock = threading.Lock()
        self.url = ""

    @property
    def requests(self) -> list[Request]:
        with self._lock:
            return list(self._requests)

    def _answer(self, request: Request) -> Answer:
        with self._lock:
            self._requests.append(request)
        return self._answers.get(request.path, Answer({"detail": "Not Found"}, 404))

    @contextmanager
    def running(self) -> Iterator[FakeOpsApi]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                path = urlsplit(self.path).path.removeprefix(PREFIX)
                answer = api._answer(Request(self.command, path, self.headers["Authorization"]))
                time.sleep(answer.delay)
                body = json.dumps(answer.document).encode()
                self.send_response(answer.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _reply

            def log_message(self, format: str, *args: Any) -> None:
                pass  # the test's output stays the CLI's

        with serving(Handler, "ops-api") as server:
            self.url = f"http://127.0.0.1:{server.server_address[1]}"
            yield self
