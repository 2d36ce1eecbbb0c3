"""Oversized request heads: a request line and headers over `MAX_HEAD_BYTES` are answered `431`
and the connection closed.

uvicorn's httptools protocol sets no bound on a request's head: the parser gathers a header's
value, and uvicorn the request target, for as long as the client sends them, in memory and by
repeated concatenation, while the event loop serves no one else (one 95 MB header took a
gateway 12 s, every other request waiting up to 5 s of it, and its memory grew by its size).
So, as nginx's `large_client_header_buffers` and Kestrel's `MaxRequestHeadersTotalSize` do, the
head is bounded: the bytes that arrive while a request's head is being read are counted, and
past the limit the client gets `431 Request Header Fields Too Large`.

The parser does not say where in a chunk a head begins: a chunk in which a new request begins
(after the previous request's body, say) is not counted, so that a pipelined request is never
refused for its predecessor's body. A head may so grow by at most one read of the transport
(256 KiB under uvloop) past the limit before it is refused.
"""

from __future__ import annotations

from typing import Final

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

MAX_HEAD_BYTES: Final = 64 << 10
"""Bytes of a request line and headers, together (nginx allows 32 KiB, Kestrel 32 KiB)."""


class BoundedHeadProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, refusing a request head over `MAX_HEAD_BYTES` with 431."""

    _in_head = False
    """A request has begun and its headers are not complete yet."""
    _began = False
    """A request began within the chunk being read."""
    _head_bytes = 0

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = self._began = True
        self._head_bytes = 0

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        self._began = False
        super().data_received(data)
        if not self._in_head or self._began or self.transport.is_closing():
            return  # no head being read, or it began within this chunk: see the module's doc
        self._head_bytes += len(data)
        if self._head_bytes > MAX_HEAD_BYTES:
            self._refuse_head()

    def _refuse_head(self) -> None:
        message = f"request line and headers larger than {MAX_HEAD_BYTES} bytes".encode()
        content = [STATUS_LINE[431]]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        content.extend(
            [
                b"content-type: text/plain; charset=utf-8\r\n",
                b"content-length: " + str(len(message)).encode("ascii") + b"\r\n",
                b"connection: close\r\n",
                b"\r\n",
                message,
            ]
        )
        self._in_head = False
        self.transport.write(b"".join(content))
        self.transport.close()
