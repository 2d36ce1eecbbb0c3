"""A store serves one deployment: the first service to start on it claims it for its
`COURIER_NAMESPACE`, and one of another namespace is refused rather than mixing their data."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from asgi_lifespan import LifespanManager
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from services.gateway.app import create_app
from services.messaging.errors import StoreOfAnotherNamespace
from services.messaging.store import claim, open_store, store_url
from tests.conftest import Namespace
from tests.integration.conftest import gateway_settings
from tests.support.stores import claimed_by


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    database_url = (
        None if request.param == "sqlite" else request.getfixturevalue("postgres_database")
    )
    return store_url(database_url, tmp_path, "gateway")


@pytest.fixture
async def engine(url: str) -> AsyncIterator[AsyncEngine]:
    store = open_store(url)
    yield store
    await store.dispose()


async def owners(engine: AsyncEngine) -> list[str]:
    async with engine.connect() as conn:
        return list((await conn.scalars(text("SELECT namespace FROM courier_namespace"))).all())


async def test_a_store_is_claimed_by_the_first_namespace_and_kept_for_it(
    engine: AsyncEngine,
) -> None:
    await claim(engine, "shop")
    await claim(engine, "shop")  # every later start, and every replica
    assert await owners(engine) == ["shop"]


async def test_services_starting_together_claim_a_new_store_once(url: str) -> None:
    engines = [open_store(url) for _ in range(4)]
    try:
        await asyncio.gather(*(claim(e, "shop") for e in engines))
        assert await owners(engines[0]) == ["shop"]
    finally:
        await asyncio.gather(*(e.dispose() for e in engines))


async def test_a_store_claimed_by_another_namespace_is_refused_naming_both(
    engine: AsyncEngine,
) -> None:
    await claim(engine, "shop")
    with pytest.raises(StoreOfAnotherNamespace, match="'shop', not 'billing'"):
        await claim(engine, "billing")
    assert await owners(engine) == ["shop"]  # the refused one left no claim behind


@pytest.mark.broker
async def test_a_gateway_on_a_store_of_another_namespace_fails_its_start_up_saying_so(
    namespace: Namespace, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await claimed_by("another-deployment", tmp_path, "gateway")
    app = create_app(gateway_settings(namespace, tmp_path))
    with pytest.raises(StoreOfAnotherNamespace, match="'another-deployment', not"):
        async with LifespanManager(app, startup_timeout=30):
            pass
    assert "the store belongs to another namespace; refusing to start" in caplog.text
