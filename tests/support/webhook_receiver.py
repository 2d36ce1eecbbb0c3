"""A real HTTP server on 127.0.0.1 that receives webhooks, for integration and e2e tests.

It runs in threads of the test process (stdlib `ThreadingHTTPServer`, HTTP/1.1 keep-alive), so
async tests, sync e2e tests and service processes can all reach it. It answers each request with
the next scripted reply, then with `default`, and records every request it received.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.support.http_stub import serving


@dataclass(frozen=True)
class Reply:
    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass(frozen=True)
class Received:
    method: str
    path: str
    headers: Mapping[str, str]
    """Lower-cased names."""
    body: bytes
    at: float
    """`time.monotonic()` when the request was complete."""
    peer: tuple[str, int]
    """The client's address and port: the same for requests on one kept-alive connection."""


class WebhookReceiver:
    def __init__(self, replies: Sequence[Reply] = (), default: Reply | None = None) -> None:
        self._replies = list(replies)
        self._default = default or Reply(200, body=b"ok")
        self._received: list[Received] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def port(self) -> int:
        assert self._server is not None, "the receiver is not running"
        return int(self._server.server_address[1])

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @property
    def received(self) -> list[Received]:
        with self._lock:
            return list(self._received)

    def _answer(self, request: Received) -> Reply:
        with self._lock:
            self._received.append(request)
            return self._replies.pop(0) if self._replies else self._default

    @contextmanager
    def running(self) -> Iterator[WebhookReceiver]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 10  # idle keep-alive connections end, and so do their threads

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                headers = {name.lower(): value for name, value in self.headers.items()}
                reply = receiver._answer(
                    Received(
                        self.command,
                        self.path,
                        headers,
                        body,
                        time.monotonic(),
                        (str(self.client_address[0]), int(self.client_address[1])),
                    )
                )
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                self.wfile.write(reply.body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # quiet: assertions look at `received`

        with serving(Handler, "webhook-receiver") as server:
            self._server = server
            yield self
