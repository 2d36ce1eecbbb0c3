"""How the CLI tells what a replay or discard did not take: letters a concurrent replay or
discard took, ids it would not take."""

from __future__ import annotations

import json

import pytest

from tests.support.ops_api import Answer, FakeOpsApi
from tests.unit.test_cli_rendering import courier

NEWEST = {"id": "l1", "dead_lettered_at": "2030-01-01T00:00:00+00:00"}
# Counted 62 at the start; by the first request another replay held them all.
TAKEN_BY_ANOTHER = {
    "/dead-letters": Answer({"items": [NEWEST], "next_cursor": None}),
    "/count": Answer({"count": 62}),
    "/replays": Answer({"count": 0, "ids": [], "skipped": {}, "action_id": "a1"}),
}


def test_letters_taken_meanwhile_are_said_not_passed_over() -> None:
    with FakeOpsApi(TAKEN_BY_ANOTHER).running() as api:
        result = courier(api, "dlq", "replay", "--reason", "invalid")
    assert result.exit_code == 0, result.output  # the other replay moves them
    assert "Replayed 0 of 62 dead letter(s)" in result.stdout
    assert "62 taken meanwhile by another replay or discard" in result.stdout


def test_letters_taken_meanwhile_are_in_the_json_document() -> None:
    with FakeOpsApi(TAKEN_BY_ANOTHER).running() as api:
        result = courier(api, "dlq", "replay", "--reason", "invalid", "--json")
    assert json.loads(result.stdout)["taken_meanwhile"] == 62


def test_letters_taken_meanwhile_from_a_batch_that_moved_others_are_said() -> None:
    answers = {**TAKEN_BY_ANOTHER, "/replays": Answer({"count": 40, "ids": [], "action_id": "a1"})}
    with FakeOpsApi(answers).running() as api:
        result = courier(api, "dlq", "replay", "--reason", "invalid", "--batch", "100", "--json")
    assert json.loads(result.stdout)["taken_meanwhile"] == 22


@pytest.mark.parametrize("command", [["replay"], ["discard", "--why", "noise"]])
def test_a_dry_run_names_the_ids_it_would_not_take_and_fails(command: list[str]) -> None:
    # It exited 0 naming none, while the real run names them and exits 1.
    outcome = {"count": 1, "ids": ["l1"], "action_id": "a1", "dry_run": True}
    answers = {"/replays": Answer(outcome), "/discards": Answer(outcome)}
    with FakeOpsApi(answers).running() as api:
        result = courier(api, "dlq", *command, "--id", "l1", "--id", "nosuch", "--dry-run")
    assert result.exit_code == 1, result.output
    assert "would not take: nosuch: unknown, or not dead" in result.stdout


def test_a_replay_waits_for_a_gateway_slower_than_the_rate_asked_for() -> None:
    # A gateway may replay slower than --rate asks (a slow store, a loaded host): a batch of
    # 5,000 at --rate 1000 was given 5 s, took 38 s, and the CLI gave up on a replay that went
    # through. Each batch is given its letters at 200 a second at least.
    outcome = {"count": 500, "ids": [], "skipped": {}, "action_id": "a1"}
    answers = {**TAKEN_BY_ANOTHER, "/count": Answer({"count": 500})}
    answers["/replays"] = Answer(outcome, delay=2.0)  # 250 letters a second
    with FakeOpsApi(answers).running() as api:
        result = courier(
            api, "dlq", "replay", "--all", "--rate", "10000", "--batch", "500", "--timeout", "1"
        )
    assert result.exit_code == 0, result.output
    assert "Replayed 500 of 500 dead letter(s)" in result.stdout
