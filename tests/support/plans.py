"""What the database plans for a statement, for tests that a query uses its index."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import ClauseElement


async def query_plan(conn: AsyncConnection, statement: ClauseElement) -> list[str]:
    """The plan of `statement` (its parameters inlined), a line per step: SQLite's `EXPLAIN
    QUERY PLAN` rows, PostgreSQL's `EXPLAIN` lines."""
    compiled = statement.compile(conn.sync_engine, compile_kwargs={"literal_binds": True})
    explain = "EXPLAIN QUERY PLAN" if conn.dialect.name == "sqlite" else "EXPLAIN"
    rows = (await conn.exec_driver_sql(f"{explain} {compiled}")).all()
    return [str(row) if conn.dialect.name == "sqlite" else str(row[0]) for row in rows]
