"""Pruning in batches: each batch finds its rows by the table's key, not by reading the table."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Column, DateTime, MetaData, String, Table, text
from sqlalchemy.ext.asyncio import AsyncEngine

from services.messaging.store import open_store, prune_batch, store_url
from tests.support.plans import query_plan

metadata = MetaData()
rows = Table(
    "prune_rows",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("at", DateTime(timezone=True), nullable=False, index=True),
)


@pytest.fixture
async def pg(postgres_database: str, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = open_store(store_url(postgres_database, tmp_path, "pruner"))
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    yield engine
    await engine.dispose()


async def test_on_postgresql_a_batch_finds_its_rows_by_key_not_by_reading_the_table(
    pg: AsyncEngine,
) -> None:
    # `key IN (SELECT ... LIMIT n)` was planned as a semi join over the whole table: every
    # batch read every row (1.2 million old rows pruned in 29 s instead of 6; a results
    # table read whole to prune a few of its rows).
    old = datetime.now(UTC) - timedelta(days=30)
    async with pg.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO prune_rows SELECT md5(i::text), "
                "now() - interval '30 days' - i * interval '1 s' FROM generate_series(1, 50000) i"
            )
        )
        await conn.execute(text("ANALYZE prune_rows"))
        statement = prune_batch("postgresql", rows.c.key, rows.c.at < old, 5000)
        plan = "\n".join(await query_plan(conn, statement))
    # The subquery (`prune_rows_1`) may scan: it stops at the batch's rows. The rows deleted
    # are looked up by key.
    assert not re.search(r"Seq Scan on prune_rows\s+\(", plan), plan
    assert "prune_rows_pkey" in plan, plan
