"""`RetryLater` through the real consumer and broker: the delayed retry waits at least as long
as the handler asked, in the first declared delay tier that is long enough."""

from __future__ import annotations

import time

import pytest

from contracts.envelope import Envelope
from services.messaging import failure as f
from services.messaging.errors import RetryLater
from tests.conftest import Namespace
from tests.integration.test_consumer import notification, publish, route, running
from tests.support.polling import eventually
from tests.support.queues import TTL_SLACK, assert_empty, take

pytestmark = pytest.mark.broker


class AsksToWait:
    def __init__(self, times: int, min_delay: float) -> None:
        self.times, self.min_delay = times, min_delay
        self.calls: list[float] = []

    async def __call__(self, event: Envelope) -> None:
        self.calls.append(time.monotonic())
        if len(self.calls) <= self.times:
            raise RetryLater("receiver busy", min_delay=self.min_delay)


async def test_the_retry_goes_to_the_first_tier_at_least_min_delay_long(
    namespace: Namespace,
) -> None:
    handler = AsksToWait(times=1, min_delay=1.5)
    routes = {"notification.requested": route(handler, delays=(1, 2, 4), immediate=3)}
    async with running(namespace, "notifier", routes, delays=(1, 2, 4)) as (pub, topo, _):
        await publish(pub, topo, notification())

        async def retried() -> None:
            assert len(handler.calls) == 2

        await eventually(retried, timeout=15)
    # No immediate retry (the handler asked to wait), then the 2 s tier, not the 1 s one.
    assert handler.calls[1] - handler.calls[0] >= 2.0 - TTL_SLACK
    await assert_empty(
        namespace.amqp_url, [topo.queue, topo.dead_letter_queue, *map(topo.retry_queue, (1, 2, 4))]
    )


async def test_asking_to_wait_still_uses_up_attempts(namespace: Namespace) -> None:
    handler = AsksToWait(times=100, min_delay=1)
    routes = {"notification.requested": route(handler, delays=(1,), immediate=3)}
    async with running(namespace, "notifier", routes, delays=(1,)) as (pub, topo, _):
        await publish(pub, topo, notification())
        [dead] = await take(namespace.amqp_url, topo.dead_letter_queue, 1, timeout=15)
    assert dead.headers[f.REASON] == "retries_exhausted"
    assert dead.headers[f.EXCEPTION_TYPE] == "services.messaging.errors.RetryLater"
    assert len(handler.calls) == 2
