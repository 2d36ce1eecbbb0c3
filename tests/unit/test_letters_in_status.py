"""Which dead letters show in their event's status, and as what (`services.gateway.letters`)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from services.gateway.letters import dead_lettered
from services.messaging import failure as f
from services.messaging.dead_letters import DeadLetter, read_dead_letter
from services.messaging.failure import Failure

FAILED = datetime(2030, 1, 1, 0, 0, 7, 123456, tzinfo=UTC)
STORED = datetime(2030, 1, 1, 0, 0, 9, 4321, tzinfo=UTC)


def bounce() -> None:
    raise ValueError("the recipient bounced")


def a_failure() -> Failure:
    """A failure as the consumer caught it (with its traceback)."""
    try:
        bounce()
    except ValueError as exc:
        return Failure(exc, 2, FAILED)
    raise AssertionError("bounce() raises")


def consumers_letter(
    event_id: str = "e-1",
    event_type: str = "notification.requested",
    service: str = "notifier",
    **extra: object,
) -> DeadLetter:
    headers = a_failure().dead_letter_headers(
        {},
        reason="retries_exhausted",
        service=service,
        queue=f"ns.{service}",
        event_id=event_id,
        event_type=event_type,
    )
    return read_dead_letter(
        "ns",
        body=b"{}",
        headers={**headers, **extra},
        message_id=event_id,
        message_type=event_type,
        correlation_id=None,
    )


def test_a_consumers_letter_is_the_transition_its_consumer_reports() -> None:
    failure = a_failure()
    transition = dead_lettered(consumers_letter(), STORED)
    assert transition is not None
    assert (transition.event_id, transition.service, transition.state) == (
        "e-1",
        "notifier",
        "dead_lettered",
    )
    assert (transition.at, transition.attempt, transition.reason) == (
        FAILED,
        2,
        "retries_exhausted",
    )
    assert transition.detail == failure.summary()


def test_a_letter_the_broker_made_has_no_attempt_and_the_time_it_was_first_stored() -> None:
    letter = read_dead_letter(
        "ns",
        body=b"{}",
        headers={"x-death": [{"queue": "ns.notifier", "reason": "delivery_limit", "count": 1}]},
        message_id="e-1",
        message_type="notification.requested",
        correlation_id=None,
    )
    transition = dead_lettered(letter, STORED)
    assert transition is not None
    assert (transition.reason, transition.attempt, transition.at) == (
        "delivery_limit",
        None,
        STORED,
    )


def test_an_unreadable_failure_time_gives_the_time_stored_not_whole_seconds() -> None:
    transition = dead_lettered(consumers_letter(**{f.FAILED_AT: "yesterday"}), STORED)
    assert transition is not None
    assert transition.at == STORED


@pytest.mark.parametrize(
    ("event_type", "service"),
    [
        ("status.reported", "gateway"),  # the gateway's own consumer: no status of its own
        ("dataset.submitted", "notifier"),  # a type the service does not work on
        ("no.such.type", "notifier"),
    ],
)
def test_a_letter_of_an_untracked_type_or_service_shows_nowhere(
    event_type: str, service: str
) -> None:
    letter = consumers_letter(event_type=event_type, service=service)
    assert dead_lettered(letter, STORED) is None


@pytest.mark.parametrize("event_id", ["x" * 129, "tab\tin-it", ""])
def test_a_letter_whose_id_no_event_could_have_shows_nowhere(event_id: str) -> None:
    assert dead_lettered(consumers_letter(event_id=event_id), STORED) is None
