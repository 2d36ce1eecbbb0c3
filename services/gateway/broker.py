"""The gateway's link to the broker: connects in the background, so the gateway starts (and
answers 503) while the broker is away, then declares every service's topology so events are
kept even before their consumers first start, and drains the dead-letter queues into the
operators' failure store."""

from __future__ import annotations

import asyncio

from aiormq.exceptions import AMQPError
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential

from services.messaging.dead_letters import DeadLetterDrain
from services.messaging.declare import Redeclare, declare_topology, redeclare_on_reconnect
from services.messaging.errors import TopologyMismatch
from services.messaging.logs import get_logger
from services.messaging.publisher import Publisher
from services.messaging.settings import CourierSettings

log = get_logger("gateway.broker")


class BrokerLink:
    def __init__(self, settings: CourierSettings, drain: DeadLetterDrain | None = None) -> None:
        self.settings = settings
        self._drain = drain
        self.publisher = Publisher(
            settings.amqp_url,
            channels=settings.publisher_channels,
            confirm_timeout=settings.publish_timeout,
            heartbeat=settings.heartbeat,
            name="gateway-publisher",
        )
        self.topology_error: str | None = None
        self._declared = False
        self._task: asyncio.Task[None] | None = None
        self._redeclare: Redeclare | None = None

    @property
    def ready(self) -> bool:
        return self._declared and self.publisher.ready

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        topologies = self.settings.all_topologies()
        try:
            async for attempt in AsyncRetrying(
                wait=wait_exponential(multiplier=0.2, max=5),
                retry=retry_if_exception_type((AMQPError, ConnectionError, OSError)),
                before_sleep=lambda state: log.warning(
                    "broker not reachable; retrying", extra={"attempt": state.attempt_number}
                ),
            ):
                with attempt:
                    connection = self.publisher.connection or await self.publisher.connect()
                    await declare_topology(connection, topologies)
                    if self._drain is not None:
                        await self._drain.start(connection)
        except TopologyMismatch as exc:
            self.topology_error = str(exc)
            log.exception("topology mismatch; publishing may be refused")
            return
        self._redeclare = redeclare_on_reconnect(connection, topologies)  # held: weak callback
        self._declared = True
        log.info("connected to the broker; topology declared")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.publisher.close()
