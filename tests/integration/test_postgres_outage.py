"""A PostgreSQL store whose server is away: stopped (nothing listens) or refusing connections.
Every store operation of a service then fails as an outage (`store_unavailable`), so the
consumer holds its deliveries instead of spending their attempts, as it does for SQLite's
locked or missing file: the gateway's status and result reports were dead-lettered as
`retries_exhausted` after an outage of a PostgreSQL restart's length, and the notifier spent
attempts of delivered notifications."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from services.messaging.errors import StoreUnavailable
from services.messaging.store import STORE_ERRORS, open_store, store_checked, store_url
from tests.support.tcp_proxy import ProxyMode, TcpProxy


@pytest.fixture
async def proxy(postgres_database: str) -> AsyncIterator[TcpProxy]:
    """A TCP proxy in front of the test's PostgreSQL server."""
    server = urlsplit(postgres_database)
    async with TcpProxy(server.hostname or "127.0.0.1", server.port or 5432) as proxy:
        yield proxy


@pytest.fixture
async def store(
    proxy: TcpProxy, postgres_database: str, tmp_path: Path
) -> AsyncIterator[AsyncEngine]:
    server = urlsplit(postgres_database)
    through_proxy = server._replace(netloc=f"{server.username}@127.0.0.1:{proxy.port}").geturl()
    engine = open_store(store_url(through_proxy, tmp_path, "svc"))
    yield engine
    await engine.dispose()


async def one(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(text("SELECT 1")) or 0)


async def test_a_server_that_went_away_is_an_outage(proxy: TcpProxy, store: AsyncEngine) -> None:
    assert await one(store) == 1  # a pooled connection, which the server's stop ends
    await proxy.stop()  # a stopped server: nothing listens, connecting is refused
    with pytest.raises(StoreUnavailable) as held:
        await store_checked(one(store), "read")
    assert isinstance(held.value.__cause__, STORE_ERRORS)


async def test_a_server_that_resets_connections_is_an_outage(
    proxy: TcpProxy, store: AsyncEngine
) -> None:
    assert await one(store) == 1
    proxy.set_mode(ProxyMode.REFUSE)  # new connections reset at once, as a restarting server's
    proxy.reset_all()
    with pytest.raises(StoreUnavailable):
        await store_checked(one(store), "read")
    proxy.set_mode(ProxyMode.PASS)
    assert await one(store) == 1  # back by itself
