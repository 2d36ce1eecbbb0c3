"""What `courier` prints of the gateway's answers: data is shown, never obeyed by the terminal.

Dead letters carry text from anyone who can make a message fail (a webhook receiver's answer
becomes the exception message, a header and the traceback), so the human output shows control
characters and invisible format characters as escapes, and never reads markup in data. `--json`
stays the exact document. The CLI runs in process against a canned ops API.
"""

from __future__ import annotations

import json
import re
from typing import Any

from click.testing import CliRunner, Result

from services.ops.cli import cli
from tests.support.ops_api import Answer, FakeOpsApi

# Recolours, retitles the terminal, erases the line, a C1 CSI, DEL, and a bidi override.
HOSTILE = "\x1b[31mRED\x1b[0m \x1b]0;title\x07 \x1b[2K \x9b2J \x7f\u202eoof"
SHOWN = r"\x1b[31mRED\x1b[0m \x1b]0;title\x07 \x1b[2K \x9b2J \x7f\u202eoof"
RAW = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202e]")
"""What must never reach the terminal (newlines may)."""

LETTER_ID = "5d0c7e1e-59b4-4c2e-9a39-1f7a3c1d2b10"
LETTER: dict[str, Any] = {
    "id": LETTER_ID,
    "status": "dead",
    "service": "notifier",
    "queue": "courier.notifier",
    "event_id": "9a1f4f0e-2b7d-4d59-8a55-55c1c6f2e3a1",
    "event_type": "notification.requested",
    "reason": "permanent",
    "attempts": 1,
    "replays": 0,
    "exception_type": "services.notifier.webhook.WebhookRejected",
    "exception_message": f"webhook answered 400: {HOSTILE}",
    "dead_lettered_at": "2025-01-02T03:04:05+00:00",
}
TRACEBACK = (
    "Traceback (most recent call last):\n"
    '  File "services/notifier/webhook.py", line 108, in check_response\n'
    f"services.notifier.webhook.WebhookRejected: webhook answered 400: {HOSTILE}\n"
)
DETAIL: dict[str, Any] = {
    **LETTER,
    "payload": {"type": "notification.requested", "note": HOSTILE},
    "headers": {"courier-last-error": HOSTILE, "courier-traceback": TRACEBACK},
    "traceback": TRACEBACK,
    "history": [{"at": "2025-01-02T03:04:05+00:00", "action": "dead_lettered"}],
    "related": [],
}


def courier(api: FakeOpsApi, *args: str, columns: str = "400") -> Result:
    """`courier <args>` against `api`, as piped output: no colour of rich's own; by default
    wide enough that nothing wraps."""
    env = {
        "COURIER_URL": api.url,
        "COURIER_OPS_TOKEN": "t",
        "COLUMNS": columns,
        "FORCE_COLOR": None,
        "TTY_COMPATIBLE": None,
    }
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def assert_safe(output: str) -> None:
    assert not RAW.findall(output), output


def test_the_list_shows_a_letter_s_control_characters_as_escapes() -> None:
    page = {"items": [LETTER], "next_cursor": None}
    with FakeOpsApi({"/dead-letters": Answer(page)}).running() as api:
        result = courier(api, "dlq", "list")
    assert result.exit_code == 0, result.output
    assert f"WebhookRejected: webhook answered 400: {SHOWN}" in result.stdout
    assert_safe(result.stdout)


def test_show_prints_a_letter_s_control_characters_as_escapes() -> None:
    with FakeOpsApi({f"/dead-letters/{LETTER_ID}": Answer(DETAIL)}).running() as api:
        result = courier(api, "dlq", "show", LETTER_ID)
    assert result.exit_code == 0, result.output
    assert f"webhook answered 400: {SHOWN}" in result.stdout  # the message and the traceback
    assert re.search(rf"courier-last-error +{re.escape(SHOWN)}", result.stdout)
    assert_safe(result.stdout)


def test_show_keeps_the_lines_of_a_traceback() -> None:
    with FakeOpsApi({f"/dead-letters/{LETTER_ID}": Answer(DETAIL)}).running() as api:
        result = courier(api, "dlq", "show", LETTER_ID)
    assert result.exit_code == 0, result.output
    lines = [line.strip("│ ") for line in result.stdout.splitlines()]
    assert lines.index("Traceback (most recent call last):") + 1 == lines.index(
        'File "services/notifier/webhook.py", line 108, in check_response'
    )


def test_show_prints_the_payload_as_json_with_its_control_characters_escaped() -> None:
    with FakeOpsApi({f"/dead-letters/{LETTER_ID}": Answer(DETAIL)}).running() as api:
        result = courier(api, "dlq", "show", LETTER_ID)
    assert result.exit_code == 0, result.output
    escaped = json.dumps(HOSTILE)  # every character JSON can escape, escaped: the same string
    assert f'"note": {escaped}' in result.stdout
    assert_safe(result.stdout)


def test_groups_and_actions_show_control_characters_as_escapes() -> None:
    group = {"group": "g1", "count": 1, "reason": "permanent", "example_message": HOSTILE}
    action = {"id": "a1", "action": "discard", "actor": "ops", "count": 1, "reason": HOSTILE}
    answers = {"/groups": Answer({"groups": [group]}), "/actions": Answer({"actions": [action]})}
    with FakeOpsApi(answers).running() as api:
        results = [courier(api, "dlq", "groups"), courier(api, "dlq", "actions")]
    for result in results:
        assert result.exit_code == 0, result.output
        assert SHOWN in result.stdout
        assert_safe(result.stdout)


def test_markup_in_the_gateway_s_answer_is_printed_as_it_is() -> None:
    # A replay's report quotes why a letter stayed dead; rich read `[red]` there as a style.
    why = "[red]no queue takes[/red] it " + HOSTILE
    outcome = {"count": 0, "ids": [], "skipped": {LETTER_ID: why}, "action_id": "a1"}
    with FakeOpsApi({"/replays": Answer(outcome)}).running() as api:
        result = courier(api, "dlq", "replay", "--id", LETTER_ID)
    assert result.exit_code == 1, result.output  # a letter left dead
    assert f"left dead: {LETTER_ID}: [red]no queue takes[/red] it {SHOWN}" in result.stdout
    assert_safe(result.stdout)


def test_an_error_quoting_the_gateway_shows_its_control_characters_as_escapes() -> None:
    with FakeOpsApi({"/dead-letters": Answer({"detail": HOSTILE}, 400)}).running() as api:
        result = courier(api, "dlq", "list")
    assert result.exit_code == 1
    assert f"the gateway answered 400: {SHOWN}" in result.stderr
    assert_safe(result.stderr)


def test_json_output_is_the_exact_document_with_nothing_raw_for_the_terminal() -> None:
    page = {"items": [LETTER], "next_cursor": None}
    with FakeOpsApi({"/dead-letters": Answer(page)}).running() as api:
        result = courier(api, "dlq", "list", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == page
    assert_safe(result.stdout)


def test_a_list_of_letters_in_every_state_shows_each_ones_status() -> None:
    replayed = {**LETTER, "id": "0b6f9d52-6a55-4a42-8d46-1c2f3e4d5a6b", "status": "replayed"}
    page = {"items": [LETTER, replayed], "next_cursor": None}
    with FakeOpsApi({"/dead-letters": Answer(page)}).running() as api:
        result = courier(api, "dlq", "list", "--status", "any")
    assert result.exit_code == 0, result.output
    assert "2 letter(s), newest first" in result.stdout
    ids = (LETTER_ID, replayed["id"])
    rows = {
        line.split()[0]: line.split()[-1]
        for line in result.stdout.splitlines()
        if line.strip().startswith(ids)
    }
    assert rows == {LETTER_ID: "dead", replayed["id"]: "replayed"}


def test_a_narrow_terminal_gets_one_block_of_lines_a_letter() -> None:
    """At 80 columns a table of nine leaves each a few characters, wrapped letter by letter."""
    page = {"items": [LETTER], "next_cursor": None}
    with FakeOpsApi({"/dead-letters": Answer(page)}).running() as api:
        result = courier(api, "dlq", "list", columns="80")
    assert result.exit_code == 0, result.output
    lines = [line.rstrip() for line in result.stdout.splitlines()]
    assert f"id          {LETTER_ID}" in lines
    assert "event type  notification.requested" in lines
    assert "attempts    1" in lines
    assert_safe(result.stdout)
