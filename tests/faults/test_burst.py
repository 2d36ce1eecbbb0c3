"""A burst of 10,000 events while consumer processes are SIGKILLed and restarted at random
moments: exactly 10,000 effects, each event once, nothing left unacked or dead-lettered (real
processes, the shared broker, the test's own namespace).

Two effect-service processes share one store (as replicas of a service do), so the inbox of one
recognises what the other already did. The kill moments are progress points (a number of
effects done) drawn from a seeded random generator; the seed is logged and can be set with
`COURIER_BURST_SEED` to replay a failing schedule.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import sqlite3
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.messaging.inbox import Inbox
from services.messaging.publisher import Publisher
from services.messaging.settings import CourierSettings
from services.messaging.store import open_store, store_url
from tests.conftest import Namespace
from tests.faults.conftest import Effects, EffectServiceFactory, notification
from tests.support.polling import eventually
from tests.support.processes import ServiceProcess
from tests.support.queues import assert_empty

pytestmark = [pytest.mark.faults, pytest.mark.broker]

log = logging.getLogger(__name__)

EVENTS = 10_000
PUBLISH_WINDOW = 500  # publishes awaiting their confirms at once
CONSUMERS = 2
KILLS = 5
REPLICAS_STARTING = 4
PREFETCH = "16"
# About 2 minutes here (some 80 effects a second); the rest is margin for a loaded machine.
BUDGET_SECONDS = 330
SEED = int(os.environ.get("COURIER_BURST_SEED", "20240611"))


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """The consumers' shared store on tmpfs when there is one (overrides the faults fixture).

    A SIGKILL loses nothing SQLite committed, with or without fsync; a power loss is not this
    test's subject. Off the disk, the burst measures the messaging instead of fsync latency
    (two commits per event, beside the broker's own), which is what made it slow under load.
    """
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(
        prefix="courier-burst-", dir=shm if shm.is_dir() else None
    ) as path:
        yield Path(path)


def effect_total(effects: Effects) -> int:
    """How many effects are committed (a cheap count; the test polls it often)."""
    if not effects.path.exists():
        return 0
    with sqlite3.connect(effects.path, timeout=10) as db:
        try:
            return int(db.execute("SELECT count(*) FROM effects").fetchone()[0])
        except sqlite3.OperationalError:  # table not created yet
            return 0


async def publish_burst(publisher: Publisher, namespace: Namespace, count: int) -> list[str]:
    """Publish `count` events, confirmed, PUBLISH_WINDOW at a time; their ids."""
    exchange = CourierSettings(namespace=namespace.name).topology("notifier").events_exchange
    events = [notification(f"burst-{n}") for n in range(count)]
    for start in range(0, count, PUBLISH_WINDOW):
        window = events[start : start + PUBLISH_WINDOW]
        await asyncio.gather(*(publisher.publish_event(e, exchange=exchange) for e in window))
    return [event.id for event in events]


@pytest.mark.timeout(420)
async def test_a_burst_survives_random_consumer_kills_with_each_effect_exactly_once(
    namespace: Namespace,
    publisher: Publisher,
    effect_service: EffectServiceFactory,
    effects: Effects,
) -> None:
    rng = random.Random(SEED)
    kill_points = sorted(rng.sample(range(EVENTS // 20, EVENTS * 9 // 10), KILLS))
    victims = [rng.randrange(CONSUMERS) for _ in kill_points]
    schedule = f"seed={SEED} kill at effects {kill_points}, consumers {victims}"
    log.info("burst schedule: %s (COURIER_BURST_SEED=%d replays it)", schedule, SEED)

    def start_consumer() -> ServiceProcess:
        return effect_service(
            COURIER_PREFETCH=PREFETCH, COURIER_SHUTDOWN_TIMEOUT="20", COURIER_LOG_LEVEL="WARNING"
        )

    # One after the other: the first creates the store's tables (replicas creating them at the
    # same moment is the next test's subject). Restarts later find them and may overlap freely.
    consumers = [start_consumer().wait_ready() for _ in range(CONSUMERS)]

    started = time.monotonic()
    deadline = started + BUDGET_SECONDS  # for all of it: kills, publishing, every effect

    def remaining() -> float:
        return max(1.0, deadline - time.monotonic())

    publishing = asyncio.get_running_loop().create_task(publish_burst(publisher, namespace, EVENTS))
    killed_pids: list[int] = []
    try:
        for point, victim in zip(kill_points, victims, strict=True):

            async def reached(point: int = point) -> None:
                total = effect_total(effects)
                assert total >= point, f"{total} effects, next kill at {point}; {schedule}"

            await eventually(reached, timeout=remaining())
            service = consumers[victim]
            assert service.process is not None
            assert service.process.poll() is None, f"consumer died by itself:\n{service.log()}"
            killed_pids.append(service.process.pid)
            service.kill()  # SIGKILL, whatever it is doing
            consumers[victim] = start_consumer()  # restarted at once, not waited for
        async with asyncio.timeout(remaining()):
            event_ids = await publishing
    finally:
        if not publishing.done():
            publishing.cancel()
            await asyncio.gather(publishing, return_exceptions=True)
    published_after = time.monotonic() - started

    async def all_done() -> None:
        total = effect_total(effects)
        assert total >= EVENTS, f"{total} effects; {schedule}"

    await eventually(all_done, timeout=remaining())
    done_after = time.monotonic() - started
    for service in consumers:
        assert service.process is not None
        assert service.process.poll() is None, f"consumer died by itself:\n{service.log()}"
        assert await asyncio.to_thread(service.terminate) == 0, service.log()

    counts = effects.counts()
    duplicated = {event_id: n for event_id, n in counts.items() if n != 1}
    assert not duplicated, f"{len(duplicated)} events with repeated effects; {schedule}"
    assert sum(counts.values()) == EVENTS, schedule
    assert set(counts) == set(event_ids), schedule
    assert len(killed_pids) == KILLS
    pids = Counter(effect.pid for effect in effects.effects())
    log.info("effects per process: %s; killed: %s", dict(pids), killed_pids)

    topology = namespace.settings().topology("notifier")
    await assert_empty(
        namespace.amqp_url,
        [
            topology.queue,
            topology.dead_letter_queue,
            *(topology.retry_queue(delay) for delay in topology.retry_delays),
        ],
    )
    log.info(
        "burst: %d events published in %.1fs, all effects in %.1fs, %s",
        EVENTS,
        published_after,
        done_after,
        schedule,
    )


async def test_replicas_opening_one_fresh_store_together_all_start(tmp_path: Path) -> None:
    """The burst's consumers share one store, as replicas of a service do, and start (or
    restart) at the same moment, before the store's tables exist: each must come up.

    Several engines on one SQLite file stand in for the processes (SQLite locks per
    connection), which makes the race deterministic instead of one start in five.
    """
    engines = [open_store(store_url(None, tmp_path, "notifier")) for _ in range(REPLICAS_STARTING)]
    try:
        outcomes = await asyncio.gather(
            *(Inbox(engine, "notifier").start() for engine in engines), return_exceptions=True
        )
    finally:
        for engine in engines:
            await engine.dispose()
    failures = [repr(outcome) for outcome in outcomes if isinstance(outcome, BaseException)]
    assert not failures, failures
