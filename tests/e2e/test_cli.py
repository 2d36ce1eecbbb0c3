"""The operators' CLI against a real gateway process, with dead letters made for real.

A notifier process consumes the test namespace: a body that is not an event, published to its
work queue, is dead-lettered as `invalid`; a notification on the unconfigured `webhook` channel,
posted through the gateway, is dead-lettered as `permanent`. The gateway drains both into its
failure store, and the CLI (`courier dlq ...`) reads and moves them over HTTP.

The CLI runs as a real subprocess (`python -m services.ops.cli`) where the entry point, exit code
and stdout/stderr split matter, and in process (click's CliRunner) for polling and filters.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import httpx
import pytest
from click.testing import CliRunner, Result

from contracts.topology import work_queue
from services.messaging.store import open_store, store_url
from services.ops.cli import cli
from services.ops.store import FailureStore
from tests.conftest import Namespace
from tests.integration.test_failure_store import add_all, letter
from tests.support.polling import eventually_sync
from tests.support.processes import REPO, ServiceProcess, base_url, consumer, free_port, gateway
from tests.support.tcp_proxy import ProxyMode, ThreadedTcpProxy

pytestmark = [pytest.mark.e2e, pytest.mark.broker]

TOKEN = "e2e-test-ops-token"  # what tests.support.processes.gateway configures for actor "ops"
WEBHOOK = {
    "type": "notification.requested",
    "data": {
        "channel": "webhook",
        "recipient": "https://hooks.example.org/deploys",
        "subject": "Deployed",
    },
}


@dataclass
class Ops:
    namespace: Namespace
    gateway: ServiceProcess
    notifier: ServiceProcess

    @property
    def url(self) -> str:
        return base_url(self.gateway)

    def env(self, **overrides: str | None) -> dict[str, str | None]:
        return {"COURIER_URL": self.url, "COURIER_OPS_TOKEN": TOKEN, **overrides}

    def invoke(self, *args: str, **env: str | None) -> Result:
        """`courier <args>` in process."""
        return CliRunner().invoke(cli, list(args), env=self.env(**env), catch_exceptions=False)

    def json(self, *args: str) -> Any:
        result = self.invoke(*args, "--json")
        assert result.exit_code == 0, (result.stdout, result.stderr)
        return json.loads(result.stdout)

    def run(self, *args: str, **env: str | None) -> subprocess.CompletedProcess[str]:
        """`courier <args>` as a real process."""
        merged = {**os.environ, "PYTHONPATH": str(REPO)}
        for key, value in self.env(**env).items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = value
        merged.pop("COLUMNS", None)
        return subprocess.run(
            [sys.executable, "-m", "services.ops.cli", *args],
            env=merged,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def dead_letter_junk(self, count: int) -> list[str]:
        """Publish `count` bodies that are not events to the notifier; their message ids."""
        ids = [str(uuid.uuid4()) for _ in range(count)]

        async def publish() -> None:
            connection = await aio_pika.connect(self.namespace.amqp_url)
            async with connection:
                channel = await connection.channel()  # publisher confirms on
                for n, message_id in enumerate(ids):
                    await channel.default_exchange.publish(
                        aio_pika.Message(
                            json.dumps({"hello": "[bold]not an event[/bold]", "n": n}).encode(),
                            message_id=message_id,
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        ),
                        routing_key=work_queue(self.namespace.name, "notifier"),
                    )

        asyncio.run(publish())
        return ids

    def dead_letter_webhook(self) -> str:
        response = httpx.post(f"{self.url}/v1/events", json=WEBHOOK, timeout=10)
        assert response.status_code == 202, response.text
        return str(response.json()["id"])

    def wait_listed(self, count: int, *args: str) -> list[dict[str, Any]]:
        def listed() -> list[dict[str, Any]]:
            items: list[dict[str, Any]] = self.json("dlq", "list", "--limit", "500", *args)["items"]
            assert len(items) == count, items
            return items

        return eventually_sync(listed, timeout=20)


@contextmanager
def running(namespace: Namespace, workdir: Path, amqp_url: str | None = None) -> Iterator[Ops]:
    """Gateway (through `amqp_url` if given) and notifier processes in the test's namespace."""
    env = namespace.env(COURIER_LOG_LEVEL="WARNING", COURIER_NOTIFY_LOG=str(workdir / "n.jsonl"))
    gateway_env = env if amqp_url is None else {**env, "AMQP_URL": amqp_url}
    services = (gateway(gateway_env, workdir).start(), consumer("notifier", env, workdir).start())
    try:
        for service in services:
            service.wait_ready()
        yield Ops(namespace, *services)
    finally:
        for service in services:
            service.kill()


@pytest.fixture
def ops(namespace: Namespace, tmp_path: Path) -> Iterator[Ops]:
    with running(namespace, tmp_path) as system:
        yield system


def ids_of(items: Sequence[dict[str, Any]]) -> set[str]:
    return {item["id"] for item in items}


def test_list_filters_show_and_groups(ops: Ops) -> None:
    junk = ops.dead_letter_junk(3)
    webhook_event = ops.dead_letter_webhook()
    items = ops.wait_listed(4)

    # The table, from the real entry point: every id, reason and error, nothing on stderr.
    table = ops.run("dlq", "list")
    assert table.returncode == 0, table.stderr
    assert all(item["id"] in table.stdout for item in items)
    assert "4 dead letter(s)" in table.stdout
    assert "permanent" in table.stdout and "invalid" in table.stdout
    assert "the 'webhook' channel is not configured" in table.stdout
    assert table.stderr == ""

    # --json: one document on stdout, newest first.
    listed = ops.run("dlq", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    document = json.loads(listed.stdout)
    assert document["next_cursor"] is None
    times = [item["dead_lettered_at"] for item in document["items"]]
    assert times == sorted(times, reverse=True)

    # Filters narrow the selection the same way the API does.
    invalid = ops.json("dlq", "list", "--reason", "invalid")["items"]
    assert {item["event_id"] for item in invalid} == set(junk)
    [permanent] = ops.json("dlq", "list", "--event-type", "notification.requested")["items"]
    assert (permanent["event_id"], permanent["reason"]) == (webhook_event, "permanent")
    assert ops.json("dlq", "list", "--text", "WEBHOOK")["items"] == [permanent]
    exception_type = permanent["exception_type"]
    assert ops.json("dlq", "list", "--exception-type", exception_type)["items"] == [permanent]
    assert len(ops.json("dlq", "list", "--group", invalid[0]["group_key"])["items"]) == 3
    assert len(ops.json("dlq", "list", "--service", "notifier", "--since", "1h")["items"]) == 4
    assert ops.json("dlq", "list", "--service", "processor")["items"] == []
    assert ops.json("dlq", "list", "--until", "1h")["items"] == []
    assert ops.json("dlq", "list", "--status", "discarded")["items"] == []

    # Paging: a cursor continues where a page ended; --all-pages follows it to the end.
    first = ops.json("dlq", "list", "--limit", "3")
    assert len(first["items"]) == 3 and first["next_cursor"]
    rest = ops.json("dlq", "list", "--limit", "3", "--cursor", first["next_cursor"])
    assert ids_of(first["items"]) | ids_of(rest["items"]) == ids_of(items)
    assert rest["next_cursor"] is None
    everything = ops.json("dlq", "list", "--limit", "1", "--all-pages")
    assert [i["id"] for i in everything["items"]] == [i["id"] for i in document["items"]]
    assert everything["next_cursor"] is None
    more = ops.invoke("dlq", "list", "--limit", "1")
    assert "--cursor" in more.stderr

    # show: payload, headers, error, traceback, attempts, times, history.
    letter_id = invalid[0]["id"]
    shown = ops.run("dlq", "show", letter_id)
    assert shown.returncode == 0, shown.stderr
    for expected in (
        letter_id,
        "[bold]not an event[/bold]",  # data is printed as text, never as markup
        "courier-reason",
        "ValidationError",
        "Traceback (most recent call last)",
        "first failure",
        "dead_lettered",
    ):
        assert expected in shown.stdout, expected
    detail = ops.json("dlq", "show", letter_id)
    assert detail["payload"]["hello"] == "[bold]not an event[/bold]"
    assert detail["headers"]["courier-reason"] == "invalid"
    assert "ValidationError" in detail["traceback"]
    assert (detail["attempts"], detail["replays"]) == (1, 0)
    assert [entry["action"] for entry in detail["history"]] == ["dead_lettered"]
    assert detail["related"] == []

    missing = ops.run("dlq", "show", "no-such-letter")
    assert missing.returncode == 1
    assert "no dead letter 'no-such-letter'" in missing.stderr
    assert missing.stdout == ""

    # groups: one per cause, largest first.
    found = ops.json("dlq", "groups")["groups"]
    assert [(g["count"], g["reason"]) for g in found] == [(3, "invalid"), (1, "permanent")]
    assert found[1]["services"] == ["notifier"]
    assert found[1]["event_types"] == ["notification.requested"]
    assert found[1]["example_message"] == "the 'webhook' channel is not configured"
    grouped = ops.run("dlq", "groups")
    assert grouped.returncode == 0, grouped.stderr
    assert found[0]["group"] in grouped.stdout and found[1]["group"] in grouped.stdout
    assert ops.json("dlq", "groups", "--reason", "permanent")["groups"] == [found[1]]


def test_replay_moves_dead_letters_back_to_their_work_queue(ops: Ops) -> None:
    junk = ops.dead_letter_junk(3)
    originals = ops.wait_listed(3)

    # A dry run says what would move, moves nothing, and is audited.
    dry = ops.run("dlq", "replay", "--reason", "invalid", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    outcome = json.loads(dry.stdout)
    assert (outcome["dry_run"], outcome["count"]) == (True, 3)
    assert set(outcome["ids"]) == ids_of(originals)
    assert ids_of(ops.json("dlq", "list")["items"]) == ids_of(originals)
    assert ops.json("dlq", "list", "--status", "replayed")["items"] == []

    # By filter, oldest first, in batches of one up to --limit, with progress on stderr. The
    # notifier dead-letters the replayed bodies again meanwhile: the run's selection is frozen
    # when it starts, so it never takes those.
    two = ops.run(
        "dlq", "replay", "--reason", "invalid", "--limit", "2", "--batch", "1", "--rate", "50"
    )
    assert two.returncode == 0, two.stderr
    assert "Replayed 2 of 2 dead letter(s)" in two.stdout
    assert "Replayed 1/2" in two.stderr and "Replayed 2/2" in two.stderr

    # By id: exactly that one (the newest, which the limited run left).
    one = ops.run("dlq", "replay", "--id", originals[0]["id"], "--json")
    assert one.returncode == 0, one.stderr
    assert json.loads(one.stdout)["ids"] == [originals[0]["id"]]

    # The effect: every body went back through the notifier and failed again, as a replay.
    again = ops.wait_listed(3)
    assert not ids_of(again) & ids_of(originals)
    assert all(item["replays"] == 1 for item in again)
    assert {item["event_id"] for item in again} == set(junk)
    replayed = ops.json("dlq", "list", "--status", "replayed")["items"]
    assert ids_of(replayed) == ids_of(originals)

    detail = ops.json("dlq", "show", again[0]["id"])
    [earlier] = detail["related"]
    assert (earlier["status"], earlier["replays"]) == ("replayed", 0)
    history = ops.json("dlq", "show", earlier["id"])["history"]
    assert [(h["action"], h.get("actor")) for h in history] == [
        ("dead_lettered", None),
        ("replayed", "ops"),
    ]

    trail = ops.json("dlq", "actions")["actions"]
    replays = [a for a in trail if a["action"] == "replay"]
    assert sorted((a["dry_run"], a["count"]) for a in replays) == [
        (False, 1),
        (False, 1),
        (False, 1),
        (True, 3),
    ]


def test_a_replay_takes_letters_without_a_home_once_and_exits_1(ops: Ops, tmp_path: Path) -> None:
    # They stay dead and the oldest: every batch took them again, and a batch of them alone
    # (nothing moved) ended the run early, leaving the replayable letters dead, with exit 0.
    homeless = [letter(service="retired", queue=f"{ops.namespace.name}.retired") for _ in range(3)]

    async def seed() -> None:
        engine = open_store(store_url(None, tmp_path / "gateway-data", "gateway"))
        try:
            await add_all(FailureStore(engine), homeless)
        finally:
            await engine.dispose()

    asyncio.run(seed())
    junk = ops.dead_letter_junk(3)
    ops.wait_listed(6)
    run = ops.run("dlq", "replay", "--all", "--batch", "2", "--rate", "1000", "--json")
    assert run.returncode == 1, run.stderr
    outcome = json.loads(run.stdout)
    assert (outcome["total"], outcome["count"]) == (6, 3)
    assert set(outcome["skipped"]) == {item.id for item in homeless}
    again = ops.wait_listed(3, "--service", "notifier")  # the junk failed again, as replays
    assert {item["event_id"] for item in again} == set(junk)


def test_discard_needs_a_reason_and_is_audited(ops: Ops) -> None:
    ops.dead_letter_junk(2)
    letters = ops.wait_listed(2)

    no_reason = ops.run("dlq", "discard", "--reason", "invalid")
    assert no_reason.returncode == 2
    assert "--why" in no_reason.stderr

    dry = ops.json("dlq", "discard", "--all", "--why", "looking", "--dry-run")
    assert (dry["dry_run"], dry["count"]) == (True, 2)
    assert ids_of(ops.json("dlq", "list")["items"]) == ids_of(letters)

    why = "the producer sent garbage; fixed in v2"
    gone = ops.run("dlq", "discard", "--reason", "invalid", "--why", why, "--json")
    assert gone.returncode == 0, gone.stderr
    outcome = json.loads(gone.stdout)
    assert (outcome["count"], set(outcome["ids"])) == (2, ids_of(letters))
    assert ops.json("dlq", "list")["items"] == []
    assert ids_of(ops.json("dlq", "list", "--status", "discarded")["items"]) == ids_of(letters)
    last = ops.json("dlq", "show", letters[0]["id"])["history"][-1]
    assert (last["action"], last["actor"], last["reason"]) == ("discarded", "ops", why)

    trail = ops.json("dlq", "actions")["actions"]
    assert [(a["action"], a["dry_run"], a["count"], a["actor"]) for a in trail] == [
        ("discard", False, 2, "ops"),
        ("discard", True, 2, "ops"),
    ]
    assert trail[0]["reason"] == why
    assert trail[0]["selection"]["reason"] == "invalid"
    table = ops.run("dlq", "actions")
    assert table.returncode == 0, table.stderr
    assert why in table.stdout and trail[0]["id"] in table.stdout

    nothing = ops.run("dlq", "replay", "--all")
    assert nothing.returncode == 0, nothing.stderr
    assert "nothing to do" in nothing.stdout


def test_an_id_that_was_not_taken_exits_1_and_is_named(ops: Ops) -> None:
    """A script asking for ids must not take "0 of 1" for done: the id is unknown, or no
    longer dead (discarded here first)."""
    ops.dead_letter_junk(1)
    [letter] = ops.wait_listed(1)
    kept = ops.run("dlq", "discard", "--id", letter["id"], "--why", "first")
    assert kept.returncode == 0, kept.stderr
    for command in (("replay",), ("discard", "--why", "again")):
        again = ops.run("dlq", *command, "--id", letter["id"], "--id", "no-such-letter")
        assert again.returncode == 1, again.stdout + again.stderr
        assert f"not taken: {letter['id']}" in again.stdout
        assert "not taken: no-such-letter" in again.stdout
    document = ops.run("dlq", "replay", "--id", "no-such-letter", "--json")
    assert document.returncode == 1
    assert json.loads(document.stdout)["not_taken"] == ["no-such-letter"]


def test_an_id_given_twice_is_one_letter(ops: Ops) -> None:
    # Counted twice, one replayed letter read "Replayed 1 of 2".
    ops.dead_letter_junk(1)
    [letter] = ops.wait_listed(1)
    done = ops.run("dlq", "replay", "--id", letter["id"], "--id", letter["id"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Replayed 1 of 1 dead letter(s)" in done.stdout


def test_failures_exit_non_zero_with_a_clear_message(ops: Ops) -> None:
    wrong = ops.run("dlq", "list", COURIER_OPS_TOKEN="not-the-token")
    assert wrong.returncode == 3
    assert "refused this ops token (403)" in wrong.stderr
    assert "not-the-token" not in wrong.stdout + wrong.stderr
    assert wrong.stdout == ""

    wrong_json = ops.run("dlq", "list", "--json", "--token", "not-the-token")
    assert wrong_json.returncode == 3
    assert json.loads(wrong_json.stdout)["error"]["status"] == 403

    missing = ops.run("dlq", "groups", COURIER_OPS_TOKEN=None)
    assert missing.returncode == 3
    assert "no ops token" in missing.stderr

    nowhere = ops.run("dlq", "actions", COURIER_URL=f"http://127.0.0.1:{free_port()}")
    assert nowhere.returncode == 4
    assert "cannot reach the gateway" in nowhere.stderr

    unselected = ops.run("dlq", "replay")
    assert unselected.returncode == 2
    assert "--all" in unselected.stderr

    bad_time = ops.invoke("dlq", "list", "--since", "last tuesday")
    assert bad_time.exit_code == 2
    assert "neither an ISO 8601 time" in bad_time.stderr


def test_a_replay_while_the_broker_is_away_exits_5_and_loses_nothing(
    namespace: Namespace, tmp_path: Path
) -> None:
    broker = urlsplit(namespace.amqp_url)
    with ThreadedTcpProxy(broker.hostname or "127.0.0.1", broker.port or 5672) as proxy:
        proxied = broker._replace(
            netloc=f"{broker.username}:{broker.password}@127.0.0.1:{proxy.port}"
        ).geturl()
        with running(namespace, tmp_path, amqp_url=proxied) as ops:
            ops.dead_letter_junk(2)
            letters = ops.wait_listed(2)

            proxy.set_mode(ProxyMode.REFUSE)  # the gateway loses the broker, and stays away
            proxy.reset_all()

            def gateway_unready() -> None:
                assert not ops.gateway.ready()

            eventually_sync(gateway_unready, timeout=10)

            failed = ops.run("dlq", "replay", "--all", "--json")
            assert failed.returncode == 5, failed.stderr
            assert "unavailable (503)" in failed.stderr
            document = json.loads(failed.stdout)
            assert document["error"]["status"] == 503
            assert (document["count"], document["total"]) == (0, 2)
            # Nothing moved, nothing lost: both are dead and claimable again at once.
            assert ids_of(ops.json("dlq", "list")["items"]) == ids_of(letters)

            proxy.set_mode(ProxyMode.PASS)
            ops.gateway.wait_ready()
            moved = ops.run("dlq", "replay", "--all", "--json")
            assert moved.returncode == 0, moved.stderr
            assert json.loads(moved.stdout)["count"] == 2


@pytest.mark.parametrize("command", [["discard", "--why", "x"], ["replay"]])
def test_an_empty_filter_is_a_usage_error_not_a_selection_of_everything(
    command: list[str],
) -> None:
    # `--text "$PATTERN"` with PATTERN unset: an empty text narrows nothing.
    env = {"COURIER_URL": f"http://127.0.0.1:{free_port()}", "COURIER_OPS_TOKEN": "t"}
    result = CliRunner().invoke(cli, ["dlq", *command, "--text", ""], env=env)
    assert result.exit_code == 2, result.output
    assert "must not be empty" in result.stderr


def test_an_empty_reason_to_discard_is_a_usage_error() -> None:
    # It reached the gateway, whose 422 read as a stop midway: "discarded 0 of 1", exit 1.
    env = {"COURIER_URL": f"http://127.0.0.1:{free_port()}", "COURIER_OPS_TOKEN": "t"}
    result = CliRunner().invoke(cli, ["dlq", "discard", "--all", "--why", ""], env=env)
    assert result.exit_code == 2, result.output
    assert "must not be empty" in result.stderr


@pytest.mark.parametrize(
    "since", ["99999999h", "1000000d", "9999-12-31T23:59:59-05:00", "0001-01-01T00:00:00+05:00"]
)
def test_a_time_out_of_range_is_a_usage_error_not_a_traceback(since: str) -> None:
    # OverflowError escaped the parsing: a traceback, exit 1, and no JSON with --json.
    env = {"COURIER_URL": f"http://127.0.0.1:{free_port()}", "COURIER_OPS_TOKEN": "t"}
    result = CliRunner().invoke(cli, ["dlq", "list", "--since", since, "--json"], env=env)
    assert result.exit_code == 2, result.output
    assert "out of range" in result.stderr


def test_a_date_that_does_not_exist_is_not_called_out_of_range() -> None:
    env = {"COURIER_URL": f"http://127.0.0.1:{free_port()}", "COURIER_OPS_TOKEN": "t"}
    result = CliRunner().invoke(cli, ["dlq", "list", "--since", "2024-02-30"], env=env)
    assert result.exit_code == 2, result.output
    assert "neither an ISO 8601 time" in result.stderr


def test_an_empty_id_is_a_usage_error_not_the_gateway_s_redirect() -> None:
    # `GET /v1/ops/dead-letters/` redirects: "the gateway answered 307", exit 1.
    env = {"COURIER_URL": f"http://127.0.0.1:{free_port()}", "COURIER_OPS_TOKEN": "t"}
    result = CliRunner().invoke(cli, ["dlq", "show", ""], env=env)
    assert result.exit_code == 2, result.output
    assert "must not be empty" in result.stderr
