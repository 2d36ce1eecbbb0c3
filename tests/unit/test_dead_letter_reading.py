"""Reading dead letters the broker made itself (no Courier headers, only x-death)."""

from __future__ import annotations

from datetime import UTC, datetime

from services.messaging.dead_letters import plain, read_dead_letter
from tests.integration.test_failure_store import letter

NOW = datetime(2030, 1, 1, tzinfo=UTC)


def test_a_crash_looping_message_that_was_retried_before_names_its_work_queue() -> None:
    # It expired out of a delay tier first, then hit the delivery limit in its work queue:
    # x-death lists the newest death first; x-first-death-* still names the tier.
    headers = {
        "x-death": [
            {"queue": "ns.processor", "reason": "delivery_limit", "count": 1, "time": NOW},
            {"queue": "ns.processor.retry.5s", "reason": "expired", "count": 1, "time": NOW},
        ],
        "x-first-death-queue": "ns.processor.retry.5s",
        "x-first-death-reason": "expired",
        "courier-attempt": 2,
    }
    letter = read_dead_letter(
        "ns",
        body=b"{}",
        headers=headers,
        message_id="e-1",
        message_type="dataset.submitted",
        correlation_id=None,
        now=NOW,
    )
    assert (letter.service, letter.queue, letter.reason) == (
        "processor",
        "ns.processor",
        "delivery_limit",
    )
    assert letter.attempts == 2


# --- the plain form the drain falls back to ---------------------------------------------------


def test_an_ordinary_dead_letter_is_its_own_plain_form() -> None:
    ordinary = letter(traceback="Traceback (most recent call last):\n\tboom", headers={"n": 3})
    assert plain(ordinary) == ordinary


def test_the_plain_form_escapes_what_a_store_cannot_hold_and_keeps_the_body() -> None:
    refused = letter(
        event_id="m\x00-1",
        exception_message="bad \ud800 text",
        attempts=2**40,
        headers={"x-custom": "a\x00b", "x-big": 2**40, "nested": [{"k\x00": "v"}]},
        body=b"\x00raw",
    )
    kept = plain(refused)
    assert kept.event_id == "m\\x00-1"
    assert kept.exception_message == "bad \\ud800 text"
    assert kept.attempts == 2**31 - 1
    assert kept.headers == {
        "x-custom": "a\\x00b",
        "x-big": str(2**40),
        "nested": [{"k\\x00": "v"}],
    }
    assert (kept.id, kept.body) == (refused.id, refused.body)


def test_a_dead_letter_with_an_unreadable_death_record_is_still_read() -> None:
    read = read_dead_letter(
        "ns",
        body=b"{}",
        headers={"x-death": ["not a table"]},
        message_id="m-1",
        message_type=None,
        correlation_id=None,
    )
    assert (read.event_id, read.reason, read.queue) == ("m-1", "unknown", "unknown")
