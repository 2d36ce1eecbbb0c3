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
from tests.support.processes import ServiceProcess
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


async def successes_reported(
    url: str, queue: str, event_ids: list[str], timeout: float
) -> list[dict[str, object]]:
    """The `succeeded` transitions of `event_ids` reported to `queue`, once every one of them
    is (repeats included)."""
    outcomes: list[dict[str, object]] = []

    async def all_reported() -> None:
        outcomes.extend(
            t
            for t in await reported(url, queue)
            if t["state"] == "succeeded" and t["event_id"] in event_ids
        )
        assert {str(t["event_id"]) for t in outcomes} == set(event_ids)

    await eventually(all_reported, timeout=timeout)
    return outcomes


SILENT = {
    "COURIER_STATUS_REPORT_INTERVAL_MS": "60000",  # nothing reported before the kill
    "COURIER_STATUS_RECOVERY_SECONDS": "120",  # (must cover two intervals)
}


async def killed_after_acks(
    service: ServiceProcess,
    publisher: Publisher,
    namespace: Namespace,
    effects: Effects,
    *subjects: str,
) -> tuple[list[str], str]:
    """Send `subjects` and a slow last one to `service` (prefetch 1), and SIGKILL it once it
    started the last one: every one before was acked. Their ids, and the last one's."""
    handled = await send(publisher, namespace, *subjects)
    [last] = await send(publisher, namespace, "slow:5")

    def acked() -> None:  # prefetch 1: the next delivery comes only after the last one's ack
        assert len(effects.starts(last)) == 1

    eventually_sync(acked, timeout=20)
    service.kill()
    assert effects.counts() == dict.fromkeys(handled, 1)
    return handled, last


async def test_a_kill_after_the_ack_before_the_status_report_loses_no_outcome(
    namespace: Namespace,
    publisher: Publisher,
    effect_service: EffectServiceFactory,
    effects: Effects,
    reports: str,
) -> None:
    """`succeeded` is reported after the ack, once per interval: a process killed in between
    takes the reports with it. The next process reports them again from the inbox."""
    first = effect_service(COURIER_PREFETCH="1", **SILENT).wait_ready()
    handled, slow = await killed_after_acks(first, publisher, namespace, effects, "a", "b", "c")
    assert await ready_messages(namespace.amqp_url, reports) == 0  # the kill took the reports

    # Only its start can tell them in time: its rounds tell again what is owed for 2 minutes.
    second = effect_service(COURIER_PREFETCH="1", COURIER_STATUS_RECOVERY_SECONDS="120")
    second.wait_ready()

    outcomes = await successes_reported(namespace.amqp_url, reports, [*handled, slow], 30)
    assert sorted(str(t["event_id"]) for t in outcomes) == sorted([*handled, slow])
    assert second.terminate() == 0
    assert all(t["attempt"] == 1 for t in outcomes)
    # Told again from the inbox, not redelivered: the kill came after their acks.
    assert effects.counts() == dict.fromkeys([*handled, slow], 1)
    assert [s.event_id for s in effects.starts() if s.event_id in handled] == handled


async def test_a_replica_killed_for_good_has_its_outcomes_reported_by_another(
    namespace: Namespace,
    publisher: Publisher,
    effect_service: EffectServiceFactory,
    effects: Effects,
    reports: str,
) -> None:
    """Two replicas on one store (a SQLite file both open here, where the effects are
    counted). One is killed after its acks, before any report, and never comes back (scaled
    down): the replica that lives on, running since before that work, reports those outcomes
    once they have been owed for its recovery age."""
    shared = {"COURIER_PREFETCH": "1"}
    survivor = effect_service(**shared, COURIER_STATUS_RECOVERY_SECONDS="2").wait_ready()
    [busy] = await send(publisher, namespace, "slow:30")  # holds the survivor's one slot

    def survivor_busy() -> None:
        assert len(effects.starts(busy)) == 1

    eventually_sync(survivor_busy, timeout=20)
    doomed = effect_service(**shared, **SILENT).wait_ready()
    handled, _ = await killed_after_acks(doomed, publisher, namespace, effects, "a", "b")
    assert doomed.process is not None
    assert {s.pid for s in effects.starts() if s.event_id in handled} == {doomed.process.pid}

    outcomes = await successes_reported(namespace.amqp_url, reports, handled, 20)
    assert all(t["attempt"] == 1 for t in outcomes)
    assert effects.counts() == dict.fromkeys(handled, 1)  # told, not redone
    assert survivor.terminate() == 0


async def test_after_a_clean_stop_the_next_start_reports_nothing_again(
    namespace: Namespace,
    publisher: Publisher,
    effect_service: EffectServiceFactory,
    effects: Effects,
    reports: str,
) -> None:
    """The stop sends the last report and notes it confirmed: nothing is owed, so a start pays
    for no recovery (it re-sent a window of outcomes at every start before)."""
    first = effect_service(COURIER_PREFETCH="1").wait_ready()
    handled = await send(publisher, namespace, "a", "b", "c")

    def done() -> None:
        assert effects.counts() == dict.fromkeys(handled, 1)

    eventually_sync(done, timeout=20)
    assert first.terminate() == 0
    told = [t for t in await reported(namespace.amqp_url, reports) if t["state"] == "succeeded"]
    assert sorted(str(t["event_id"]) for t in told) == sorted(handled)

    second = effect_service(COURIER_PREFETCH="1").wait_ready()
    assert second.terminate() == 0
    assert await reported(namespace.amqp_url, reports) == []
