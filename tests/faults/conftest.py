"""Fixtures for fault-injection tests: the effect service as a real process, and its effects.

Topology settings (delivery limit, retry delay tiers, queue length) are part of the queues'
arguments, so the test's publisher and every service process must declare them alike, or the
broker refuses the second declaration. A test sets them once, with the `topology` marker:

    @pytest.mark.topology(COURIER_DELIVERY_LIMIT="2", COURIER_RETRY_DELAYS="1,2")

and both the `publisher` fixture and each `effect_service(...)` process use them.
"""

from __future__ import annotations

import socket
import sqlite3
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from contracts.events import NotificationRequested, NotificationRequestedData
from services.messaging.declare import declare_topology
from services.messaging.publisher import Publisher
from services.messaging.settings import CourierSettings
from tests.conftest import Namespace
from tests.support.processes import ServiceProcess, consumer, gateway
from tests.support.rabbit_node import PrivateRabbitNode

# Environment variable of each topology setting -> its CourierSettings field.
TOPOLOGY_ENV: dict[str, str] = {
    "COURIER_RETRY_DELAYS": "retry_delays",
    "COURIER_DELIVERY_LIMIT": "delivery_limit",
    "COURIER_MAX_QUEUE_LENGTH": "max_queue_length",
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "topology(**env): topology settings (COURIER_RETRY_DELAYS, COURIER_DELIVERY_LIMIT, "
        "COURIER_MAX_QUEUE_LENGTH) for the publisher fixture and every effect-service process",
    )


@dataclass(frozen=True)
class Effect:
    event_id: str
    subject: str
    pid: int
    at: float


@dataclass(frozen=True)
class Start:
    event_id: str
    pid: int
    at: float


class Effects:
    """Reads the effect service's store: one row per effect, per attempt, per handler start."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "notifier.sqlite3"

    def _rows(self, sql: str) -> list[tuple[Any, ...]]:
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

    def attempt_times(self, event_id: str) -> list[float]:
        """When each attempt of `fail:<n>`/`fail-always` ran (epoch seconds), in order."""
        sql = f"SELECT at FROM attempts WHERE event_id = '{event_id}' ORDER BY at"  # noqa: S608
        return [float(row[0]) for row in self._rows(sql)]

    def effects(self) -> list[Effect]:
        """Every effect row, in commit order."""
        rows = self._rows("SELECT event_id, subject, pid, at FROM effects ORDER BY rowid")
        return [Effect(str(e), str(s), int(p), float(a)) for e, s, p, a in rows]

    def starts(self, event_id: str | None = None) -> list[Start]:
        """Handler starts (one per delivery that reached the handler), in order."""
        rows = self._rows("SELECT event_id, pid, at FROM starts ORDER BY rowid")
        starts = [Start(str(e), int(p), float(a)) for e, p, a in rows]
        return [s for s in starts if event_id is None or s.event_id == event_id]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture
def effects(data_dir: Path) -> Effects:
    return Effects(data_dir)


@pytest.fixture
def topology_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """The test's topology settings as environment variables (from its `topology` marker)."""
    marker = request.node.get_closest_marker("topology")
    env: dict[str, str] = {k: str(v) for k, v in marker.kwargs.items()} if marker else {}
    unknown = env.keys() - TOPOLOGY_ENV.keys()
    if unknown or (marker is not None and marker.args):
        raise ValueError(f"topology marker takes only {sorted(TOPOLOGY_ENV)} as keywords")
    return env


@pytest.fixture
def topology_settings(namespace: Namespace, topology_env: dict[str, str]) -> CourierSettings:
    """The settings every declaration in this test uses (remembered for the namespace cleanup)."""
    return namespace.settings(**{TOPOLOGY_ENV[k]: v for k, v in topology_env.items()})


EffectServiceFactory = Callable[..., ServiceProcess]


@pytest.fixture
def effect_service(
    namespace: Namespace, data_dir: Path, tmp_path: Path, topology_env: dict[str, str]
) -> Iterator[EffectServiceFactory]:
    """Start effect-service processes (`tests.support.effect_service`); all killed at the end.

    Keyword arguments are environment variables of the process; they win over the defaults of
    `tests.support.processes.consumer` (e.g. `COURIER_SHUTDOWN_TIMEOUT`). Topology settings come
    from the test's `topology` marker only, so the publisher declares the same queues.
    """
    started: list[ServiceProcess] = []

    def start(amqp_url: str | None = None, **env: str) -> ServiceProcess:
        clashing = {k for k in env.keys() & TOPOLOGY_ENV.keys() if env[k] != topology_env.get(k)}
        if clashing:
            raise ValueError(f"set {sorted(clashing)} with @pytest.mark.topology(...) instead")
        overrides = {
            "COURIER_DATA_DIR": str(data_dir),
            "COURIER_LOG_LEVEL": "INFO",
            **topology_env,
            **({"AMQP_URL": amqp_url} if amqp_url else {}),
            **env,
        }
        service = consumer(
            "notifier", namespace.env(**overrides), tmp_path, module="tests.support.effect_service"
        )
        service.env = {**service.env, **env}
        service.log_path = tmp_path / f"effect-service-{len(started)}.log"
        started.append(service.start())
        return service

    yield start
    for service in started:
        service.kill()


@pytest.fixture
async def publisher(
    namespace: Namespace, topology_settings: CourierSettings
) -> AsyncIterator[Publisher]:
    """A confirmed publisher into the namespace, with the whole topology declared."""
    pub = Publisher(namespace.amqp_url)
    connection = await pub.connect()
    await declare_topology(connection, topology_settings.all_topologies())
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


# --- A private RabbitMQ node (tests that stop, kill or cut the broker) -------------------------
#
# One node per test module (boot about 5 s): `rabbit_node`. Tests take it through `private_node`,
# which hands it over running and brings it back after the test if the test left it stopped
# (`stop_app`) or killed. Every test still has its own namespace, so queues never clash.


@pytest.fixture(scope="module")
def rabbit_node() -> Iterator[PrivateRabbitNode]:
    """A private RabbitMQ node shared by the tests of one module; torn down after the module."""
    with PrivateRabbitNode(name_prefix="courier-faults") as node:
        yield node


def _amqp_port_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


def ensure_running(node: PrivateRabbitNode) -> None:
    """Bring the node back if it was killed (`restart_after_kill`) or stopped (`start_app`)."""
    if not node.is_running:
        node.restart_after_kill()
    elif not _amqp_port_answers(node.amqp_port):
        node.start_app()


@pytest.fixture
def private_node(rabbit_node: PrivateRabbitNode) -> Iterator[PrivateRabbitNode]:
    """The module's private node, running at the start and again after the test.

    Queues of earlier tests stay on the node until the module ends: deleting quorum queues with
    at-least-once dead-lettering while they recover from a restart can crash RabbitMQ 3.10.8's
    `rabbit_fifo_dlx_sup`, after which every such declaration fails with INTERNAL_ERROR.
    """
    ensure_running(rabbit_node)
    yield rabbit_node
    ensure_running(rabbit_node)


@pytest.fixture
async def node_publisher(
    private_node: PrivateRabbitNode, topology_settings: CourierSettings
) -> AsyncIterator[Publisher]:
    """A confirmed publisher into the private node, with the namespace's topology declared there.

    Use it with `send(node_publisher, namespace, ...)`; it reconnects by itself after a restart.
    """
    pub = Publisher(private_node.amqp_url)
    connection = await pub.connect()
    await declare_topology(connection, topology_settings.all_topologies())
    yield pub
    await pub.close()


def readiness(service: ServiceProcess) -> int | None:
    """The status of the service's `/readyz` (200 or 503), or None when nothing answers."""
    try:
        return httpx.get(service.health_url, timeout=2).status_code
    except httpx.HTTPError:
        return None


@pytest.fixture
def gateway_process(
    namespace: Namespace, private_node: PrivateRabbitNode, tmp_path: Path
) -> Iterator[ServiceProcess]:
    """A gateway process of the test's namespace, pointed at the private node (not started)."""
    process = gateway(
        namespace.env(AMQP_URL=private_node.amqp_url, COURIER_LOG_LEVEL="INFO"), tmp_path
    )
    yield process
    if process.process is not None:
        process.kill()
