"""How fast the operators' failure store answers with 100,000 dead letters in it.

    python -m bench.dlq_store                      # a fresh SQLite file in a temporary directory
    python -m bench.dlq_store --postgres postgresql://postgres@127.0.0.1:5432/postgres

Fills a fresh store (for PostgreSQL: a temporary database on that server, dropped afterwards)
with synthetic dead letters — a few services and event types, ~50 failure groups of skewed
sizes, a month of history, a tenth of them already replayed or discarded — inserted in batches
straight into the store's table. Then times the queries the ops API runs (`FailureStore`'s own
methods, so the figures are what an operator waits for) and prints the median of several runs.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from bench.report import Result, save
from bench.system import postgres_database, postgres_option
from services.messaging.store import open_store, store_url
from services.ops.store import FailureStore, Filter, dead_letters

SERVICES = ("processor", "notifier", "billing", "mailer")
EVENT_TYPES = (
    "dataset.submitted",
    "dataset.processed",
    "notification.requested",
    "invoice.issued",
    "payment.failed",
    "email.bounced",
)
EXCEPTIONS = (
    ("builtins.ConnectionError", "connection refused by {host}:{port}"),
    ("builtins.TimeoutError", "upstream {host} did not answer within {n} seconds"),
    ("services.messaging.errors.PermanentError", "recipient {id} refused the message"),
    ("pydantic_core._pydantic_core.ValidationError", "{n} validation errors for event {id}"),
    ("httpx.HTTPStatusError", "server error '503 Service Unavailable' for url {host}/{id}"),
)
REASONS = ("retries_exhausted", "permanent", "invalid", "delivery_limit")
GROUPS = 50
BATCH = 5_000
NOW = datetime(2030, 6, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Group:
    key: str
    fingerprint: str
    service: str
    event_type: str
    reason: str
    exception_type: str
    template: str
    weight: float


def make_groups(rng: random.Random) -> list[Group]:
    groups = []
    for i in range(GROUPS):
        exception_type, template = EXCEPTIONS[i % len(EXCEPTIONS)]
        groups.append(
            Group(
                key=f"{rng.getrandbits(64):016x}",
                fingerprint=f"{rng.getrandbits(64):016x}",
                service=SERVICES[i % len(SERVICES)],
                event_type=EVENT_TYPES[i % len(EVENT_TYPES)],
                reason=REASONS[i % len(REASONS)],
                exception_type=exception_type,
                template=template,
                weight=1.0 / (i + 1),  # a few big groups, a long tail of small ones
            )
        )
    return groups


def rows(count: int, groups: list[Group], rng: random.Random) -> Iterator[dict[str, Any]]:
    weights = [g.weight for g in groups]
    for n in range(count):
        group = rng.choices(groups, weights)[0]
        event_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        at = NOW - timedelta(seconds=rng.uniform(0, 30 * 86_400))
        message = group.template.format(
            host=f"svc-{rng.randrange(20)}.internal", port=rng.randrange(1024, 65_535),
            n=rng.randrange(1, 100), id=event_id,
        )  # fmt: skip
        roll = rng.random()
        status = "replayed" if roll < 0.07 else "discarded" if roll < 0.10 else "dead"
        yield {
            "id": f"{n:08d}{rng.getrandbits(96):024x}",
            "service": group.service,
            "queue": f"courier.{group.service}",
            "event_id": event_id,
            "event_type": group.event_type,
            "reason": group.reason,
            "attempts": rng.randrange(1, 6),
            "replays": 0,
            "first_failure": at - timedelta(minutes=12),
            "last_failure": at,
            "dead_lettered_at": at,
            "exception_type": group.exception_type,
            "exception_message": message,
            "traceback": f'Traceback (most recent call last):\n  File "handlers.py"\n{message}',
            "fingerprint": group.fingerprint,
            "group_key": group.key,
            "body": b'{"specversion":"1.0","id":"' + event_id.encode() + b'","data":{}}',
            "headers": {"courier-reason": group.reason, "courier-attempt": 3},
            "correlation_id": event_id,
            "status": status,
            "claim": None,
            "claimed_at": None,
            "history": [{"at": at.isoformat(), "action": "dead_lettered"}],
            "closed_at": at + timedelta(hours=1) if status != "dead" else None,
        }


async def fill(store: FailureStore, count: int, seed: int) -> list[Group]:
    rng = random.Random(seed)
    groups = make_groups(rng)
    batch: list[dict[str, Any]] = []
    for row in rows(count, groups, rng):
        batch.append(row)
        if len(batch) == BATCH:
            await _insert(store.engine, batch)
            batch = []
    if batch:
        await _insert(store.engine, batch)
    async with store.engine.begin() as conn:  # fresh statistics, as a long-running store has
        await conn.exec_driver_sql("ANALYZE")
    return groups


async def _insert(engine: AsyncEngine, batch: list[dict[str, Any]]) -> None:
    async with engine.begin() as conn:
        await conn.execute(dead_letters.insert(), batch)


async def timed(fn: Callable[[], Awaitable[int]], runs: int) -> tuple[list[float], int]:
    """Wall times in ms of `runs` runs (after one warm-up), and the rows returned."""
    found = await fn()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        found = await fn()
        samples.append((time.perf_counter() - start) * 1000)
    return samples, found


async def measure(store: FailureStore, groups: list[Group], runs: int) -> list[tuple[str, Any]]:
    big, small = groups[0], groups[-1]

    async def page(selection: Filter, cursor: str | None = None) -> int:
        return len((await store.page(selection, limit=50, cursor=cursor)).items)

    # The cursor of page 50 (what a client holds after paging 49 times).
    cursor: str | None = None
    for _ in range(49):
        cursor = (await store.page(Filter(), limit=50, cursor=cursor)).next_cursor
    assert cursor is not None

    async def walk_to_page_50() -> int:
        at: str | None = None
        for _ in range(50):
            result = await store.page(Filter(), limit=50, cursor=at)
            at = result.next_cursor
        return len(result.items)

    async def groups_query(selection: Filter) -> int:
        return len(await store.groups(selection))

    cases: list[tuple[str, Callable[[], Awaitable[int]]]] = [
        ("list: first page (50, newest first)", lambda: page(Filter())),
        (f"list: service={big.service}", lambda: page(Filter(service=big.service))),
        ("list: group (largest)", lambda: page(Filter(group=big.key))),
        ("list: group (smallest)", lambda: page(Filter(group=small.key))),
        ("list: page 50 via its cursor", lambda: page(Filter(), cursor)),
        ("list: walk 50 pages by cursor (total)", walk_to_page_50),
        ("list: text 'did not answer'", lambda: page(Filter(text="did not answer"))),
        ("list: text, rare (svc-7.internal:80)", lambda: page(Filter(text="svc-7.internal:80"))),
        ("count: all dead", lambda: store.count(Filter())),
        ("groups: all dead", lambda: groups_query(Filter())),
        (f"groups: service={big.service}", lambda: groups_query(Filter(service=big.service))),
    ]
    return [(name, await timed(fn, runs)) for name, fn in cases]


async def run(url: str, count: int, runs: int, seed: int) -> None:
    engine = open_store(url)
    try:
        store = FailureStore(engine)
        await store.start()
        start = time.perf_counter()
        groups = await fill(store, count, seed)
        fill_seconds = time.perf_counter() - start
        results = await measure(store, groups, runs)
    finally:
        await engine.dispose()
    dialect = make_url(url).get_backend_name()
    print(f"failure store on {dialect}: {count:,} dead letters, {GROUPS} groups")
    print(
        f"filled in {fill_seconds:.1f} s ({count / fill_seconds:,.0f} rows/s, batches of {BATCH})"
    )
    print(f"median and best of {runs} runs after a warm-up\n")
    print(f"{'query':<42} {'median ms':>10} {'best ms':>9} {'rows':>6}")
    print("-" * 70)
    for name, (samples, found) in results:
        print(f"{name:<42} {statistics.median(samples):>10.2f} {min(samples):>9.2f} {found:>6}")
    path = save(
        f"dlq_store_{dialect}",
        [Result(name, "ms", statistics.median(samples), samples) for name, (samples, _) in results],
        {
            "dialect": dialect,
            "dead_letters": count,
            "groups": GROUPS,
            "runs": runs,
            "fill_seconds": fill_seconds,
            "fill_rows_per_second": count / fill_seconds,
            "rows_returned": {name: found for name, (_, found) in results},
        },
    )
    print(f"\nsaved {path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.dlq_store", description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000, help="dead letters to insert")
    parser.add_argument("--runs", type=int, default=7, help="timed runs per query")
    parser.add_argument("--seed", type=int, default=1, help="random seed of the data")
    postgres_option(parser)
    args = parser.parse_args(argv)
    if args.rows < 2_600:
        sys.exit("--rows must be at least 2,600 (50 pages of 50 dead letters, and some closed)")
    with (
        tempfile.TemporaryDirectory() as directory,
        postgres_database(args.postgres, "bench_dlq") as database,
    ):
        url = store_url(database, Path(directory), "gateway")
        asyncio.run(run(url, args.rows, args.runs, args.seed))


if __name__ == "__main__":
    main()
