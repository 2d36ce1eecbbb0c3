"""Transient failures are retried through the broker's delay tiers, then dead-lettered with the
whole story (real processes, real broker; attempts and effects counted in the service's store)."""

from __future__ import annotations

import itertools
import re
from datetime import datetime, timedelta

import pytest

from services.messaging.publisher import Publisher
from services.messaging.settings import CourierSettings
from tests.conftest import Namespace
from tests.faults.conftest import Effects, EffectServiceFactory, send
from tests.support.polling import eventually
from tests.support.queues import assert_empty, take

pytestmark = [pytest.mark.faults, pytest.mark.broker]

DELAYS = (1, 2)
RETRY_TOPOLOGY = pytest.mark.topology(COURIER_RETRY_DELAYS=",".join(map(str, DELAYS)))
# A delay tier never returns a message early; allow for clock granularity only.
EARLY_SLACK = 0.05


def all_queues(settings: CourierSettings) -> list[str]:
    topology = settings.topology("notifier")
    return [topology.queue, topology.dead_letter_queue, *map(topology.retry_queue, DELAYS)]


@RETRY_TOPOLOGY
async def test_a_transient_failure_is_retried_after_each_delay_then_succeeds_once(
    namespace: Namespace,
    publisher: Publisher,
    effect_service: EffectServiceFactory,
    effects: Effects,
    topology_settings: CourierSettings,
) -> None:
    service = effect_service(COURIER_IMMEDIATE_RETRIES="0").wait_ready()
    [event_id] = await send(publisher, namespace, "fail:2")

    async def done() -> None:
        assert effects.counts()[event_id] == 1

    await eventually(done, timeout=30)
    assert service.terminate() == 0

    assert effects.counts()[event_id] == 1
    times = effects.attempt_times(event_id)
    assert len(times) == 3, times  # failed, failed, succeeded
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    # Each retry waited in its delay tier (not requeued at once, not held in memory).
    for gap, delay in zip(gaps, DELAYS, strict=True):
        assert gap >= delay - EARLY_SLACK, (gaps, DELAYS)
    [effect] = [e for e in effects.effects() if e.event_id == event_id]
    assert effect.at >= times[-1]
    await assert_empty(namespace.amqp_url, all_queues(topology_settings))


@RETRY_TOPOLOGY
@pytest.mark.parametrize("immediate", [0, 2])
async def test_an_always_failing_handler_is_dead_lettered_after_the_configured_attempts(
    namespace: Namespace,
    publisher: Publisher,
    effect_service: EffectServiceFactory,
    effects: Effects,
    topology_settings: CourierSettings,
    immediate: int,
) -> None:
    service = effect_service(COURIER_IMMEDIATE_RETRIES=str(immediate)).wait_ready()
    [event_id] = await send(publisher, namespace, "fail-always")
    topology = topology_settings.topology("notifier")

    [dead] = await take(namespace.amqp_url, topology.dead_letter_queue, 1, timeout=30)
    deliveries = len(DELAYS) + 1
    attempts = (immediate + 1) * deliveries
    # Dead-lettered after the last attempt, and not tried again afterwards.
    assert effects.attempts(event_id) == attempts
    assert len(effects.starts(event_id)) == attempts
    assert effects.counts()[event_id] == 0
    assert service.terminate() == 0
    assert effects.attempts(event_id) == attempts

    headers = dead.headers
    assert dead.message_id == event_id
    assert event_id.encode() in dead.body
    assert headers["courier-reason"] == "retries_exhausted"
    assert headers["courier-attempt"] == deliveries
    assert headers["courier-service"] == "notifier"
    assert headers["courier-queue"] == topology.queue
    assert headers["courier-event-id"] == event_id
    assert headers["courier-event-type"] == "notification.requested"
    assert headers["courier-exception-type"] == "builtins.ConnectionError"
    assert headers["courier-exception-message"] == "always failing"
    traceback = headers["courier-traceback"]
    assert isinstance(traceback, str)
    assert "tests/support/effect_service.py" in traceback
    assert traceback.rstrip().endswith("ConnectionError: always failing")
    assert isinstance(headers["courier-fingerprint"], str)
    assert re.fullmatch(r"[0-9a-f]{16}", headers["courier-fingerprint"])
    first, last = headers["courier-first-failure"], headers["courier-last-failure"]
    assert isinstance(first, datetime) and isinstance(last, datetime)
    # AMQP timestamps have whole seconds; the delays between first and last failure add up.
    assert last - first >= timedelta(seconds=sum(DELAYS)), (first, last)
    assert not any(name.startswith("x-") for name in headers), headers  # no broker headers
    await assert_empty(namespace.amqp_url, all_queues(topology_settings))
