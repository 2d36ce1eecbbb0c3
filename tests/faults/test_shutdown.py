"""SIGTERM drains in-flight handlers; a handler slower than the shutdown timeout is left to the
broker, which redelivers it to the next process (real processes, real broker)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from services.messaging.publisher import Publisher
from services.messaging.runtime import CLOSE_BUDGET
from tests.conftest import Namespace
from tests.faults.conftest import Effects, EffectServiceFactory, send
from tests.support.polling import eventually, eventually_sync
from tests.support.queues import assert_empty
from tests.support.rabbit_node import PrivateRabbitNode

pytestmark = [pytest.mark.faults, pytest.mark.broker]


async def test_sigterm_lets_in_flight_handlers_finish_and_ack_then_exits_0(
    namespace: Namespace,
    publisher: Publisher,
    effect_service: EffectServiceFactory,
    effects: Effects,
) -> None:
    service = effect_service(COURIER_PREFETCH="4", COURIER_SHUTDOWN_TIMEOUT="20").wait_ready()
    event_ids = await send(publisher, namespace, *["slow:2"] * 3)

    async def all_in_flight() -> None:
        started = {start.event_id for start in effects.starts()}
        assert started == set(event_ids)

    await eventually(all_in_flight, timeout=15)
    assert not effects.counts(), "the handlers finished before the signal"
    assert service.terminate(timeout=30) == 0

    # Drained: every handler finished in this process, and nothing was left unacked.
    counts = effects.counts()
    assert all(counts[event_id] == 1 for event_id in event_ids), counts
    assert service.process is not None
    assert {e.pid for e in effects.effects()} == {service.process.pid}
    topology = namespace.settings().topology("notifier")
    await assert_empty(namespace.amqp_url, [topology.queue, topology.dead_letter_queue])
    assert len(effects.starts()) == len(event_ids)  # none was handed out again


async def test_a_handler_slower_than_the_shutdown_timeout_is_redelivered_to_the_next_process(
    namespace: Namespace,
    publisher: Publisher,
    effect_service: EffectServiceFactory,
    effects: Effects,
) -> None:
    shutdown_timeout, slow = 1.0, 10.0
    first = effect_service(
        COURIER_PREFETCH="4", COURIER_SHUTDOWN_TIMEOUT=str(shutdown_timeout)
    ).wait_ready()
    [event_id] = await send(publisher, namespace, f"slow:{slow:g}")

    async def in_flight() -> None:
        assert len(effects.starts(event_id)) == 1

    await eventually(in_flight, timeout=15)
    signalled = time.monotonic()
    assert first.terminate(timeout=30) == 0
    # It gave up waiting after the timeout instead of sitting out the handler.
    assert time.monotonic() - signalled < slow - 3
    assert effects.counts()[event_id] == 0

    second = effect_service(COURIER_PREFETCH="4").wait_ready()

    async def redone() -> None:
        assert effects.counts()[event_id] == 1

    await eventually(redone, timeout=slow + 20)
    assert second.terminate() == 0
    assert effects.counts()[event_id] == 1
    assert second.process is not None
    assert [s.pid for s in effects.starts(event_id)][1:] == [second.process.pid]
    topology = namespace.settings().topology("notifier")
    await assert_empty(namespace.amqp_url, [topology.queue, topology.dead_letter_queue])


def process_group_alive(pgid: int) -> bool:
    """Whether any process of the group is left (the service runs in its own session)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_a_cpu_handler_slower_than_the_shutdown_timeout_is_redelivered_to_the_next_process(
    namespace: Namespace,
    publisher: Publisher,
    effect_service: EffectServiceFactory,
    effects: Effects,
) -> None:
    shutdown_timeout, cpu_seconds = 1.0, 10.0
    first = effect_service(
        COURIER_SHUTDOWN_TIMEOUT=str(shutdown_timeout), COURIER_CPU_WORKERS="1"
    ).wait_ready()
    assert first.process is not None
    pgid = first.process.pid  # its own session: the CPU workers are in this group too
    [event_id] = await send(publisher, namespace, f"cpu:{cpu_seconds:g}")

    async def in_flight() -> None:
        assert len(effects.starts(event_id)) == 1

    await eventually(in_flight, timeout=15)
    signalled = time.monotonic()
    assert first.terminate(timeout=30) == 0
    # The shutdown timeout holds for CPU work too: the process neither waits for the pool's
    # running task nor leaves its worker process computing as an orphan.
    assert time.monotonic() - signalled < cpu_seconds - 3, time.monotonic() - signalled

    def no_orphaned_worker() -> None:
        assert not process_group_alive(pgid), "a CPU worker outlived the service"

    eventually_sync(no_orphaned_worker, timeout=5)
    assert effects.counts()[event_id] == 0

    second = effect_service(COURIER_CPU_WORKERS="1").wait_ready()

    async def redone() -> None:
        assert effects.counts()[event_id] == 1

    await eventually(redone, timeout=cpu_seconds + 20)
    assert second.terminate() == 0
    assert effects.counts()[event_id] == 1
    topology = namespace.settings().topology("notifier")
    await assert_empty(namespace.amqp_url, [topology.queue, topology.dead_letter_queue])


async def test_a_stop_with_the_broker_away_ends_within_the_shutdown_timeout_and_the_close_budget(
    namespace: Namespace,
    private_node: PrivateRabbitNode,
    node_publisher: Publisher,
    effect_service: EffectServiceFactory,
    effects: Effects,
) -> None:
    # Each close that waits for the broker (the consumers' cancel, the last status report, the
    # publisher, the connection) had 5 s of its own: ~20 s past the timeout, past a supervisor's
    # grace period (compose gives 10 s more), so the process was killed instead of ending.
    service = effect_service(private_node.amqp_url, COURIER_SHUTDOWN_TIMEOUT="2").wait_ready()
    [event_id] = await send(node_publisher, namespace, "slow:30")

    async def in_flight() -> None:
        assert [start.event_id for start in effects.starts()] == [event_id]

    await eventually(in_flight, timeout=15)
    beam = private_node.beam_pid()
    os.kill(beam, signal.SIGSTOP)
    try:
        signalled = time.monotonic()
        assert service.terminate(timeout=60) == 0
        took = time.monotonic() - signalled
    finally:
        os.kill(beam, signal.SIGCONT)
    assert took < 2 + CLOSE_BUDGET + 2, (took, service.log())
