"""A killed consumer does not take its events' final status with it (real processes).

A service reports `succeeded` and `cancelled` after the ack, once per interval. Here the effect
service (`tests.support.effect_service`, the real consumer runtime as the `notifier`) reports
only once a minute and is killed after its acks, before any report: the status shows nothing of
its work. The next process of the service tells those outcomes again from its inbox, and
`GET /v1/events/{id}` shows them.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.test_cancel import CancelSystem, cancel_system
from tests.e2e.test_tracking import states
from tests.support.polling import eventually_sync

pytestmark = [pytest.mark.e2e, pytest.mark.broker]

SILENT = {
    "COURIER_STATUS_REPORT_INTERVAL_MS": "60000",  # nothing reported before the kill
    "COURIER_STATUS_RECOVERY_SECONDS": "120",  # (must cover two intervals)
}


@pytest.fixture
def system(amqp_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CancelSystem]:
    yield from cancel_system(amqp_url, tmp_path_factory.mktemp("crash-status"), **SILENT)


def test_succeeded_and_cancelled_outcomes_survive_a_kill_after_their_acks(
    system: CancelSystem,
) -> None:
    blocker = system.notify("slow:3")
    cancelled = system.notify("cancel-me")
    eventually_sync(lambda: system.started(blocker), timeout=15)  # the rest waits behind it
    system.wait_known(cancelled)
    assert system.cancel(cancelled).status_code == 202
    handled = [system.notify("a"), system.notify("b")]
    last = system.notify("slow:5")

    def acked_before_last() -> None:  # prefetch 1: the next delivery comes after the last ack
        system.started(last)

    eventually_sync(acked_before_last, timeout=30)
    system.service.kill()
    for event_id in (blocker, cancelled, *handled):
        assert system.service_status(event_id, "notifier")["state"] == "pending"

    # Only its start can tell them in time: its rounds tell again what is owed for 2 minutes.
    system.start_service(COURIER_STATUS_RECOVERY_SECONDS="120").wait_ready(60)

    for event_id in (blocker, *handled):
        notifier = system.wait_state(event_id, "notifier", "succeeded", timeout=20)
        assert (states(notifier), notifier["attempt"]) == (["pending", "succeeded"], 1)
    notifier = system.wait_state(cancelled, "notifier", "cancelled", timeout=20)
    assert states(notifier) == ["pending", "cancelled"]
    system.wait_state(last, "notifier", "succeeded", timeout=30)  # redelivered, done again
    counts = system.effects.counts()
    assert [counts[e] for e in (blocker, *handled, cancelled)] == [1, 1, 1, 0]
