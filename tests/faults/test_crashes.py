"""Crashes of a consumer process lose nothing and repeat no effect (real processes, real broker)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aio_pika
import orjson
import pytest

from services.messaging.publisher import Publisher
from tests.conftest import Namespace
from tests.faults.conftest import Effects, EffectServiceFactory, send
from tests.support.polling import eventually, eventually_sync
from tests.support.queues import assert_empty, ready_messages

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


@pytest.fixture
async def reports(namespace: Namespace, publisher: Publisher) -> AsyncIterator[str]:
    """A queue that receives the namespace's `status.reported` events."""
    name = f"{namespace.name}.reports"
    exchange = namespace.settings().topology("notifier").events_exchange
    connection = await aio_pika.connect(namespace.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(name, durable=True)
        await queue.bind(exchange, "status.reported")
        yield name
        await channel.queue_delete(name)


async def reported(url: str, queue: str) -> list[dict[str, object]]:
    """The transitions of every report waiting in `queue` (taken)."""
    transitions: list[dict[str, object]] = []
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        q = await channel.get_queue(queue)
        while (message := await q.get(fail=False)) is not None:
            transitions.extend(orjson.loads(message.body)["data"]["transitions"])
            await message.ack()
    return transitions


async def test_a_kill_after_the_ack_before_the_status_report_loses_no_outcome(
    namespace: Namespace,
    publisher: Publisher,
    effect_service: EffectServiceFactory,
    effects: Effects,
    reports: str,
) -> None:
    """`succeeded` is reported after the ack, once per interval: a process killed in between
    takes the reports with it. The next process reports them again from the inbox."""
    first = effect_service(
        COURIER_PREFETCH="1",
        COURIER_STATUS_REPORT_INTERVAL_MS="60000",  # nothing reported before the kill
        COURIER_STATUS_RECOVERY_SECONDS="120",  # (must cover two intervals)
    )
    first.wait_ready()
    handled = await send(publisher, namespace, "a", "b", "c")
    [slow] = await send(publisher, namespace, "slow:5")

    def acked() -> None:  # prefetch 1: the next delivery comes only after the last one's ack
        assert len(effects.starts(slow)) == 1

    eventually_sync(acked, timeout=20)
    first.kill()
    assert effects.counts() == dict.fromkeys(handled, 1)
    assert await ready_messages(namespace.amqp_url, reports) == 0  # the kill took the reports

    second = effect_service(COURIER_PREFETCH="1").wait_ready()

    async def outcomes_reported() -> None:
        succeeded = [
            t for t in await reported(namespace.amqp_url, reports) if t["state"] == "succeeded"
        ]
        outcomes.extend(succeeded)
        assert sorted(str(t["event_id"]) for t in outcomes) == sorted([*handled, slow])

    outcomes: list[dict[str, object]] = []
    await eventually(outcomes_reported, timeout=30)
    assert second.terminate() == 0
    assert all(t["attempt"] == 1 for t in outcomes)
    # Told again from the inbox, not redelivered: the kill came after their acks.
    assert effects.counts() == dict.fromkeys([*handled, slow], 1)
    assert [s.event_id for s in effects.starts() if s.event_id in handled] == handled
