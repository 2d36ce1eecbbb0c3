"""The network between a running consumer and the broker fails mid-stream: nothing lost, each
effect once, and the same process resumes by itself (real processes, a private RabbitMQ node
behind a TCP proxy).

The effect service reaches the node only through `ThreadedTcpProxy` (heartbeat 2 s); the test
publishes straight to the node. Two kinds of cut:

* `reset_all()`: every connection is aborted with a TCP RST; the client notices at once (once
  with reconnects allowed straight away, once with new connections refused for a while);
* a blackhole: bytes are dropped both ways without a close; the client notices only through
  missed heartbeats (about 9 s), the broker likewise, and returns the unacked messages.

Handlers in flight during a cut finish, but their acks are lost; the broker redelivers those
messages after the cut and the inbox turns them into acks without a second effect.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from services.messaging.publisher import Publisher
from tests.conftest import Namespace
from tests.faults.conftest import Effects, EffectServiceFactory, readiness, send
from tests.support.polling import eventually
from tests.support.processes import ServiceProcess
from tests.support.queues import assert_empty
from tests.support.rabbit_node import PrivateRabbitNode
from tests.support.tcp_proxy import ProxyMode, ThreadedTcpProxy

pytestmark = [pytest.mark.faults, pytest.mark.broker]

N = 200
SUBJECT = "slow:0.4"  # 10 handlers at a time: about 8 s of work, so the cuts land mid-stream
PREFETCH = "10"
HEARTBEAT = "2"
BLACKHOLE_SECONDS = 10.0


@pytest.fixture
def proxy(private_node: PrivateRabbitNode) -> Iterator[ThreadedTcpProxy]:
    with ThreadedTcpProxy("127.0.0.1", private_node.amqp_port) as tcp_proxy:
        yield tcp_proxy


def start_behind_proxy(
    effect_service: EffectServiceFactory, node: PrivateRabbitNode, proxy: ThreadedTcpProxy
) -> ServiceProcess:
    return effect_service(
        node.amqp_url_via(proxy.port), COURIER_HEARTBEAT=HEARTBEAT, COURIER_PREFETCH=PREFETCH
    ).wait_ready()


def mid_work(effects: Effects) -> set[str]:
    """Events whose handler started but has no effect yet: their ack is after the cut, if any."""
    return {start.event_id for start in effects.starts()} - set(effects.counts())


async def wait_for_readiness(service: ServiceProcess, status: int, timeout: float) -> None:
    async def check() -> None:
        assert service.process is not None
        assert service.process.poll() is None, f"{service.name} exited:\n{service.log()}"
        assert await asyncio.to_thread(readiness, service) == status

    await eventually(check, timeout=timeout)


async def wait_for_effects(effects: Effects, at_least: int, timeout: float) -> None:
    async def check() -> None:
        assert sum(effects.counts().values()) >= at_least

    await eventually(check, timeout=timeout)


async def assert_each_effect_once(
    effects: Effects, event_ids: list[str], timeout: float = 60
) -> None:
    async def all_done() -> None:
        counts = effects.counts()
        missing = [event_id for event_id in event_ids if counts[event_id] == 0]
        assert not missing, f"{len(missing)} of {len(event_ids)} events without an effect"

    await eventually(all_done, timeout=timeout)
    counts = effects.counts()
    duplicated = {event_id: n for event_id, n in counts.items() if n != 1}
    assert not duplicated, f"effects repeated: {duplicated}"
    assert set(counts) == set(event_ids)


async def finish(
    service: ServiceProcess, node: PrivateRabbitNode, namespace: Namespace, effects: Effects
) -> None:
    """The same process did every effect; it stops cleanly; nothing is left in the queues."""
    assert service.process is not None
    assert service.process.poll() is None, service.log()
    assert {effect.pid for effect in effects.effects()} == {service.process.pid}
    assert await asyncio.to_thread(service.terminate) == 0
    topology = namespace.settings().topology("notifier")
    await assert_empty(node.amqp_url, [topology.queue, topology.dead_letter_queue])


@pytest.mark.timeout(150)
async def test_connections_reset_mid_stream_lose_nothing_and_repeat_nothing(
    namespace: Namespace,
    private_node: PrivateRabbitNode,
    proxy: ThreadedTcpProxy,
    node_publisher: Publisher,
    effect_service: EffectServiceFactory,
    effects: Effects,
) -> None:
    service = start_behind_proxy(effect_service, private_node, proxy)
    event_ids = await send(node_publisher, namespace, *[SUBJECT] * N)

    # First cut: a plain reset. The client may reconnect at once (aio-pika waits at most its
    # 5 s reconnect interval), so its short unready moment is not asserted.
    await wait_for_effects(effects, 20, timeout=60)
    # The consumer's and the publisher's connections (the control consumer shares the first).
    assert await asyncio.to_thread(proxy.reset_all) >= 2
    assert mid_work(effects), "no handler was mid-work when the connections were cut"
    assert sum(effects.counts().values()) < N, "all work was done before the first cut"
    await wait_for_effects(effects, 80, timeout=60)  # resumed by itself
    await wait_for_readiness(service, 200, timeout=30)

    # Second cut: reset, and new connections refused for a while: unready until they pass.
    await asyncio.to_thread(proxy.set_mode, ProxyMode.REFUSE)
    assert await asyncio.to_thread(proxy.reset_all) >= 2
    assert mid_work(effects), "no handler was mid-work when the connections were cut"
    assert sum(effects.counts().values()) < N, "all work was done before the second cut"
    await wait_for_readiness(service, 503, timeout=10)
    await asyncio.to_thread(proxy.set_mode, ProxyMode.PASS)
    await wait_for_readiness(service, 200, timeout=30)

    await assert_each_effect_once(effects, event_ids)
    await finish(service, private_node, namespace, effects)


@pytest.mark.timeout(150)
async def test_a_blackholed_connection_loses_nothing_and_the_service_resumes_after_healing(
    namespace: Namespace,
    private_node: PrivateRabbitNode,
    proxy: ThreadedTcpProxy,
    node_publisher: Publisher,
    effect_service: EffectServiceFactory,
    effects: Effects,
) -> None:
    service = start_behind_proxy(effect_service, private_node, proxy)
    event_ids = await send(node_publisher, namespace, *[SUBJECT] * N)
    await wait_for_effects(effects, 20, timeout=30)

    await asyncio.to_thread(proxy.set_mode, ProxyMode.BLACKHOLE)
    cut_at = time.monotonic()
    assert mid_work(effects), "no handler was mid-work when the connection was cut"
    # Missed heartbeats tell the service within a few heartbeat intervals.
    await wait_for_readiness(service, 503, timeout=20)
    noticed_after = time.monotonic() - cut_at
    assert sum(effects.counts().values()) < N, "all work was done before the cut"

    async def cut_long_enough() -> None:
        assert time.monotonic() - cut_at >= BLACKHOLE_SECONDS
        assert await asyncio.to_thread(readiness, service) == 503  # still cut: still unready

    await eventually(cut_long_enough, timeout=BLACKHOLE_SECONDS + 5)
    await asyncio.to_thread(proxy.set_mode, ProxyMode.PASS)
    await wait_for_readiness(service, 200, timeout=30)

    await assert_each_effect_once(effects, event_ids)
    assert noticed_after < BLACKHOLE_SECONDS + 5, noticed_after
    await finish(service, private_node, namespace, effects)
