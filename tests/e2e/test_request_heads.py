"""A real gateway process against clients that send oversized request heads over raw sockets:
a request line and headers over 64 KiB are answered 431 and the connection closed, before the
gateway holds or parses more of them; a request whose body arrives in the same packets as its
head is not mistaken for one."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from services.gateway.request_head import MAX_HEAD_BYTES
from tests.conftest import Namespace
from tests.support.processes import ServiceProcess, base_url, gateway, raw_connection, running

pytestmark = [pytest.mark.e2e, pytest.mark.broker]

ANSWER_WITHIN = 10.0  # seconds
SENT_AT_MOST = 64 << 20
"""What a client tries to send in its head: the gateway must answer long before."""


@pytest.fixture
def gateway_process(namespace: Namespace, tmp_path: Path) -> Iterator[ServiceProcess]:
    with running(
        gateway(namespace.env(COURIER_BLOB_DIR=str(tmp_path / "blobs")), tmp_path)
    ) as process:
        yield process


def send_until_answered(client: socket.socket, start: bytes, filler: bytes) -> tuple[bytes, int]:
    """Send `start`, then `filler` over and over (at most SENT_AT_MOST bytes), until the gateway
    answers and closes; what it sent, and how many bytes went out."""
    client.sendall(start)
    sent = len(start)
    try:
        while sent < SENT_AT_MOST:
            client.sendall(filler)
            sent += len(filler)
    except (BrokenPipeError, ConnectionResetError, TimeoutError):
        pass  # refused, or the gateway stopped reading (too busy with the head to answer)
    received = b""
    try:
        while chunk := client.recv(65536):
            received += chunk
    except (ConnectionResetError, TimeoutError):
        pass  # the answer was read before the reset, if it came
    return received, sent


@pytest.mark.parametrize(
    ("where", "start", "filler"),
    [
        ("one header", b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ", b"a" * 65536),
        ("the target", b"GET /healthz?", b"a" * 65536),
        ("many headers", b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n", b"X-A: b\r\n" * 8192),
    ],
)
def test_a_request_head_over_the_limit_is_a_431_and_the_connection_is_closed(
    gateway_process: ServiceProcess, where: str, start: bytes, filler: bytes
) -> None:
    began = time.monotonic()
    with raw_connection(gateway_process, ANSWER_WITHIN) as client:
        answer, sent = send_until_answered(client, start, filler)
    assert answer.startswith(b"HTTP/1.1 431"), (where, answer[:200])
    assert b"connection: close" in answer.lower()
    assert sent < SENT_AT_MOST, f"{where}: the gateway kept taking the head ({sent} bytes)"
    assert time.monotonic() - began < ANSWER_WITHIN
    # And it serves the next client.
    assert httpx.get(f"{base_url(gateway_process)}/healthz", timeout=5).status_code == 200


def test_a_body_sent_with_its_head_in_one_write_is_not_counted_as_head(
    gateway_process: ServiceProcess,
) -> None:
    records = [{"value": n, "label": "x" * 40} for n in range(10_000)]  # ~550 KB
    body = orjson.dumps({"type": "dataset.submitted", "data": {"records": records}})
    assert MAX_HEAD_BYTES * 4 < len(body) < 1 << 20
    head = (
        "POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    with raw_connection(gateway_process, ANSWER_WITHIN) as client:
        client.sendall(head + body)
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 202"), answer[:300]
