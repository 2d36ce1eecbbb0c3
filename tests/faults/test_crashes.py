"""Crashes of a consumer process lose nothing and repeat no effect (real processes, real broker)."""

from __future__ import annotations

import pytest

from services.messaging.publisher import Publisher
from tests.conftest import Namespace
from tests.faults.conftest import Effects, EffectServiceFactory, send
from tests.support.polling import eventually_sync
from tests.support.queues import assert_empty

pytestmark = [pytest.mark.faults, pytest.mark.broker]


async def test_a_kill_after_the_effect_but_before_the_ack_keeps_one_effect(
    namespace: Namespace,
    publisher: Publisher,
    effect_service: EffectServiceFactory,
    effects: Effects,
) -> None:
    first = effect_service(COURIER_PREFETCH="1").wait_ready()
    [event_id] = await send(publisher, namespace, "die-before-ack")
    assert first.process is not None
    assert first.process.wait(30) == 4  # died between commit and ack
    assert effects.counts()[event_id] == 1

    second = effect_service(COURIER_PREFETCH="1").wait_ready()  # gets the redelivery
    [other] = await send(publisher, namespace, "after")

    def settled() -> None:
        assert effects.counts()[other] == 1

    eventually_sync(settled, timeout=20)
    assert second.terminate() == 0
    assert effects.counts()[event_id] == 1
    # The redelivered message was acked (as a duplicate), not left behind or dead-lettered.
    topology = namespace.settings().topology("notifier")
    await assert_empty(namespace.amqp_url, [topology.queue, topology.dead_letter_queue])


async def test_a_kill_mid_work_is_redone_by_the_next_process_with_one_effect(
    namespace: Namespace,
    publisher: Publisher,
    effect_service: EffectServiceFactory,
    effects: Effects,
) -> None:
    first = effect_service(COURIER_PREFETCH="1").wait_ready()
    [event_id] = await send(publisher, namespace, "slow:5")

    def handler_started() -> None:
        assert len(effects.starts(event_id)) == 1

    eventually_sync(handler_started, timeout=15)
    first.kill()  # SIGKILL while the handler sleeps: no ack, no inbox record, no effect
    assert effects.counts()[event_id] == 0

    second = effect_service(COURIER_PREFETCH="1").wait_ready()

    def redone() -> None:
        assert effects.counts()[event_id] == 1

    eventually_sync(redone, timeout=30)
    assert second.terminate() == 0
    assert effects.counts()[event_id] == 1
    starts = effects.starts(event_id)
    assert len(starts) == 2, starts  # the broker redelivered it once, to the second process
    assert second.process is not None
    assert starts[1].pid == second.process.pid
    topology = namespace.settings().topology("notifier")
    await assert_empty(namespace.amqp_url, [topology.queue, topology.dead_letter_queue])
