"""A small asyncio TCP proxy for cutting a client's connection to the broker in tests.

Modes (switchable at any time with :meth:`TcpProxy.set_mode`):

``pass``
    Bytes flow both ways; a close on one side is passed on to the other.
``blackhole``
    Connections stay open but every byte is dropped, both ways, on existing and new connections
    (new ones are accepted and not connected upstream). Closes are not passed on either: the other
    side only finds out through its own heartbeats (aio-pika with ``heartbeat=2``: about 9 s).
    Dropped bytes are lost for good, so a connection that lived through a blackhole is corrupt;
    a link whose other side went away meanwhile is closed when the mode returns to ``pass``.
``refuse``
    New connections are reset at once; existing connections are left alone.

:meth:`TcpProxy.reset_all` aborts every open connection with a TCP RST (``SO_LINGER`` 0).

:class:`TcpProxy` lives on the running event loop. :class:`ThreadedTcpProxy` runs one on its own
loop in a daemon thread, for synchronous tests or a proxy that serves a subprocess.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import socket
import struct
import threading
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, ParamSpec, Self, TypeVar

__all__ = ["ProxyMode", "TcpProxy", "ThreadedTcpProxy"]

log = logging.getLogger("tests.support.tcp_proxy")

_T = TypeVar("_T")
_P = ParamSpec("_P")
_RST_LINGER = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


class ProxyMode(enum.StrEnum):
    PASS = "pass"
    BLACKHOLE = "blackhole"
    REFUSE = "refuse"


def _abort_with_rst(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST_LINGER)
    if isinstance(transport, asyncio.Transport):
        transport.abort()
    else:  # pragma: no cover - the proxy only holds stream transports
        transport.close()


class _Side(asyncio.Protocol):
    """One end of a proxied connection: the client's socket or the upstream socket."""

    def __init__(self, link: _Link) -> None:
        self.link = link
        self.transport: asyncio.Transport | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.link.forward(self, data)

    def eof_received(self) -> bool:
        return self.link.eof_from(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.link.lost(self)

    def pause_writing(self) -> None:  # our outgoing buffer is full: stop reading the other side
        other = self.link.other(self)
        if other is not None and other.transport is not None and not other.lost:
            other.transport.pause_reading()

    def resume_writing(self) -> None:
        other = self.link.other(self)
        if other is not None and other.transport is not None and not other.lost:
            other.transport.resume_reading()


class _Link:
    """A client connection paired with its upstream connection (``None`` until/unless made)."""

    def __init__(self, proxy: TcpProxy) -> None:
        self.proxy = proxy
        self.client: _Side  # set by _ClientSide
        self.upstream: _Side | None = None
        self.pending: list[bytes] = []  # client bytes received before upstream was connected
        self.pending_eof = False  # the client shut down its side before upstream was connected
        self.severed = False  # one side went away while blackholed
        self.closed = False

    def other(self, side: _Side) -> _Side | None:
        return self.upstream if side is self.client else self.client

    def forward(self, side: _Side, data: bytes) -> None:
        if self.proxy.mode is not ProxyMode.PASS or self.severed:
            return  # blackholed (or the other side is gone): drop
        target = self.other(side)
        if target is None:  # upstream still connecting
            self.pending.append(data)
            return
        if target.transport is not None and not target.lost:
            target.transport.write(data)

    def eof_from(self, side: _Side) -> bool:
        if self.proxy.mode is ProxyMode.PASS and not self.severed:
            target = self.other(side)
            if target is None:  # upstream still connecting
                self.pending_eof = True
            elif target.transport is not None and not target.lost:
                if target.transport.can_write_eof():
                    target.transport.write_eof()
                else:  # pragma: no cover - TCP transports can write EOF
                    target.transport.close()
        return True  # keep our side half-open; the peer closes when it is done

    def lost(self, side: _Side) -> None:
        if self.proxy.mode is ProxyMode.BLACKHOLE and not self.closed:
            # A blackhole hides closes: keep the other side open, data stays dropped.
            self.severed = True
            if self.client.lost and (self.upstream is None or self.upstream.lost):
                self._forget()
            return
        self.close()

    def close(self, *, rst: bool = False) -> None:
        """Close both sides (gracefully, or with RST)."""
        if self.closed:
            return
        self.closed = True
        for side in (self.client, self.upstream):
            if side is None or side.transport is None or side.lost:
                continue
            if rst:
                _abort_with_rst(side.transport)
            else:
                side.transport.close()
        self._forget()

    def _forget(self) -> None:
        self.closed = True
        self.proxy._links.discard(self)


class TcpProxy:
    """An asyncio TCP proxy from ``127.0.0.1:<port>`` to ``target_host:target_port``."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        connect_timeout: float = 5.0,
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.listen_host = listen_host
        self._listen_port = listen_port
        self.connect_timeout = connect_timeout
        self._mode = ProxyMode.PASS
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._connecting: set[asyncio.Task[None]] = set()
        self.accepted = 0  # connections accepted so far (refused ones included)

    @property
    def mode(self) -> ProxyMode:
        return self._mode

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("proxy not started")
        return self._listen_port

    @property
    def open_connections(self) -> int:
        return len(self._links)

    async def start(self) -> int:
        """Start listening; return the port on ``listen_host``."""
        if self._server is not None:
            raise RuntimeError("proxy already started")
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._accept, self.listen_host, self._listen_port, reuse_address=True
        )
        self._listen_port = self._server.sockets[0].getsockname()[1]
        log.debug(
            "proxy 127.0.0.1:%d -> %s:%d", self._listen_port, self.target_host, self.target_port
        )
        return self._listen_port

    def set_mode(self, mode: ProxyMode | str) -> None:
        """Switch mode. Returning to ``pass`` closes links that lost a side while blackholed."""
        self._mode = ProxyMode(mode)
        log.debug("proxy :%s mode %s", self._listen_port, self._mode)
        if self._mode is ProxyMode.PASS:
            for link in [link for link in self._links if link.severed]:
                link.close()

    def reset_all(self) -> int:
        """Abort every open connection (both sides) with a TCP RST; return how many."""
        links = list(self._links)
        for task in list(self._connecting):
            task.cancel()
        for link in links:
            link.close(rst=True)
        log.debug("proxy :%s reset %d connection(s)", self._listen_port, len(links))
        return len(links)

    async def stop(self) -> None:
        """Stop listening and reset every connection."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        self.reset_all()
        if self._connecting:
            await asyncio.gather(*self._connecting, return_exceptions=True)
        if server is not None:
            await server.wait_closed()
        await asyncio.sleep(0)  # let the transports run their connection_lost callbacks

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -------------------------------------------------------------- internals

    def _accept(self) -> asyncio.Protocol:
        self.accepted += 1
        link = _Link(self)
        self._links.add(link)
        return _ClientSide(link)

    def _connect_upstream(self, link: _Link) -> None:
        task = asyncio.get_running_loop().create_task(self._open_upstream(link))
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)

    async def _open_upstream(self, link: _Link) -> None:
        loop = asyncio.get_running_loop()
        upstream = _Side(link)
        try:
            async with asyncio.timeout(self.connect_timeout):
                await loop.create_connection(lambda: upstream, self.target_host, self.target_port)
        except (OSError, TimeoutError) as exc:
            log.debug("proxy :%s upstream connect failed: %s", self._listen_port, exc)
            link.close(rst=True)
            return
        except asyncio.CancelledError:
            link.close(rst=True)
            if upstream.transport is not None:
                upstream.transport.abort()
            raise
        if link.closed or link.client.lost:
            if upstream.transport is not None:
                upstream.transport.close()
            link.close()
            return
        link.upstream = upstream
        pending, link.pending = link.pending, []
        if upstream.transport is not None and self._mode is ProxyMode.PASS:
            for chunk in pending:
                upstream.transport.write(chunk)
            if link.pending_eof:
                upstream.transport.write_eof()


class _ClientSide(_Side):
    def __init__(self, link: _Link) -> None:
        super().__init__(link)
        link.client = self

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        proxy = self.link.proxy
        if proxy.mode is ProxyMode.REFUSE:
            self.link.close(rst=True)
        elif proxy.mode is ProxyMode.BLACKHOLE:
            # Never connected upstream: bytes are dropped until reset_all, or until the mode
            # returns to pass, which closes it.
            self.link.severed = True
        else:
            proxy._connect_upstream(self.link)


class ThreadedTcpProxy:
    """A :class:`TcpProxy` running on its own event loop in a daemon thread.

    Every method blocks until the proxy's loop has done the work (or ``timeout`` passes).
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        timeout: float = 10.0,
    ) -> None:
        self.proxy = TcpProxy(
            target_host, target_port, listen_host=listen_host, listen_port=listen_port
        )
        self.timeout = timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.proxy.port

    @property
    def mode(self) -> ProxyMode:
        return self.proxy.mode

    def start(self) -> int:
        if self._thread is not None:
            raise RuntimeError("proxy already started")
        loop = asyncio.new_event_loop()
        thread = threading.Thread(
            target=loop.run_forever, name=f"tcp-proxy->{self.proxy.target_port}", daemon=True
        )
        self._loop, self._thread = loop, thread
        thread.start()
        try:
            return self._call(self.proxy.start())
        except BaseException:
            self._shutdown_loop()
            raise

    def set_mode(self, mode: ProxyMode | str) -> None:
        self._call(self._in_loop(self.proxy.set_mode, ProxyMode(mode)))

    def reset_all(self) -> int:
        return self._call(self._in_loop(self.proxy.reset_all))

    def stop(self) -> None:
        if self._loop is None:
            return
        try:
            self._call(self.proxy.stop())
        finally:
            self._shutdown_loop()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @staticmethod
    async def _in_loop(func: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        return func(*args, **kwargs)

    def _call(self, coro: Coroutine[Any, Any, _T]) -> _T:
        if self._loop is None:
            coro.close()
            raise RuntimeError("proxy not started")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout=self.timeout)

    def _shutdown_loop(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(timeout=self.timeout)
        if not loop.is_running():
            loop.close()
