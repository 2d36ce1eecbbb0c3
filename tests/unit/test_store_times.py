"""Times written by the hot paths' raw statements read back like SQLAlchemy's own."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import Column, DateTime, MetaData, Table, create_engine, insert, select

from services.messaging.store import from_sqlite_time, sqlite_time

TIMES = [
    datetime(2026, 12, 5, 1, 2, 3, 456789, tzinfo=UTC),
    datetime(2026, 12, 5, 1, 2, 3, tzinfo=UTC),  # no fraction: still six digits
    datetime(2026, 12, 5, 3, 2, 3, 7, tzinfo=timezone(timedelta(hours=2))),
]


@pytest.mark.parametrize("value", TIMES)
def test_a_raw_time_is_the_text_sqlalchemy_stores(value: datetime) -> None:
    table = Table("t", MetaData(), Column("at", DateTime(timezone=True)))
    engine = create_engine("sqlite://")
    table.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(table).values(at=value.astimezone(UTC).replace(tzinfo=None)))
        stored = conn.exec_driver_sql("SELECT at FROM t").scalar_one()
        conn.exec_driver_sql("DELETE FROM t")
        conn.exec_driver_sql("INSERT INTO t (at) VALUES (?)", (sqlite_time(value),))
        read_back = conn.execute(select(table.c.at)).scalar_one()
    assert sqlite_time(value) == stored
    assert read_back.replace(tzinfo=UTC) == value
    assert from_sqlite_time(sqlite_time(value)) == value
