"""Replaying and discarding dead letters, end to end with real processes.

A gateway process (which drains the dead-letter queues into its failure store and serves the
ops API) and the effect service (`tests.support.effect_service`, the real consumer runtime whose
effects are rows in its own store). Events with the subject `fixable` fail while the file
`<data dir>/broken` exists: they exhaust their retries and become dead letters; removing the
file is the fix, and a replay must then produce each effect exactly once.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from contracts.topology import work_queue
from tests.conftest import Namespace
from tests.faults.conftest import Effects
from tests.support.polling import eventually_sync
from tests.support.processes import ServiceProcess, base_url, consumer, gateway
from tests.support.queues import assert_empty

pytestmark = [pytest.mark.e2e, pytest.mark.broker]

ACTOR = "ops"  # the token's name in the gateway process's COURIER_OPS_TOKENS
AUTH = {"Authorization": "Bearer e2e-test-ops-token"}
TOPOLOGY = {"COURIER_RETRY_DELAYS": "1"}


class ReplaySystem:
    """Gateway and effect service as processes in one namespace, and the ops API as a client."""

    def __init__(self, namespace: Namespace, workdir: Path) -> None:
        self.namespace = namespace
        self.workdir = workdir
        self.data_dir = workdir / "effect-data"
        self.data_dir.mkdir()
        self.effects = Effects(self.data_dir)
        self.processes: list[ServiceProcess] = []
        self.gateway: ServiceProcess | None = None
        self.service: ServiceProcess | None = None

    # --- processes ----------------------------------------------------------------------------

    def start(self, **gateway_env: str) -> ReplaySystem:
        """Start the gateway and the effect service side by side; return once both are ready."""
        self.gateway = self._launch_gateway(**gateway_env)
        self.service = self._launch_service()
        self.gateway.wait_ready()
        self.service.wait_ready()
        return self

    def start_gateway(self, **env: str) -> ServiceProcess:
        self.gateway = self._launch_gateway(**env).wait_ready()
        return self.gateway

    def start_service(self) -> ServiceProcess:
        self.service = self._launch_service().wait_ready()
        return self.service

    def _launch_gateway(self, **env: str) -> ServiceProcess:
        environment = self.namespace.env(**TOPOLOGY, COURIER_LOG_LEVEL="INFO", **env)
        process = gateway(environment, self.workdir)
        self.processes.append(process.start())
        return process

    def _launch_service(self) -> ServiceProcess:
        environment = self.namespace.env(
            **TOPOLOGY,
            COURIER_DATA_DIR=str(self.data_dir),
            COURIER_IMMEDIATE_RETRIES="0",
            COURIER_CPU_WORKERS="1",
            COURIER_LOG_LEVEL="INFO",
        )
        process = consumer(
            "notifier", environment, self.workdir, module="tests.support.effect_service"
        )
        process.log_path = self.workdir / f"effect-service-{len(self.processes)}.log"
        self.processes.append(process.start())
        return process

    def stop(self) -> None:
        for process in self.processes:
            process.kill()

    # --- the failure and its fix --------------------------------------------------------------

    def break_service(self) -> None:
        (self.data_dir / "broken").touch()

    def fix_service(self) -> None:
        (self.data_dir / "broken").unlink()

    # --- the gateway's APIs -------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self.gateway is not None
        return base_url(self.gateway)

    def send(self, count: int, subject: str = "fixable") -> list[str]:
        events = [
            {"type": "notification.requested", "data": {"recipient": "r", "subject": subject}}
            for _ in range(count)
        ]
        response = httpx.post(f"{self.url}/v1/events/batch", json=events, timeout=10)
        assert response.status_code == 202, response.text
        return [event["id"] for event in response.json()["events"]]

    def get(self, path: str, **params: Any) -> Any:
        response = httpx.get(f"{self.url}/v1/ops{path}", params=params, headers=AUTH, timeout=10)
        assert response.status_code == 200, response.text
        return response.json()

    def post(self, path: str, body: dict[str, Any], timeout: float = 30) -> dict[str, Any]:
        response = httpx.post(f"{self.url}/v1/ops{path}", json=body, headers=AUTH, timeout=timeout)
        assert response.status_code == 200, response.text
        outcome: dict[str, Any] = response.json()
        return outcome

    def letters(self, **params: Any) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.get("/dead-letters", limit=500, **params)["items"]
        return items

    def show(self, letter_id: str) -> dict[str, Any]:
        shown: dict[str, Any] = self.get(f"/dead-letters/{letter_id}")
        return shown

    def actions(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.get("/actions")["actions"]
        return found

    def wait_for_one_group(self, event_ids: list[str], timeout: float = 20) -> str:
        """Wait until every event is a dead letter, all in one group; that group."""

        def dead() -> str:
            groups = self.get("/groups", service="notifier")["groups"]
            assert [g["count"] for g in groups] == [len(event_ids)], groups
            letters = self.letters(group=groups[0]["group"])
            assert sorted(item["event_id"] for item in letters) == sorted(event_ids)
            return str(groups[0]["group"])

        return eventually_sync(dead, timeout)

    def wait_for_effects(self, event_ids: list[str], timeout: float = 20) -> None:
        """Each event has exactly one effect (and no other event has any)."""

        def once_each() -> None:
            assert self.effects.counts() == Counter(event_ids)

        eventually_sync(once_each, timeout)


@pytest.fixture
def system(namespace: Namespace, tmp_path: Path) -> Iterator[ReplaySystem]:
    running = ReplaySystem(namespace, tmp_path)
    try:
        yield running
    finally:
        running.stop()


def recent(at: str) -> bool:
    return datetime.now(UTC) - datetime.fromisoformat(at) < timedelta(minutes=2)


def test_a_fixed_group_is_replayed_and_each_effect_happens_once(system: ReplaySystem) -> None:
    system.break_service()
    system.start()
    assert system.service is not None
    service = system.service
    sent = system.send(10)
    group = system.wait_for_one_group(sent)
    for item in system.letters(group=group):
        assert (item["reason"], item["attempts"], item["replays"]) == ("retries_exhausted", 2, 0)
        assert item["service"] == "notifier"
        assert item["exception_type"] == "builtins.ConnectionError"
    assert system.effects.counts() == Counter()

    # The operator takes the service down to fix it; a dry run shows what a replay would move.
    assert service.terminate() == 0
    dry = system.post("/replays", {"group": group, "dry_run": True})
    assert (dry["dry_run"], dry["count"]) == (True, 10)
    assert {system.show(i)["event_id"] for i in dry["ids"]} == set(sent)
    asyncio.run(
        assert_empty(system.namespace.amqp_url, [work_queue(system.namespace.name, "notifier")])
    )
    assert len(system.letters(group=group)) == 10  # still dead, none claimed
    [dry_action] = system.actions()
    assert (dry_action["action"], dry_action["dry_run"], dry_action["count"]) == (
        "replay",
        True,
        10,
    )
    assert dry_action["id"] == dry["action_id"] and dry_action["actor"] == ACTOR

    system.fix_service()
    system.start_service()
    outcome = system.post("/replays", {"group": group})
    assert (outcome["dry_run"], outcome["count"], outcome["error"]) == (False, 10, None)
    system.wait_for_effects(sent)

    assert system.letters(group=group) == []
    replayed = system.letters(group=group, status="replayed")
    assert sorted(item["id"] for item in replayed) == sorted(outcome["ids"])
    history = system.show(replayed[0]["id"])["history"]
    assert [entry["action"] for entry in history] == ["dead_lettered", "replayed"]
    assert (history[-1]["actor"], history[-1]["action_id"]) == (ACTOR, outcome["action_id"])
    action, _ = system.actions()
    assert (action["id"], action["action"], action["actor"]) == (
        outcome["action_id"],
        "replay",
        ACTOR,
    )
    assert (action["dry_run"], action["count"], action["selection"]["group"]) == (False, 10, group)
    assert recent(action["at"])
    # Nothing came back: no new dead letter anywhere.
    assert system.get("/groups")["groups"] == []


def test_a_replay_that_fails_again_comes_back_linked_to_its_earlier_letter(
    system: ReplaySystem,
) -> None:
    system.break_service()
    system.start()
    [event_id] = system.send(1)
    system.wait_for_one_group([event_id])
    [first] = system.letters()

    # Replayed before the fix: it fails again and returns to the dead-letter queue.
    assert system.post("/replays", {"ids": [first["id"]]})["count"] == 1

    def back() -> dict[str, Any]:
        found = system.letters()
        assert len(found) == 1 and found[0]["id"] != first["id"], found
        return found[0]

    second = eventually_sync(back, timeout=20)
    assert (second["event_id"], second["replays"], second["reason"]) == (
        event_id,
        1,
        "retries_exhausted",
    )
    assert second["group_key"] == first["group_key"]
    shown = system.show(second["id"])
    assert shown["headers"]["courier-replays"] == 1
    assert [(r["id"], r["status"], r["replays"]) for r in shown["related"]] == [
        (first["id"], "replayed", 0)
    ]
    assert [r["id"] for r in system.show(first["id"])["related"]] == [second["id"]]

    # Fixed, the second replay succeeds: one effect for the event, however often it failed.
    system.fix_service()
    assert system.post("/replays", {"ids": [second["id"]]})["count"] == 1
    system.wait_for_effects([event_id])
    assert system.letters() == []


def test_concurrent_replays_of_one_group_move_each_letter_once(system: ReplaySystem) -> None:
    system.break_service()
    system.start()
    sent = system.send(20)
    group = system.wait_for_one_group(sent)
    system.fix_service()

    with ThreadPoolExecutor(3) as pool:
        futures = [
            pool.submit(system.post, "/replays", {"group": group, "rate": 40}) for _ in range(3)
        ]
        outcomes = [future.result() for future in futures]

    assert sum(outcome["count"] for outcome in outcomes) == 20
    moved = [letter_id for outcome in outcomes for letter_id in outcome["ids"]]
    assert len(moved) == len(set(moved)) == 20
    system.wait_for_effects(sent)
    assert len(system.letters(group=group, status="replayed")) == 20
    assert sorted(a["count"] for a in system.actions()) == sorted(o["count"] for o in outcomes)


def test_a_replay_killed_midway_loses_nothing_and_repeats_no_effect(
    system: ReplaySystem,
) -> None:
    system.break_service()
    system.start(COURIER_REPLAY_LEASE_SECONDS="1")
    first_gateway = system.gateway
    assert first_gateway is not None
    sent = system.send(20)
    group = system.wait_for_one_group(sent)
    system.fix_service()

    # A slow replay (5 letters a second); the gateway dies under it.
    with ThreadPoolExecutor(1) as pool:
        slow: Future[dict[str, Any]] = pool.submit(
            system.post, "/replays", {"group": group, "rate": 5}
        )

        def under_way() -> None:
            assert len(system.effects.counts()) >= 5

        eventually_sync(under_way, timeout=20)
        first_gateway.kill()
        assert isinstance(slow.exception(timeout=10), httpx.TransportError)

    system.start_gateway(COURIER_REPLAY_LEASE_SECONDS="1")
    marked = {item["id"] for item in system.letters(group=group, status="replayed")}
    assert 0 < len(marked) < 20, "the kill did not land mid-way: the test proves nothing"

    # Once the dead replay's lease ran out, a new replay takes over what it left.
    moved: list[str] = []

    def everything_replayed() -> None:
        outcome = system.post("/replays", {"group": group, "rate": 100})
        moved.extend(outcome["ids"])
        assert len(system.letters(group=group, status="replayed")) == 20
        assert system.letters(group=group) == []

    eventually_sync(everything_replayed, timeout=20)
    assert not marked & set(moved)  # a letter marked replayed is never moved again
    assert len(marked) + len(moved) == 20
    system.wait_for_effects(sent)


def test_a_discard_closes_the_group_with_who_when_and_why(system: ReplaySystem) -> None:
    system.break_service()
    system.start()
    sent = system.send(3)
    group = system.wait_for_one_group(sent)

    why = "recipients were deleted upstream; nothing to deliver"
    dry = system.post("/discards", {"group": group, "why": why, "dry_run": True})
    assert (dry["dry_run"], dry["count"]) == (True, 3)
    assert len(system.letters(group=group)) == 3

    outcome = system.post("/discards", {"group": group, "why": why})
    assert (outcome["dry_run"], outcome["count"]) == (False, 3)
    assert system.letters(group=group) == []
    discarded = system.letters(group=group, status="discarded")
    assert sorted(item["id"] for item in discarded) == sorted(outcome["ids"])
    for item in discarded:
        shown = system.show(item["id"])
        assert shown["closed_at"] is not None and recent(shown["closed_at"])
        entry = shown["history"][-1]
        assert (entry["action"], entry["actor"], entry["reason"], entry["action_id"]) == (
            "discarded",
            ACTOR,
            why,
            outcome["action_id"],
        )
        assert recent(entry["at"])
    action, dry_action = system.actions()
    assert (action["id"], action["action"], action["actor"], action["reason"]) == (
        outcome["action_id"],
        "discard",
        ACTOR,
        why,
    )
    assert (action["count"], action["dry_run"], action["selection"]["group"]) == (3, False, group)
    assert recent(action["at"])
    assert (dry_action["dry_run"], dry_action["reason"]) == (True, why)

    # Discarded letters are not replayed: the fix comes too late for them, by decision.
    system.fix_service()
    assert system.post("/replays", {"group": group})["count"] == 0
    assert system.effects.counts() == Counter()
