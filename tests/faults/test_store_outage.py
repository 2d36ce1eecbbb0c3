"""The consumer's store goes away while a service runs: the delivery waits, the service says it
is not ready meanwhile, and it carries on by itself once the store is back (a real process).

The outage is the service's inbox table renamed away in its SQLite file, as a broken or
migrated-away store looks to the service: every look-up fails as unavailable.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from services.messaging.publisher import Publisher
from tests.conftest import Namespace
from tests.faults.conftest import Effects, EffectServiceFactory, readiness, send
from tests.support.polling import eventually
from tests.support.processes import ServiceProcess

pytestmark = [pytest.mark.faults, pytest.mark.broker]

INBOX = "notifier_inbox"


def rename(data_dir: Path, old: str, new: str) -> None:
    with sqlite3.connect(data_dir / "notifier.sqlite3", timeout=10) as store:
        store.execute(f"ALTER TABLE {old} RENAME TO {new}")


async def ready_is(service: ServiceProcess, status: int, timeout: float) -> None:
    async def check() -> None:
        assert service.process is not None and service.process.poll() is None, service.log()
        assert await asyncio.to_thread(readiness, service) == status

    await eventually(check, timeout=timeout)


async def test_a_service_holding_work_for_its_store_is_not_ready_until_it_is_back(
    effect_service: EffectServiceFactory,
    publisher: Publisher,
    namespace: Namespace,
    effects: Effects,
    data_dir: Path,
) -> None:
    service = effect_service().wait_ready()
    await ready_is(service, 200, timeout=10)
    rename(data_dir, INBOX, "inbox_away")

    [event_id] = await send(publisher, namespace, "held")
    await ready_is(service, 503, timeout=15)
    assert effects.counts() == {}
    assert "holding the delivery" in service.log()

    rename(data_dir, "inbox_away", INBOX)

    async def handled_once() -> None:
        assert effects.counts() == {event_id: 1}

    await eventually(handled_once, timeout=60)
    await ready_is(service, 200, timeout=15)
    assert service.process is not None and service.process.poll() is None  # never restarted
