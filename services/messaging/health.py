"""A tiny HTTP endpoint for a consumer's liveness and readiness probes.

`GET /healthz` answers 200 while the process runs; `GET /readyz` answers 200 only while the
service is ready (for a consumer: consuming, and not holding deliveries for a dependency that
is away), else 503. Runs on the service's own event loop, so a blocked loop fails
the probe too — which is the point.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import orjson

_REASONS = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}


def _response(status: int, body: dict[str, object]) -> bytes:
    payload = orjson.dumps(body)
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(payload)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + payload


async def serve_health(
    host: str, port: int, ready: Callable[[], bool], service: str
) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                request_line = await reader.readline()
                parts = request_line.decode("latin-1").split()
                path = parts[1] if len(parts) >= 2 else ""
                if path == "/healthz":
                    response = _response(200, {"status": "alive", "service": service})
                elif path == "/readyz":
                    is_ready = ready()
                    response = _response(
                        200 if is_ready else 503, {"ready": is_ready, "service": service}
                    )
                else:
                    response = _response(404, {"detail": "not found"})
                writer.write(response)
                await writer.drain()
        except (ConnectionError, TimeoutError, ValueError, asyncio.IncompleteReadError):
            pass  # a broken or oversized probe gets no answer; the connection is closed below
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)
