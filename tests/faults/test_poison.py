"""A message that kills its consumer on every delivery is dead-lettered by the broker after the
configured delivery limit, and the messages around it are handled (real processes, real broker).

A supervisor loop in the test plays the process supervisor: it restarts the service whenever
the poison message killed it.

What a crash does to the *other* messages depends on the prefetch. A process that dies returns
every message it held unacked, and the quorum queue counts a delivery for each of them; the
returned messages are delivered first again, so with a prefetch above 1 innocent messages that
were in flight beside the poison keep sharing its fate and reach the delivery limit with it.
They are dead-lettered as `delivery_limit` too: not lost, replayable, but not handled either.
With prefetch 1 a crash holds only the poison, and every other message is handled once.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from aio_pika.abc import AbstractIncomingMessage

from services.messaging.publisher import Publisher
from services.messaging.settings import CourierSettings
from tests.conftest import Namespace
from tests.faults.conftest import Effects, EffectServiceFactory, send
from tests.support.polling import eventually
from tests.support.processes import ServiceProcess
from tests.support.queues import assert_empty, ready_messages, take

pytestmark = [pytest.mark.faults, pytest.mark.broker]

DELIVERY_LIMIT = 2
DELIVERIES = DELIVERY_LIMIT + 1  # `x-delivery-limit=N`: 1 delivery + N redeliveries
CRASH_EXIT_CODE = 3  # tests.support.effect_service exits with 3 on a `crash` subject
NORMAL = 100


class Supervisor:
    """Restarts the effect service whenever it exited with the poison's exit code."""

    def __init__(self, start: EffectServiceFactory, **env: str) -> None:
        self._start = start
        self._env = env
        self.processes: list[ServiceProcess] = [start(**env)]
        self.crashes = 0

    @property
    def current(self) -> ServiceProcess:
        return self.processes[-1]

    def tend(self) -> None:
        """Restart a crashed process; fail at once if it exited for another reason."""
        process = self.current.process
        assert process is not None
        code = process.poll()
        if code is None:
            return
        if code != CRASH_EXIT_CODE:
            pytest.fail(
                f"service exited with {code}, not the poison's exit code:\n{self.current.log()}"
            )
        self.crashes += 1
        self.processes.append(self._start(**self._env))

    async def recovered(self) -> None:
        """The poison crashed one process per delivery, and a live one consumes again.

        The last crash may come after the other conditions of a test hold: wait for it.
        """
        self.tend()
        assert self.crashes == DELIVERIES, f"{self.crashes} crashes"
        assert self.current.ready(), "the last process is not consuming yet"


async def send_around_poison(publisher: Publisher, namespace: Namespace) -> tuple[str, list[str]]:
    """Half of the normal messages, the poison, the other half; (poison id, normal ids)."""
    before = await send(publisher, namespace, *(f"before-{i}" for i in range(NORMAL // 2)))
    [poison] = await send(publisher, namespace, "crash")
    after = await send(publisher, namespace, *(f"after-{i}" for i in range(NORMAL - NORMAL // 2)))
    return poison, [*before, *after]


def assert_dead_lettered_by_the_broker(
    message: AbstractIncomingMessage, poison: str, work_queue: str
) -> None:
    headers = message.headers
    assert message.message_id == poison
    assert headers.get("x-first-death-reason") == "delivery_limit", headers
    assert headers.get("x-first-death-queue") == work_queue, headers
    deaths = headers.get("x-death")
    assert isinstance(deaths, Sequence) and len(deaths) == 1, headers
    death = deaths[0]
    assert isinstance(death, dict)
    assert death.get("reason") == "delivery_limit", death
    assert death.get("queue") == work_queue, death
    assert death.get("count") == 1, death
    # The broker dead-lettered it, not the consumer (which never got past the crash).
    assert "courier-reason" not in headers, headers


@pytest.mark.topology(COURIER_DELIVERY_LIMIT=str(DELIVERY_LIMIT))
@pytest.mark.timeout(90)
async def test_a_poison_message_is_dead_lettered_after_the_delivery_limit_and_nothing_else(
    namespace: Namespace,
    publisher: Publisher,
    effect_service: EffectServiceFactory,
    effects: Effects,
    topology_settings: CourierSettings,
) -> None:
    supervisor = Supervisor(effect_service, COURIER_PREFETCH="1")
    supervisor.current.wait_ready()
    poison, normal = await send_around_poison(publisher, namespace)

    async def poison_dead_lettered_and_all_handled() -> None:
        supervisor.tend()
        assert len(effects.starts(poison)) == DELIVERIES
        counts = effects.counts()
        done = sum(1 for event_id in normal if counts[event_id] >= 1)
        assert done == NORMAL, f"{done}/{NORMAL} handled, {supervisor.crashes} crashes"

    await eventually(poison_dead_lettered_and_all_handled, timeout=60)
    await eventually(supervisor.recovered, timeout=30)
    counts = effects.counts()
    assert all(counts[event_id] == 1 for event_id in normal), counts
    assert counts[poison] == 0
    topology = topology_settings.topology("notifier")
    [dead] = await take(namespace.amqp_url, topology.dead_letter_queue, 1)
    assert_dead_lettered_by_the_broker(dead, poison, topology.queue)
    await assert_empty(namespace.amqp_url, [topology.queue, topology.dead_letter_queue])
    assert supervisor.current.terminate() == 0


@pytest.mark.topology(COURIER_DELIVERY_LIMIT=str(DELIVERY_LIMIT))
@pytest.mark.timeout(90)
async def test_messages_in_flight_beside_a_poison_are_handled_or_dead_lettered_never_lost(
    namespace: Namespace,
    publisher: Publisher,
    effect_service: EffectServiceFactory,
    effects: Effects,
    topology_settings: CourierSettings,
) -> None:
    supervisor = Supervisor(effect_service, COURIER_PREFETCH="16")
    supervisor.current.wait_ready()
    poison, normal = await send_around_poison(publisher, namespace)
    topology = topology_settings.topology("notifier")

    async def accounted_for() -> None:
        supervisor.tend()
        assert len(effects.starts(poison)) == DELIVERIES
        counts = effects.counts()
        handled = sum(1 for event_id in normal if counts[event_id] >= 1)
        dead = await ready_messages(namespace.amqp_url, topology.dead_letter_queue)
        # Every normal message has its effect or is a dead letter (beside the poison's).
        assert handled + dead - 1 >= NORMAL, f"{handled} handled, {dead} dead letters"

    await eventually(accounted_for, timeout=60)
    await eventually(supervisor.recovered, timeout=30)

    counts = effects.counts()
    assert max(counts.values()) == 1, counts  # no effect twice
    assert counts[poison] == 0
    handled = {event_id for event_id in normal if counts[event_id] == 1}
    # Dead letters: the poison, and the innocents that were unacked in each crashed process.
    depth = await ready_messages(namespace.amqp_url, topology.dead_letter_queue)
    dead = await take(namespace.amqp_url, topology.dead_letter_queue, depth)
    dead_ids = {m.message_id for m in dead}
    assert poison in dead_ids
    assert all(m.headers.get("x-first-death-reason") == "delivery_limit" for m in dead)
    assert dead_ids - {poison} <= set(normal)
    missing = set(normal) - handled - dead_ids
    assert not missing, f"lost: {sorted(missing)}"
    await assert_empty(namespace.amqp_url, [topology.queue, topology.dead_letter_queue])
    assert supervisor.current.terminate() == 0
