"""A real gateway process against clients that trickle their bodies over raw sockets: a body
behind the minimum rate is answered 408 and its connection closed (an upload's partial copy
removed), on every route; a request answered before its body was read is closed after the
answer; a slow body that keeps the rate is taken, and so is one the gateway itself was too
stalled to read in time."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Namespace
from tests.support.processes import ServiceProcess, gateway, raw_connection, running

pytestmark = [pytest.mark.e2e, pytest.mark.broker]

MIN_RATE = 1000  # bytes a second
GRACE = 1.0  # seconds
ANSWER_WITHIN = 10.0  # seconds: the grace, two sweeps (1 s apart) and a loaded machine


@pytest.fixture
def gateway_process(namespace: Namespace, tmp_path: Path) -> Iterator[ServiceProcess]:
    env = namespace.env(
        COURIER_MIN_BODY_RATE=str(MIN_RATE),
        COURIER_BODY_RATE_GRACE_SECONDS=str(GRACE),
        COURIER_BLOB_DIR=str(tmp_path / "blobs"),
    )
    with running(gateway(env, tmp_path)) as process:
        yield process


def head(path: str, content_type: str, length: int) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def answer_then_closed(client: socket.socket) -> bytes:
    """Everything the gateway sends until it closes the connection."""
    received = b""
    while chunk := client.recv(65536):
        received += chunk
    return received


def test_an_event_body_behind_the_rate_is_a_408_and_the_connection_is_closed(
    gateway_process: ServiceProcess,
) -> None:
    with raw_connection(gateway_process, ANSWER_WITHIN) as client:
        client.sendall(head("/v1/events", "application/json", 500) + b'{"type": "dataset')
        began = time.monotonic()
        answer = answer_then_closed(client)  # closed: recv returned b"" before the timeout
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"too slowly: slower than 1000 bytes a second" in answer
    assert GRACE <= time.monotonic() - began < ANSWER_WITHIN


def test_an_ops_body_behind_the_rate_is_a_408(gateway_process: ServiceProcess) -> None:
    with raw_connection(gateway_process, ANSWER_WITHIN) as client:
        request = head("/v1/ops/replays", "application/json", 500).replace(
            b"\r\n\r\n", b"\r\nAuthorization: Bearer e2e-test-ops-token\r\n\r\n"
        )
        client.sendall(request + b'{"ids"')
        answer = answer_then_closed(client)
    assert answer.startswith(b"HTTP/1.1 408"), answer


def test_an_ops_body_without_a_token_is_not_waited_for(gateway_process: ServiceProcess) -> None:
    # The token is checked before the body is read: a 401 at once, and the connection closed.
    with raw_connection(gateway_process, ANSWER_WITHIN) as client:
        client.sendall(head("/v1/ops/replays", "application/json", 500) + b'{"ids"')
        began = time.monotonic()
        answer = answer_then_closed(client)
    assert answer.startswith(b"HTTP/1.1 401"), answer
    assert b"connection: close" in answer.lower()
    assert time.monotonic() - began < GRACE


def test_a_request_answered_before_its_body_was_read_is_closed_after_the_answer(
    gateway_process: ServiceProcess,
) -> None:
    # uvicorn would read and drop the rest for as long as the client trickled it, every byte
    # restarting its keep-alive timer.
    with raw_connection(gateway_process, ANSWER_WITHIN) as client:
        client.sendall(head("/no-such-route", "application/json", 100_000) + b"{}")
        answer = answer_then_closed(client)
    assert answer.startswith(b"HTTP/1.1 404"), answer
    assert b"connection: close" in answer.lower()


def test_an_upload_behind_the_rate_is_a_408_that_keeps_no_copy(
    gateway_process: ServiceProcess, tmp_path: Path
) -> None:
    boundary = "slow-boundary"
    start = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="p.csv"\r\n'
        "Content-Type: text/csv\r\n\r\nsku,price\n"
    ).encode()
    content_type = f"multipart/form-data; boundary={boundary}"
    with raw_connection(gateway_process, ANSWER_WITHIN) as client:
        client.sendall(head("/v1/files", content_type, 1_000_000) + start)
        answer = answer_then_closed(client)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    blobs = tmp_path / "blobs"
    assert not blobs.exists() or [p for p in blobs.rglob("*") if p.is_file()] == []


def test_a_slow_body_that_keeps_the_rate_is_taken(gateway_process: ServiceProcess) -> None:
    records = ", ".join(f'{{"sku": "item-{n}", "price": {n}}}' for n in range(250))
    body = f'{{"type": "dataset.submitted", "data": {{"records": [{records}]}}}}'.encode()
    began = time.monotonic()
    with raw_connection(gateway_process, ANSWER_WITHIN) as client:
        client.sendall(head("/v1/events", "application/json", len(body)))
        for at in range(0, len(body), 300):  # 3 KB a second: three times the minimum
            client.sendall(body[at : at + 300])
            time.sleep(0.1)
        answer = client.recv(65536)
    assert answer.startswith(b"HTTP/1.1 202"), answer
    assert time.monotonic() - began > GRACE  # the rate counted


def test_a_body_that_arrived_while_the_gateway_stood_still_is_taken(
    gateway_process: ServiceProcess,
) -> None:
    # After a pause of the whole process (a long GC pause, an overloaded host), the first
    # sweep runs before the gateway has read what arrived meanwhile.
    body = b'{"type": "dataset.submitted", "data": {"records": [{"price": 10}]}}'
    assert gateway_process.process is not None
    pid = gateway_process.process.pid
    with raw_connection(gateway_process, ANSWER_WITHIN) as client:
        client.sendall(head("/v1/events", "application/json", len(body)) + body[:10])
        time.sleep(0.3)
        os.kill(pid, signal.SIGSTOP)
        try:
            client.sendall(body[10:])
            time.sleep(GRACE + 3 * 1.0)
        finally:
            os.kill(pid, signal.SIGCONT)
        answer = client.recv(65536)
    assert answer.startswith(b"HTTP/1.1 202"), answer
