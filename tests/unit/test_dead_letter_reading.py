"""Reading dead letters: those the broker made itself (no Courier headers, only x-death), and
the times a consumer's letter carries."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from services.messaging import failure as f
from services.messaging.dead_letters import DeadLetter, plain, read_dead_letter
from services.messaging.failure import Failure
from tests.integration.test_failure_store import letter

NOW = datetime(2030, 1, 1, tzinfo=UTC)


def read(headers: dict[str, object], message_type: str = "notification.requested") -> DeadLetter:
    return read_dead_letter(
        "ns",
        body=b"{}",
        headers=headers,
        message_id="e-1",
        message_type=message_type,
        correlation_id=None,
        now=NOW,
    )


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
    letter = read(headers, "dataset.submitted")
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


def test_a_boolean_replay_count_is_no_count() -> None:
    read = read_dead_letter(
        "ns",
        body=b"{}",
        headers={f.REPLAYS: True},
        message_id="m-1",
        message_type=None,
        correlation_id=None,
    )
    assert read.replays == 0


# --- a consumer's letter ----------------------------------------------------------------------


def consumers_letter(**extra: object) -> dict[str, object]:
    failure = Failure(ValueError("boom"), 2, datetime(2030, 1, 1, 0, 0, 7, 123456, tzinfo=UTC))
    headers = failure.dead_letter_headers(
        {},
        reason="permanent",
        service="notifier",
        queue="ns.notifier",
        event_id="e-1",
        event_type="notification.requested",
    )
    return {**headers, **extra}


def test_a_consumers_letter_keeps_its_id() -> None:
    assert read({**consumers_letter(), f.DEAD_LETTER_ID: "0b7c-uuid_like"}).id == "0b7c-uuid_like"


def test_a_letter_id_the_ops_api_could_not_name_is_replaced_by_a_stable_one() -> None:
    """A letter published by hand: its id goes into a URL path and into a selection by ids."""
    for unusable in ("a/b", "..", "x" * 65, "", "é", 7):
        headers = {**consumers_letter(), f.DEAD_LETTER_ID: unusable}
        letter = read(headers)
        assert re.fullmatch("[0-9a-f]{32}", letter.id), unusable
        assert read(headers).id == letter.id  # the drain stores a redelivery once


def test_a_consumers_letter_keeps_its_failure_time_to_the_microsecond() -> None:
    # The AMQP timestamp of `courier-last-failure` would keep whole seconds only.
    assert read(consumers_letter()).last_failure == datetime(
        2030, 1, 1, 0, 0, 7, 123456, tzinfo=UTC
    )


def test_a_first_failure_is_kept_to_the_microsecond_too() -> None:
    # It was cut to the second: a letter that failed once showed two different times.
    letter = read(consumers_letter())
    assert letter.first_failure == letter.last_failure


def test_a_letter_that_first_failed_under_an_earlier_version_keeps_its_first_second() -> None:
    # No courier-first-failed-at: the AMQP timestamp, in whole seconds, is what there is.
    seconds = datetime(2030, 1, 1, 0, 0, 3, tzinfo=UTC)
    headers = consumers_letter(**{f.FIRST_FAILURE: seconds})
    del headers[f.FIRST_FAILED_AT]
    assert read(headers).first_failure == seconds


def test_a_broker_dead_letter_never_failed_first_after_it_died() -> None:
    # x-death keeps whole seconds; the first failure, to the microsecond, fell in that second.
    died = datetime(2030, 1, 1, 0, 0, 7, tzinfo=UTC)
    headers: dict[str, object] = {
        "x-death": [{"queue": "ns.notifier", "reason": "delivery_limit", "time": died}],
        f.FIRST_FAILED_AT: "2030-01-01T00:00:07.500000+00:00",
    }
    letter = read(headers)
    assert letter.first_failure <= letter.last_failure == died
    del headers[f.FIRST_FAILED_AT]
    headers[f.FIRST_FAILURE] = datetime(2030, 1, 1, 0, 0, 2, tzinfo=UTC)
    assert read(headers).first_failure == datetime(2030, 1, 1, 0, 0, 2, tzinfo=UTC)


def test_a_letter_without_a_readable_precise_time_falls_back_to_the_last_failure() -> None:
    seconds = datetime(2030, 1, 1, 0, 0, 7, tzinfo=UTC)
    # Times outside year 1 to 9999 once in UTC: the store refused the letter, which went
    # back to its queue for ever (PostgreSQL), or stopped its status update (SQLite).
    out_of_range = ("0001-01-01T00:00:00+01:00", "9999-12-31T23:00:00-05:00")
    for odd in (None, "yesterday", 17, b"\xff", *out_of_range):
        headers = consumers_letter(**{f.LAST_FAILURE: seconds, f.FAILED_AT: odd})
        assert read(headers).last_failure == seconds


def test_different_messages_the_broker_killed_in_one_second_without_ids_are_two_letters() -> None:
    # x-death keeps whole seconds: only the bodies tell them apart (else the drain would ack
    # the second as stored already, and it would be lost).
    death = {"x-death": [{"queue": "ns.processor", "reason": "delivery_limit", "time": NOW}]}
    first, second, again = (
        read_dead_letter(
            "ns", body=body, headers=death, message_id=None, message_type=None,
            correlation_id=None, now=NOW,
        )
        for body in (b'{"a": 1}', b'{"a": 2}', b'{"a": 1}')
    )  # fmt: skip
    assert first.id != second.id
    assert again.id == first.id  # a redelivery of the same message is the same letter
