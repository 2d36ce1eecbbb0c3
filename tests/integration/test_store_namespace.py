"""A store serves one deployment: the first service to start on it claims it for its
`COURIER_NAMESPACE`, and one of another namespace is refused rather than mixing their data."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from services.messaging.errors import StoreOfAnotherNamespace
from services.messaging.store import claim, open_store, store_url


@pytest.fixture(params=["sqlite", "postgresql"])
async def engine(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    database_url = (
        None if request.param == "sqlite" else request.getfixturevalue("postgres_database")
    )
    store = open_store(store_url(database_url, tmp_path, "gateway"))
    yield store
    await store.dispose()


async def test_a_store_is_claimed_by_the_first_namespace_and_kept_for_it(
    engine: AsyncEngine,
) -> None:
    await claim(engine, "shop")
    await claim(engine, "shop")  # every later start, and every replica


async def test_a_store_claimed_by_another_namespace_is_refused_naming_both(
    engine: AsyncEngine,
) -> None:
    await claim(engine, "shop")
    with pytest.raises(StoreOfAnotherNamespace, match="'shop', not 'billing'"):
        await claim(engine, "billing")
    await claim(engine, "shop")  # the refused one left no claim behind
