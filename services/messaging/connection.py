"""How Courier opens a connection to the broker: robust (aio-pika reconnects it and restores
its channels), with a heartbeat, named, so the management UI tells the connections apart, and
over every node of a cluster (`AMQP_URL` may list several), so losing a node is a reconnect,
not an outage."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from aio_pika import RobustConnection
from aio_pika.abc import AbstractRobustConnection
from aio_pika.connection import make_url
from aiormq.exceptions import AMQPConnectionError
from yarl import URL

log = logging.getLogger("courier.connection")

# How long a connect cut short may go on before it is cut: a broker that answers ends the
# handshake in milliseconds; one that does not is cut where cutting leaks nothing.
SETTLE_SECONDS = 5.0
CONNECT_TIMEOUT = 30.0
"""How long a connect may take, the first (but see `NEXT_NODE_AFTER`) and each reconnect. A
broker that accepts the TCP connection but never starts the handshake (one out of file
handles, say) would otherwise hold it for ever, the service unready and saying nothing."""
NEXT_NODE_AFTER = 5.0
"""How long a connection's first connect (each `open_connection`) waits for a node while
other nodes are left to try: a node whose host is down often drops the connect rather than
refusing it. The last node tried, and every reconnect, gets the whole `CONNECT_TIMEOUT` (a
slow node that is the only one left is not cut short)."""


def broker_urls(value: str) -> list[str]:
    """The URLs `AMQP_URL` holds: one broker's, or a cluster's nodes' separated by commas (a
    comma in a password is written `%2C`, as any reserved character in a URL)."""
    return [part.strip() for part in value.split(",") if part.strip()]


def where(url: URL) -> str:
    """A node as logs may name it: host and port, never the credentials. (yarl knows no
    default port for amqp; aiormq's are these.)"""
    return f"{url.host}:{url.port or (5671 if url.scheme == 'amqps' else 5672)}"


if not hasattr(RobustConnection, "_RobustConnection__connect_transport"):  # pragma: no cover
    # Refused at start rather than found out at the first lost node (reconnects would stay on
    # it): `FailoverConnection` overrides this private step.
    raise ImportError("this aio-pika has no RobustConnection.__connect_transport to fail over")

_answered: dict[tuple[URL, ...], int] = {}
"""Per list of nodes, the one a connection of this process last reached: where the next
connection starts. A node that takes connections but never answers costs a whole connect
timeout (30 s) before the next is tried; paid once, not by each of a service's connections."""


class FailoverConnection(RobustConnection):
    """aio-pika's robust connection, which retries the one URL it was given, over several:
    each reconnect attempt goes to the next node, round the list. A node that crashed is not
    retried while the others may serve; it comes round again once each of them was tried. A
    cluster's nodes share its queues, so any node will do; channels and consumers are
    restored there as on the same node. aio-pika's own URL options (`reconnect_interval`,
    `fail_fast` and the like), read once for the whole connection, come from the first URL
    listed; the client's (heartbeat, TLS) from the URL of the node each attempt goes to."""

    def __init__(
        self, urls: Sequence[URL], first: int, *, name: str, reconnect_within: float, **kwargs: Any
    ) -> None:
        self.name = name
        self._urls = tuple(urls)
        self._node = first
        self._attempted = False
        self._reconnect_within = reconnect_within
        self._lost_at: float | None = None  # since when the connection is down, if it is
        # Not `first`'s URL: the options would then depend on which node answered at start.
        super().__init__(self._urls[0], client_properties={"connection_name": name}, **kwargs)
        self.url = self._urls[first]

    async def _RobustConnection__connect_transport(self) -> None:
        # aio-pika's private step that makes one connect attempt (`self.url` is where it
        # goes); every attempt, the first and each reconnect, passes here. A test fails if
        # an upgrade renames it: reconnects would then stay on the node they lost.
        if self._attempted:
            # `connect` set its timeout for every attempt, and the first one's may have been
            # `NEXT_NODE_AFTER`: a reconnect waits the whole time for a slow node.
            self._RobustConnection__connect_timeout = self._reconnect_within
            if len(self._urls) > 1:
                lost = self.url
                self._node = (self._node + 1) % len(self._urls)
                self.url = self._urls[self._node]
                log.warning(
                    "reconnecting to the next broker node",
                    extra={"node_from": where(lost), "node_to": where(self.url)},
                )
        self._attempted = True
        await super()._RobustConnection__connect_transport()  # type: ignore[misc]
        _answered[self._urls] = self._node
        if self._lost_at is not None:  # connected, its channels and consumers restored
            log.info(
                "broker connection restored",
                extra={
                    "connection": self.name,
                    "node": where(self.url),
                    "after_seconds": round(time.monotonic() - self._lost_at, 3),
                },
            )
            self._lost_at = None

    async def _on_connection_close(self, closing: asyncio.Future[Any]) -> None:
        await super()._on_connection_close(closing)
        # Said once an outage, by the service, rather than by the AMQP client's lines (see
        # `logs.ReconnectNoise`); a close the service asked for is no loss.
        if self._close_called or self.is_closed or self._lost_at is not None:
            return
        self._lost_at = time.monotonic()
        log.warning(
            "broker connection lost",
            extra={"connection": self.name, "node": where(self.url), "reason": _why(closing)},
        )


def _why(closing: asyncio.Future[Any]) -> str:
    """Why a connection closed, as the client tells it (`Server connection reset:
    ConnectionResetError(...)`, the broker's close reason, a missed heartbeat)."""
    if closing.cancelled():
        return "closed"
    exc = closing.exception()
    return f"{type(exc).__name__}: {exc}" if exc is not None else "closed"


async def open_connection(
    url: str, *, heartbeat: int, name: str, answer_within: float = CONNECT_TIMEOUT
) -> AbstractRobustConnection:
    """A robust connection to the first of `url`'s nodes (see `broker_urls`) that answers,
    from the one this process last reached, reconnecting to the next when it is lost; raises
    what the last node's connect raised when none does (`ConnectionError` for one that does
    not answer within `answer_within` seconds), which callers retry as any refused connect."""
    urls = tuple(make_url(one, heartbeat=heartbeat) for one in broker_urls(url))
    if not urls:
        raise ValueError("no broker URL given")
    start = _answered.get(urls, 0)
    for tried in range(len(urls)):
        node = (start + tried) % len(urls)
        last = tried == len(urls) - 1
        connection = FailoverConnection(urls, node, name=name, reconnect_within=answer_within)
        try:
            return await _connect(
                connection, answer_within if last else min(answer_within, NEXT_NODE_AFTER)
            )
        except (AMQPConnectionError, ConnectionError, OSError) as exc:  # refused, silent, ...
            if last:
                raise
            log.warning(
                "broker node not reachable; trying the next",
                extra={"node": where(urls[node]), "error": repr(exc)},
            )
    raise AssertionError("unreachable: the last node's failure is raised")


async def _connect(connection: FailoverConnection, answer_within: float) -> FailoverConnection:
    """Made here rather than by `aio_pika.connect_robust`, so that a connect cut short (the
    service stopping while it connects) closes what it started: aio-pika's reconnecting task
    treats a cancelled attempt as a failed one and tries again, for ever, and the process
    could not end (`asyncio.run` waits for every task it cancels)."""
    # aio-pika's timeout for this attempt (the outer one below bounds only it); each reconnect
    # gets the connection's `reconnect_within`: one that met a broker which never answered,
    # with no timeout, hung for good.
    attempt = asyncio.ensure_future(connection.connect(timeout=answer_within))
    try:
        async with asyncio.timeout(answer_within):
            await asyncio.shield(attempt)
    except BaseException as exc:
        # Shielded: the close must finish even when the connect was cancelled.
        await asyncio.shield(_close_after(attempt, connection))
        if isinstance(exc, TimeoutError):
            raise ConnectionError(
                f"the broker took the connection but did not answer within {answer_within:g} s"
            ) from exc
        raise
    return connection


async def _close_after(attempt: asyncio.Future[None], connection: RobustConnection) -> None:
    """Close a connection whose first connect was cut short or failed.

    The handshake runs in aio-pika's reconnecting task, and `close` cancels that task.
    Cancelled after the broker's last handshake frame but before aio-pika keeps the
    transport, it would leave an open connection that nothing refers to, its reader, writer
    and heartbeat tasks running. So the attempt under way may end first."""
    await asyncio.wait({attempt}, timeout=SETTLE_SECONDS)
    if attempt.done():
        if not attempt.cancelled():
            attempt.exception()  # retrieved: the caller has the error it raises
    else:
        attempt.cancel()
    await connection.close()
