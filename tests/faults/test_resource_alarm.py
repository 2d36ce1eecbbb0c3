"""The gateway while the broker blocks publishing (a memory alarm on a private RabbitMQ node):
not ready, so that a load balancer sends events elsewhere, and ready again once it clears.

Ready throughout, it answered every event 503 after its publish timeout for as long as the
alarm lasted, while a load balancer kept sending them there.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.support.polling import eventually
from tests.support.processes import ServiceProcess, base_url
from tests.support.rabbit_node import PrivateRabbitNode

pytestmark = [pytest.mark.faults, pytest.mark.broker]

EVENT = {"type": "notification.requested", "data": {"recipient": "ops", "subject": "s"}}


@pytest.mark.timeout(120)
async def test_a_gateway_whose_publishing_the_broker_blocks_is_not_ready_until_it_clears(
    private_node: PrivateRabbitNode, gateway_process: ServiceProcess
) -> None:
    gw = gateway_process.start().wait_ready()
    async with httpx.AsyncClient(base_url=base_url(gw), timeout=30) as http:
        assert (await http.post("/v1/events", json=EVENT)).status_code == 202
        await asyncio.to_thread(private_node.memory_alarm, True)
        try:
            # A publish meets the alarm: not taken in time, 503 (and the broker says it blocks).
            assert (await http.post("/v1/events", json=EVENT)).status_code == 503

            async def blocked() -> None:
                answer = await http.get("/readyz")
                assert answer.status_code == 503, answer.text
                assert answer.json()["publishing_blocked"] is True

            await eventually(blocked, timeout=20)
        finally:
            await asyncio.to_thread(private_node.memory_alarm, False)

        async def ready_again() -> None:
            assert (await http.get("/readyz")).status_code == 200

        await eventually(ready_again, timeout=30)
        assert (await http.post("/v1/events", json=EVENT)).status_code == 202
