"""How Courier opens a connection to the broker: robust (aio-pika reconnects it and restores
its channels), with a heartbeat, and named, so the management UI tells the connections apart."""

from __future__ import annotations

import asyncio

from aio_pika import RobustConnection
from aio_pika.abc import AbstractRobustConnection
from aio_pika.connection import make_url

# How long a connect cut short may go on before it is cut: a broker that answers ends the
# handshake in milliseconds; one that does not is cut where cutting leaks nothing.
SETTLE_SECONDS = 5.0
CONNECT_TIMEOUT = 30.0
"""How long a connect may take, the first and each reconnect. A broker that accepts the TCP
connection but never starts the handshake (one out of file handles, say) would otherwise hold
it for ever, the service unready and saying nothing."""


async def open_connection(
    url: str, *, heartbeat: int, name: str, answer_within: float = CONNECT_TIMEOUT
) -> AbstractRobustConnection:
    """A robust connection; raises if the broker does not answer (`ConnectionError` if it
    does not within `answer_within` seconds, which callers retry as any refused connect).

    Made here rather than by `aio_pika.connect_robust`, so that a connect cut short (the
    service stopping while it connects) closes what it started: aio-pika's reconnecting task
    treats a cancelled attempt as a failed one and tries again, for ever, and the process
    could not end (`asyncio.run` waits for every task it cancels)."""
    connection = RobustConnection(
        make_url(url, heartbeat=heartbeat), client_properties={"connection_name": name}
    )
    # The timeout is aio-pika's for every reconnect too (the outer one below bounds only this
    # first attempt): a reconnect that met a broker which never answered hung for good.
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
