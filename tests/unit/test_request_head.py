"""The bounded-head protocol fed chunks as a socket's reads would bring them: what counts as a
request head is what arrives while one is being read, never a body that came before it."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from uvicorn.config import Config
from uvicorn.server import ServerState

from services.gateway.request_head import MAX_HEAD_BYTES, BoundedHeadProtocol


class Transport(asyncio.Transport):
    """What the protocol writes, and whether it closed the connection."""

    def __init__(self) -> None:
        super().__init__()
        self.written = b""
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8000)}.get(
            name, default
        )

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += bytes(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Reads the whole body, then answers 200 with its length."""
    size = 0
    while True:
        message = await receive()
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(size).encode()})


async def connection() -> tuple[BoundedHeadProtocol, Transport]:
    config = Config(app, http=BoundedHeadProtocol, lifespan="off", log_config=None)
    config.load()
    protocol = BoundedHeadProtocol(config, ServerState(), app_state={})
    transport = Transport()
    protocol.connection_made(transport)
    return protocol, transport


async def test_a_pipelined_request_is_not_refused_for_the_body_before_it() -> None:
    # The head of the first request came in a read of its own; the next read brought the rest
    # of it, its body and the start of the next request: that whole read was counted as the
    # next request's head, and the client got a 431 in place of the first request's answer
    # (for an event the gateway had published).
    protocol, transport = await connection()
    body = orjson.dumps({"records": ["x" * 100] * 1000})
    assert len(body) > MAX_HEAD_BYTES
    protocol.data_received(b"POST /v1/events HTTP/1.1\r\nHost: x\r\n")
    protocol.data_received(
        f"Content-Length: {len(body)}\r\n\r\n".encode() + body + b"GET /healthz HTTP/1.1\r\n"
    )
    protocol.data_received(b"Host: x\r\n\r\n")
    for _ in range(20):  # the two requests run as tasks
        await asyncio.sleep(0)
    assert not transport.closed, transport.written[:200]
    assert transport.written.count(b"HTTP/1.1 200") == 2, transport.written[:400]


async def test_a_head_that_grows_past_the_limit_over_reads_is_a_431() -> None:
    protocol, transport = await connection()
    protocol.data_received(b"GET /healthz HTTP/1.1\r\nX-Big: ")
    while not transport.closed:
        protocol.data_received(b"a" * 16384)
    assert transport.written.startswith(b"HTTP/1.1 431")
