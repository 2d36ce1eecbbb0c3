"""How Courier opens a connection to the broker: robust (aio-pika reconnects it and restores
its channels), with a heartbeat, and named, so the management UI tells the connections apart."""

from __future__ import annotations

import asyncio

from aio_pika import RobustConnection
from aio_pika.abc import AbstractRobustConnection
from aio_pika.connection import make_url


async def open_connection(url: str, *, heartbeat: int, name: str) -> AbstractRobustConnection:
    """A robust connection; raises if the broker does not answer.

    Made here rather than by `aio_pika.connect_robust`, so that a connect cut short (the
    service stopping while it connects) closes what it started: aio-pika's reconnecting task
    treats a cancelled attempt as a failed one and tries again, for ever, and the process
    could not end (`asyncio.run` waits for every task it cancels)."""
    connection = RobustConnection(
        make_url(url, heartbeat=heartbeat), client_properties={"connection_name": name}
    )
    try:
        await connection.connect()
    except BaseException:
        # Shielded: the close must finish even when the connect was cancelled.
        await asyncio.shield(connection.close())
        raise
    return connection
