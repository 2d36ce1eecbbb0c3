"""Opening a connection to a real broker: a connect cut short leaves nothing running."""

from __future__ import annotations

import asyncio

import pytest

from services.messaging.connection import open_connection

pytestmark = pytest.mark.broker


def _others() -> set[asyncio.Task[object]]:
    return asyncio.all_tasks() - {asyncio.current_task()}


async def test_a_connect_cancelled_at_any_point_leaves_no_task_behind(amqp_url: str) -> None:
    # A service stopping while it connects cancels the connect; a reconnecting task left
    # behind would keep the process from ever ending. Cancelled after 0, 2, 4, … turns of the
    # loop until the connect gets through: every stage of the handshake is cut once.
    cut = 0
    for turns in range(0, 1000, 2):
        connecting = asyncio.create_task(open_connection(amqp_url, heartbeat=30, name="cut"))
        for _ in range(turns):
            await asyncio.sleep(0)
        if connecting.done():
            await connecting.result().close()
            break
        connecting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await connecting
        await asyncio.sleep(0.05)  # what a reconnecting task would take to show itself
        assert not _others(), f"cancelled after {turns} turns"
        cut += 1
    assert cut > 5  # the connect was cut at several stages, not only before it began
