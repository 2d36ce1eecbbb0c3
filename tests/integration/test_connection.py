"""Opening a connection to a real broker: a connect cut short leaves nothing running, and one
the broker never answers ends."""

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


async def test_a_broker_that_takes_the_connection_but_never_answers_is_a_failed_connect() -> None:
    """As RabbitMQ out of file handles does: it accepts TCP and starts no handshake."""
    held: list[asyncio.StreamWriter] = []

    async def silent(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(ConnectionError, match=r"did not answer within 0\.5 s"):
            await open_connection(
                f"amqp://guest:guest@127.0.0.1:{port}/",
                heartbeat=30,
                name="silent",
                answer_within=0.5,
            )
        assert held  # it did connect
        await asyncio.sleep(0.05)
        assert not _others()  # and left nothing running
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()
