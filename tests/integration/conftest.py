from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine

from services.gateway.app import create_app
from services.gateway.settings import GatewaySettings
from services.messaging.store import open_store, store_url
from tests.conftest import Namespace
from tests.support.polling import eventually


async def gateway_client(
    settings: GatewaySettings,
    *,
    wait_ready: bool = True,
    started: Callable[[FastAPI], None] | None = None,
) -> AsyncIterator[httpx.AsyncClient]:
    """A client of a gateway app; `started` sees the app once its lifespan has set it up."""
    app = create_app(settings)
    # asgi-lifespan allows 5 s by default: a start on PostgreSQL (migrations, the stores'
    # pools) beside three other test workers on a loaded two-core host took longer once.
    async with LifespanManager(app, startup_timeout=30, shutdown_timeout=30) as manager:
        if started is not None:
            started(app)
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            if wait_ready:

                async def ready() -> None:
                    assert (await client.get("/readyz")).status_code == 200

                # Its topology declared on a broker that three other test workers keep busy
                # took longer than 10 s once (a queue declaration cancelled by its timeout).
                await eventually(ready, timeout=30)
            yield client


OPS_TOKEN = "integration-test-ops-token-0123456789"


def gateway_settings(namespace: Namespace, data_dir: Path, **overrides: Any) -> GatewaySettings:
    settings = GatewaySettings(
        **{
            "amqp_url": namespace.amqp_url,
            "namespace": namespace.name,
            "data_dir": data_dir,
            "ops_tokens": {"tester": OPS_TOKEN},
            **overrides,
        }
    )
    namespace.remember(settings)
    return settings


@pytest.fixture
async def client(namespace: Namespace, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = gateway_settings(namespace, tmp_path, max_body_bytes=4096, max_batch_events=5)
    async for c in gateway_client(settings):
        yield c


@pytest.fixture(params=["sqlite", "postgresql"])
async def fresh_engine(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[AsyncEngine]:
    """A gateway store nothing has touched, for migration tests (on PostgreSQL a database of
    its own: a module's shared one holds the current schema already)."""
    database_url = (
        None if request.param == "sqlite" else request.getfixturevalue("postgres_database")
    )
    store = open_store(store_url(database_url, tmp_path, "gateway"))
    yield store
    await store.dispose()
