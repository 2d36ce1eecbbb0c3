"""A consuming service for fault tests: the real runtime, a handler whose effect is countable.

`python -m tests.support.effect_service` runs Courier's runtime (`services.messaging.runtime`)
as the `notifier` service of its namespace. Its handler is stateful: it inserts one row per
`notification.requested` into an `effects` table of the service's own store, in the same
transaction as the inbox record, so tests count effects in a store instead of reading logs.

Every handler call first commits a row to `starts` (event id, time, pid) in its own
transaction, before any misbehaviour: tests see that a handler is mid-work, and count how often
an event was delivered to a handler (a redelivery after a crash or a dropped connection shows as
a second start). An event that is a duplicate in the inbox never reaches the handler.

The event's subject tells the handler how to misbehave:

* `slow:<seconds>`        sleep that long before the effect (a kill lands mid-work);
* `cpu:<seconds>`         burn CPU that long in the process pool before the effect;
* `crash`                 exit the process at once, on every delivery (a poison message);
* `die-before-ack`        after the effect is committed, exit instead of acking — once;
* `fail:<n>`              raise a transient error on the first n attempts (counted in the store);
* `fail-always`           raise a transient error on every attempt;
* `fixable`               raise a transient error while `<COURIER_DATA_DIR>/broken` exists;
* anything else           just the effect.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping
from contextlib import AsyncExitStack
from pathlib import Path

import aiormq
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from contracts.events import NotificationRequested
from services.messaging.consumer import Route
from services.messaging.cpu import CpuPool
from services.messaging.runtime import run
from services.messaging.settings import ConsumerSettings
from services.messaging.store import open_store, store_url

SERVICE = "notifier"
EFFECTS_DDL = (
    "CREATE TABLE IF NOT EXISTS effects "
    "(event_id VARCHAR(128), subject VARCHAR(200), pid INTEGER, at FLOAT)"
)
ATTEMPTS_DDL = "CREATE TABLE IF NOT EXISTS attempts (event_id VARCHAR(128), at FLOAT)"
STARTS_DDL = "CREATE TABLE IF NOT EXISTS starts (event_id VARCHAR(128), at FLOAT, pid INTEGER)"


def burn(seconds: float) -> int:
    """Pure CPU for `seconds` (runs in a worker process)."""
    deadline, n = time.monotonic() + seconds, 0
    while time.monotonic() < deadline:
        n += 1
    return n


class EffectHandler:
    def __init__(self, settings: ConsumerSettings, pool: CpuPool) -> None:
        self._engine = open_store(store_url(settings.database_url, settings.data_dir, SERVICE))
        self._pool = pool
        self._marker_dir = settings.data_dir

    async def setup(self) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(text(EFFECTS_DDL))
            await conn.execute(text(ATTEMPTS_DDL))
            await conn.execute(text(STARTS_DDL))

    async def _started(self, event_id: str) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(
                text("INSERT INTO starts VALUES (:id, :at, :pid)"),
                {"id": event_id, "at": time.time(), "pid": os.getpid()},
            )

    async def _attempts(self, event_id: str) -> int:
        async with self._engine.begin() as conn:
            await conn.execute(
                text("INSERT INTO attempts VALUES (:id, :at)"), {"id": event_id, "at": time.time()}
            )
            count = await conn.scalar(
                text("SELECT count(*) FROM attempts WHERE event_id = :id"), {"id": event_id}
            )
        return int(count or 0)

    async def __call__(self, event: NotificationRequested, conn: AsyncConnection) -> None:
        subject = event.data.subject
        kind, _, arg = subject.partition(":")
        await self._started(event.id)
        if kind == "crash":
            os._exit(3)
        if kind == "slow":
            await asyncio.sleep(float(arg))
        if kind == "cpu":
            await self._pool.run(burn, float(arg))
        if kind == "fail" and await self._attempts(event.id) <= int(arg):
            raise ConnectionError(f"transient failure for {event.id}")
        if kind == "fail-always":
            await self._attempts(event.id)
            raise ConnectionError("always failing")
        if kind == "fixable" and (self._marker_dir / "broken").exists():
            raise ConnectionError(f"broken until fixed: {event.id}")
        if kind == "die-before-ack":
            _die_at_next_ack(self._marker_dir / f"died-{event.id}")
        await conn.execute(
            text("INSERT INTO effects VALUES (:id, :subject, :pid, :at)"),
            {"id": event.id, "subject": subject, "pid": os.getpid(), "at": time.time()},
        )


def _die_at_next_ack(marker: Path) -> None:
    """Make the next ack of this process exit instead (once per marker): the crash window
    between a committed effect and the acknowledgement."""
    if marker.exists():
        return

    async def ack(self: aiormq.Channel, *args: object, **kwargs: object) -> None:
        marker.touch()  # noqa: ASYNC240  # the process exits on the next line
        os._exit(4)

    # Run with prefetch 1 so that the next ack is this event's. Patched where every ack
    # goes out, whichever way the consumer sends it.
    aiormq.Channel.basic_ack = ack  # type: ignore[method-assign]


async def build_routes(stack: AsyncExitStack, settings: ConsumerSettings) -> Mapping[str, Route]:
    pool = CpuPool(settings.cpu_workers)
    stack.callback(pool.close)
    handler = EffectHandler(settings, pool)
    await handler.setup()
    return {"notification.requested": Route(handler, settings.retry_policy(), stateful=True)}


def main() -> None:
    run(SERVICE, ConsumerSettings(), build_routes)


if __name__ == "__main__":
    main()
