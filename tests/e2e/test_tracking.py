"""Event status end to end: `GET /v1/events/{id}` follows real processes through every state.

Two systems, each started once for the module (a process takes seconds to start):

* the pipeline: gateway (store on SQLite), processor and notifier — a dataset is summarised,
  its result served, and the derived `dataset.processed` has its own status at the notifier;
* the effect system: gateway (store on PostgreSQL) and the effect service
  (`tests.support.effect_service`: the real consumer runtime as the `notifier`, whose subject
  says how to misbehave) with one 1 s delay tier and no immediate retries — retrying,
  dead-lettered, replayed and duplicate deliveries.

Each test uses its own events, so the tests share the systems without sharing state.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import httpx
import orjson
import pytest

from contracts.envelope import derived_event_id
from tests.conftest import Namespace, _admin
from tests.faults.conftest import Effects
from tests.support.notify_log import notification_lines
from tests.support.polling import eventually_sync
from tests.support.processes import ServiceProcess, base_url, consumer, gateway
from tests.support.queues import TTL_SLACK

pytestmark = [pytest.mark.e2e, pytest.mark.broker]

OPS_AUTH = {"Authorization": "Bearer e2e-test-ops-token"}  # tests.support.processes.gateway
EFFECT_TOPOLOGY = {"COURIER_RETRY_DELAYS": "1"}
# How soon a transition must show in the status: the services report every 0.2 s; the rest is
# the broker and the gateway's store. Generous for a loaded CI machine.
STATUS_LAG_SECONDS = 1.5

T = TypeVar("T")


def run_async(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine on its own loop (module fixtures live outside the tests' loops)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(make())).result()


class System:
    """Service processes in one namespace, and the gateway's HTTP API."""

    def __init__(self, namespace: Namespace, workdir: Path) -> None:
        self.namespace = namespace
        self.workdir = workdir
        self.processes: list[ServiceProcess] = []
        self.gateway: ServiceProcess | None = None
        self.http = httpx.Client(timeout=10)

    def launch(self, process: ServiceProcess) -> ServiceProcess:
        process.log_path = self.workdir / f"{process.name}-{len(self.processes)}.log"
        self.processes.append(process.start())
        return process

    def wait_ready(self) -> None:
        for process in self.processes:
            if process.process is not None and process.process.poll() is None:
                process.wait_ready(60)

    def stop(self) -> None:
        self.http.close()
        for process in self.processes:
            process.kill()

    # --- HTTP ---------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self.gateway is not None
        return base_url(self.gateway)

    def post_event(self, event: dict[str, Any], **kw: Any) -> str:
        response = self.http.post(f"{self.url}/v1/events", json=event, **kw)
        assert response.status_code == 202, response.text
        event_id: str = response.json()["id"]
        return event_id

    def notify(self, subject: str) -> str:
        return self.post_event(
            {"type": "notification.requested", "data": {"recipient": "r", "subject": subject}}
        )

    def status(self, event_id: str) -> dict[str, Any]:
        response = self.http.get(f"{self.url}/v1/events/{event_id}")
        assert response.status_code == 200, (response.status_code, response.text)
        found: dict[str, Any] = response.json()
        return found

    def service_status(self, event_id: str, service: str) -> dict[str, Any]:
        services = self.status(event_id)["services"]
        assert service in services, services
        found: dict[str, Any] = services[service]
        return found

    def wait_state(
        self, event_id: str, service: str, state: str, timeout: float = 20
    ) -> dict[str, Any]:
        def reached() -> dict[str, Any]:
            found = self.service_status(event_id, service)
            assert found["state"] == state, found
            return found

        return eventually_sync(reached, timeout)

    def ops_get(self, path: str, **params: Any) -> Any:
        response = self.http.get(f"{self.url}/v1/ops{path}", params=params, headers=OPS_AUTH)
        assert response.status_code == 200, response.text
        return response.json()

    def ops_post(self, path: str, body: dict[str, Any]) -> Any:
        response = self.http.post(
            f"{self.url}/v1/ops{path}", json=body, headers=OPS_AUTH, timeout=30
        )
        assert response.status_code == 200, response.text
        return response.json()


def states(found: dict[str, Any]) -> list[str]:
    return [step["state"] for step in found["history"]]


def at(value: str) -> datetime:
    return datetime.fromisoformat(value)


@pytest.fixture(scope="module")
def module_namespaces(amqp_url: str) -> Iterator[Callable[[], Namespace]]:
    made: list[Namespace] = []

    def make() -> Namespace:
        made.append(Namespace(amqp_url))
        return made[-1]

    yield make
    for namespace in made:
        run_async(namespace.cleanup)


@pytest.fixture(scope="module")
def module_database(postgres_url: str) -> Iterator[str]:
    name = f"t{uuid.uuid4().hex[:12]}"
    _admin(postgres_url, f'CREATE DATABASE "{name}"')
    try:
        yield postgres_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        _admin(postgres_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class Pipeline(System):
    def __init__(self, namespace: Namespace, workdir: Path) -> None:
        super().__init__(namespace, workdir)
        self.notify_log = workdir / "notifications.jsonl"
        env = namespace.env(
            COURIER_NOTIFY_LOG=str(self.notify_log),
            COURIER_CPU_WORKERS="1",
            COURIER_LOG_LEVEL="INFO",
        )
        self.gateway = self.launch(gateway(env, workdir))
        self.launch(consumer("processor", env, workdir))
        self.launch(consumer("notifier", env, workdir))

    def notifications(self) -> list[dict[str, Any]]:
        return notification_lines(self.notify_log)


class EffectSystem(System):
    def __init__(self, namespace: Namespace, workdir: Path, database_url: str) -> None:
        super().__init__(namespace, workdir)
        self.data_dir = workdir / "effect-data"
        self.data_dir.mkdir()
        self.effects = Effects(self.data_dir)
        env = namespace.env(**EFFECT_TOPOLOGY, COURIER_LOG_LEVEL="INFO")
        self.gateway = self.launch(gateway({**env, "DATABASE_URL": database_url}, workdir))
        self.launch(
            consumer(
                "notifier",
                {
                    **env,
                    "COURIER_DATA_DIR": str(self.data_dir),
                    "COURIER_IMMEDIATE_RETRIES": "0",
                    "COURIER_CPU_WORKERS": "1",
                },
                workdir,
                module="tests.support.effect_service",
            )
        )


@pytest.fixture(scope="module")
def systems(
    module_namespaces: Callable[[], Namespace],
    module_database: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Pipeline, EffectSystem]]:
    """Both systems, started side by side (starting is most of the module's time)."""
    pipeline = Pipeline(module_namespaces(), tmp_path_factory.mktemp("pipeline"))
    effect = EffectSystem(module_namespaces(), tmp_path_factory.mktemp("effects"), module_database)
    try:
        pipeline.wait_ready()
        effect.wait_ready()
        yield pipeline, effect
    finally:
        pipeline.stop()
        effect.stop()


@pytest.fixture
def pipeline(systems: tuple[Pipeline, EffectSystem]) -> Pipeline:
    return systems[0]


@pytest.fixture
def effect(systems: tuple[Pipeline, EffectSystem]) -> EffectSystem:
    return systems[1]


# --- success --------------------------------------------------------------------------------


def test_a_dataset_is_pending_then_processing_then_succeeded_with_its_result(
    pipeline: Pipeline,
) -> None:
    records = [{"price": 10, "sku": "a"}, {"price": 30, "sku": "b"}]
    dataset_id = pipeline.post_event(
        {"type": "dataset.submitted", "data": {"name": "prices", "records": records}}
    )
    processor = pipeline.wait_state(dataset_id, "processor", "succeeded")
    status = pipeline.status(dataset_id)
    assert status["type"] == "dataset.submitted"
    assert list(status["services"]) == ["processor"]
    assert status["result_url"] == f"/v1/datasets/{dataset_id}"
    assert states(processor) == ["pending", "processing", "succeeded"]
    assert [step["attempt"] for step in processor["history"]] == [None, 1, 1]
    times = [at(step["at"]) for step in processor["history"]]
    assert times == sorted(times)
    assert times[0] == at(status["accepted_at"])

    def served() -> dict[str, Any]:
        response = pipeline.http.get(f"{pipeline.url}{status['result_url']}")
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    result = eventually_sync(served, timeout=10)
    assert (result["dataset_id"], result["name"], result["record_count"]) == (
        dataset_id,
        "prices",
        2,
    )
    assert result["fields"]["price"]["mean"] == 20
    assert result["fields"]["sku"]["distinct"] == 2
    processed_id = derived_event_id(dataset_id, "dataset.processed")
    assert result["event_id"] == processed_id

    # The derived event has a status of its own: the notifier announced it.
    notifier = pipeline.wait_state(processed_id, "notifier", "succeeded")
    derived = pipeline.status(processed_id)
    assert derived["type"] == "dataset.processed"
    assert list(derived["services"]) == ["notifier"]
    assert states(notifier) == ["processing", "succeeded"]
    assert "result_url" not in derived
    assert [n["event_id"] for n in pipeline.notifications()].count(processed_id) == 1


def test_a_notification_shows_succeeded_within_about_a_second(effect: EffectSystem) -> None:
    subject = f"plain-{uuid.uuid4()}"
    event_id = effect.notify(subject)

    def effect_done() -> float:
        done = [e.at for e in effect.effects.effects() if e.event_id == event_id]
        assert len(done) == 1, done
        return done[0]

    done_at = eventually_sync(effect_done, timeout=20)
    notifier = effect.wait_state(event_id, "notifier", "succeeded", timeout=10)
    lag = time.time() - done_at
    assert lag < STATUS_LAG_SECONDS, f"succeeded showed {lag:.2f}s after the effect"
    assert states(notifier) == ["pending", "processing", "succeeded"]
    assert notifier["attempt"] == 1


def test_an_unknown_event_is_404(effect: EffectSystem) -> None:
    response = effect.http.get(f"{effect.url}/v1/events/{uuid.uuid4()}")
    assert response.status_code == 404


# --- retry, dead letter, replay ---------------------------------------------------------------


def test_a_transient_failure_shows_retrying_then_succeeded(effect: EffectSystem) -> None:
    event_id = effect.notify("fail:1")
    retrying = effect.wait_state(event_id, "notifier", "retrying", timeout=10)
    assert retrying["attempt"] == 1
    assert "ConnectionError" in retrying["detail"]
    # The 1 s tier, counted from the failure (reported a moment after it).
    next_at = at(retrying["next_attempt_at"])
    assert 0.5 <= (next_at - at(retrying["updated_at"])).total_seconds() <= 1.0

    notifier = effect.wait_state(event_id, "notifier", "succeeded", timeout=15)
    assert notifier["attempt"] == 2
    assert states(notifier) == ["pending", "processing", "retrying", "processing", "succeeded"]
    assert [step["attempt"] for step in notifier["history"]] == [None, 1, 1, 2, 2]
    second_try = at(notifier["history"][3]["at"])
    assert second_try >= next_at - timedelta(seconds=TTL_SLACK)
    assert effect.effects.counts()[event_id] == 1


def test_a_dead_letter_shows_reason_and_group_and_a_replay_moves_it_on(
    effect: EffectSystem,
) -> None:
    broken = effect.data_dir / "broken"  # `fixable` fails while this file exists
    broken.touch()
    try:
        event_id = effect.notify("fixable")
        effect.wait_state(event_id, "notifier", "dead_lettered", timeout=20)
    finally:
        broken.unlink()

    def told_in_full() -> dict[str, Any]:
        # `dead_lettered` comes from the letter, the attempt's `processing` with the next
        # status report (within its interval).
        found = effect.service_status(event_id, "notifier")
        expected = ["pending", "processing", "retrying", "processing", "dead_lettered"]
        assert states(found) == expected, found
        return found

    dead = eventually_sync(told_in_full, timeout=10)
    assert (dead["reason"], dead["attempt"]) == ("retries_exhausted", 2)
    assert "ConnectionError" in dead["detail"]

    # The status names the same group as the operators' view of the dead letter.
    def stored() -> dict[str, Any]:
        letters = effect.ops_get("/dead-letters", service="notifier")["items"]
        found = [item for item in letters if item["event_id"] == event_id]
        assert len(found) == 1, letters  # retried; an unpacking's ValueError would not be
        return dict(found[0])

    letter = eventually_sync(stored, timeout=10)
    assert dead["group"] == letter["group_key"]

    outcome = effect.ops_post("/replays", {"ids": [letter["id"]]})
    assert outcome["count"] == 1
    notifier = effect.wait_state(event_id, "notifier", "succeeded", timeout=15)
    assert states(notifier)[-3:] == ["replayed", "processing", "succeeded"], states(notifier)
    replayed = notifier["history"][-3]
    assert letter["id"] in replayed["detail"]
    assert effect.effects.counts()[event_id] == 1


def test_a_replay_that_fails_again_is_dead_lettered_again(
    effect: EffectSystem,
) -> None:
    """`fail-always`: dead-lettered, replayed, and dead-lettered again; `replayed` and the
    second dead letter are both in the history."""
    event_id = effect.notify("fail-always")
    effect.wait_state(event_id, "notifier", "dead_lettered", timeout=20)

    def stored() -> str:
        letters = effect.ops_get("/dead-letters", service="notifier")["items"]
        found = [item["id"] for item in letters if item["event_id"] == event_id]
        assert len(found) == 1, letters
        return str(found[0])

    letter_id = eventually_sync(stored, timeout=10)
    assert effect.ops_post("/replays", {"ids": [letter_id]})["count"] == 1

    def dead_again() -> dict[str, Any]:
        found = effect.service_status(event_id, "notifier")
        assert states(found).count("dead_lettered") == 2, states(found)
        assert found["state"] == "dead_lettered"
        after_first = states(found)[states(found).index("dead_lettered") + 1 :]
        assert after_first == ["replayed", "processing", "retrying", "processing", "dead_lettered"]
        return found

    eventually_sync(dead_again, timeout=20)
    assert effect.effects.counts()[event_id] == 0


# --- duplicates -------------------------------------------------------------------------------


def test_the_same_event_id_twice_is_one_effect_and_a_skipped_duplicate(
    effect: EffectSystem,
) -> None:
    event_id = f"dup-{uuid.uuid4()}"
    headers = {
        "content-type": "application/json",
        "ce-specversion": "1.0",
        "ce-type": "notification.requested",
        "ce-source": "urn:test",
        "ce-id": event_id,
    }
    body = orjson.dumps({"recipient": "r", "subject": "duplicate"})
    for _ in range(2):
        response = effect.http.post(f"{effect.url}/v1/events", content=body, headers=headers)
        assert response.status_code == 202 and response.json()["id"] == event_id

    def skipped() -> dict[str, Any]:
        found = effect.service_status(event_id, "notifier")
        assert "skipped_duplicate" in states(found), states(found)
        return found

    notifier = eventually_sync(skipped, timeout=15)
    assert states(notifier).count("succeeded") == 1
    assert states(notifier).count("processing") == 1
    assert effect.effects.counts()[event_id] == 1
    # It was processed: too late to cancel, whatever the last delivery was.
    cancel = effect.http.delete(f"{effect.url}/v1/events/{event_id}")
    assert cancel.status_code == 409, (cancel.status_code, cancel.text)
