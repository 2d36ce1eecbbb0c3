"""CPU-bound handler work runs in the process pool: while it computes, the service keeps
handling other messages, answering its readiness probe and heart-beating on its connection
(real process, real broker, heartbeat 1 s)."""

from __future__ import annotations

import itertools
import time

import httpx
import pytest

from services.messaging.publisher import Publisher
from tests.conftest import Namespace
from tests.faults.conftest import Effects, EffectServiceFactory, send
from tests.support.polling import eventually
from tests.support.queues import assert_empty

pytestmark = [pytest.mark.faults, pytest.mark.broker]

CPU_SECONDS = 5.0
NORMAL = 20
PROBE_TIMEOUT = 2.0  # a probe slower than this counts as a failure: the loop was blocked


async def test_cpu_bound_work_leaves_the_loop_free_for_messages_probes_and_heartbeats(
    namespace: Namespace,
    publisher: Publisher,
    effect_service: EffectServiceFactory,
    effects: Effects,
) -> None:
    # Heartbeat 1 s: a loop blocked for the 5 s of CPU work would miss heartbeats, the broker
    # would close the connection, and the unacked cpu message would be delivered a second time.
    service = effect_service(COURIER_HEARTBEAT="1", COURIER_PREFETCH="32").wait_ready()
    assert service.process is not None
    [cpu] = await send(publisher, namespace, f"cpu:{CPU_SECONDS:g}")
    normal = await send(publisher, namespace, *(f"normal-{i}" for i in range(NORMAL)))

    probes: list[tuple[float, int]] = []  # (monotonic time, status) of each /readyz answer
    async with httpx.AsyncClient(timeout=PROBE_TIMEOUT) as client:

        async def probe() -> None:
            try:
                response = await client.get(service.health_url)
            except httpx.HTTPError as exc:
                pytest.fail(f"/readyz did not answer within {PROBE_TIMEOUT}s: {exc!r}")
            probes.append((time.monotonic(), response.status_code))
            assert response.status_code == 200, f"/readyz answered {response.status_code}"

        async def normal_done_while_cpu_runs() -> None:
            await probe()
            counts = effects.counts()
            if counts[cpu]:
                pending = [event_id for event_id in normal if not counts[event_id]]
                pytest.fail(f"the cpu task finished before {len(pending)} normal messages")
            assert all(counts[event_id] == 1 for event_id in normal), counts

        await eventually(normal_done_while_cpu_runs, timeout=CPU_SECONDS + 20)

        async def cpu_done() -> None:
            await probe()
            assert effects.counts()[cpu] == 1

        await eventually(cpu_done, timeout=CPU_SECONDS + 20)

    assert all(status == 200 for _, status in probes), probes
    # The probe kept answering through the CPU work, not just before and after it.
    assert probes[-1][0] - probes[0][0] >= CPU_SECONDS - 1, probes
    gaps = [later - earlier for (earlier, _), (later, _) in itertools.pairwise(probes)]
    assert max(gaps) < PROBE_TIMEOUT + 0.5, max(gaps)

    [cpu_start] = effects.starts(cpu)  # one delivery only: the connection never dropped
    rows = effects.effects()
    cpu_effect = next(e for e in rows if e.event_id == cpu)
    assert cpu_effect.at - cpu_start.at >= CPU_SECONDS  # it really computed that long
    normal_effects = [e for e in rows if e.event_id in set(normal)]
    assert len(normal_effects) == NORMAL
    # Handled while the CPU work ran (which took CPU_SECONDS): all before it ended, and not all
    # before it started (a normal handler may overtake the cpu one's first store write).
    assert all(e.at < cpu_effect.at for e in normal_effects)
    assert max(e.at for e in normal_effects) > cpu_start.at
    assert all(len(effects.starts(event_id)) == 1 for event_id in normal)
    assert {e.pid for e in rows} == {service.process.pid}

    assert service.terminate() == 0
    topology = namespace.settings().topology("notifier")
    await assert_empty(namespace.amqp_url, [topology.queue, topology.dead_letter_queue])
