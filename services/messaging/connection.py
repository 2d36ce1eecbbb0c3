"""How Courier opens a connection to the broker: robust (aio-pika reconnects it and restores
its channels), with a heartbeat, and named, so the management UI tells the connections apart."""

from __future__ import annotations

import aio_pika
from aio_pika.abc import AbstractRobustConnection


async def open_connection(url: str, *, heartbeat: int, name: str) -> AbstractRobustConnection:
    """A robust connection; raises if the broker does not answer."""
    return await aio_pika.connect_robust(
        url, heartbeat=heartbeat, client_properties={"connection_name": name}
    )
