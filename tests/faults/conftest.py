"""Fixtures for fault-injection tests: the effect service as a real process, and its effects."""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from contracts.events import NotificationRequested, NotificationRequestedData
from services.messaging.declare import declare_topology
from services.messaging.publisher import Publisher
from services.messaging.settings import CourierSettings
from tests.conftest import Namespace
from tests.support.processes import ServiceProcess, consumer


class Effects:
    """Reads the effect service's store: one row per effect."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "notifier.sqlite3"

    def _rows(self, sql: str) -> list[tuple[str, ...]]:
        if not self.path.exists():
            return []
        with sqlite3.connect(self.path, timeout=10) as db:
            try:
                return db.execute(sql).fetchall()
            except sqlite3.OperationalError:  # table not created yet
                return []

    def counts(self) -> Counter[str]:
        return Counter(row[0] for row in self._rows("SELECT event_id FROM effects"))

    def attempts(self, event_id: str) -> int:
        rows = self._rows(f"SELECT count(*) FROM attempts WHERE event_id = '{event_id}'")  # noqa: S608
        return int(rows[0][0]) if rows else 0


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture
def effects(data_dir: Path) -> Effects:
    return Effects(data_dir)


EffectServiceFactory = Callable[..., ServiceProcess]


@pytest.fixture
def effect_service(
    namespace: Namespace, data_dir: Path, tmp_path: Path
) -> Iterator[EffectServiceFactory]:
    """Start effect-service processes (`tests.support.effect_service`); all killed at the end."""
    started: list[ServiceProcess] = []

    def start(amqp_url: str | None = None, **env: str) -> ServiceProcess:
        environment = namespace.env(
            COURIER_DATA_DIR=str(data_dir),
            COURIER_LOG_LEVEL="INFO",
            **({"AMQP_URL": amqp_url} if amqp_url else {}),
            **env,
        )
        service = consumer("notifier", environment, tmp_path, module="tests.support.effect_service")
        service.log_path = tmp_path / f"effect-service-{len(started)}.log"
        started.append(service.start())
        return service

    yield start
    for service in started:
        service.kill()


@pytest.fixture
async def publisher(namespace: Namespace) -> AsyncIterator[Publisher]:
    """A confirmed publisher into the namespace, with the whole topology declared."""
    pub = Publisher(namespace.amqp_url)
    connection = await pub.connect()
    await declare_topology(connection, namespace.settings().all_topologies())
    yield pub
    await pub.close()


def notification(subject: str) -> NotificationRequested:
    return NotificationRequested(data=NotificationRequestedData(recipient="r", subject=subject))


async def send(publisher: Publisher, namespace: Namespace, *subjects: str) -> list[str]:
    """Publish one notification per subject (confirmed); their event ids."""
    events = [notification(subject) for subject in subjects]
    exchange = CourierSettings(namespace=namespace.name).topology("notifier").events_exchange
    for event in events:
        await publisher.publish_event(event, exchange=exchange)
    return [event.id for event in events]
