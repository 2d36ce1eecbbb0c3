"""Reading dead letters the broker made itself (no Courier headers, only x-death)."""

from __future__ import annotations

from datetime import UTC, datetime

from services.messaging.dead_letters import read_dead_letter

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
