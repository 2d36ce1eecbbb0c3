"""The gateway's link to the broker: connects in the background, so the gateway starts (and
answers 503) while the broker is away, then declares every service's topology so events are
kept even before their consumers first start, and drains the dead-letter queues into the
operators' failure store and consuming what the gateway keeps (status, results).

The consumers have a connection of their own, as every consumer service does: what they take
in (a status report of a thousand transitions is a few hundred kB) does not queue the
publisher's confirms behind it, and a delivery that fails its connection cannot take ingest
down with it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from aio_pika.abc import AbstractRobustConnection
from aiormq.exceptions import AMQPError
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential

from services.gateway.settings import GatewaySettings
from services.messaging.connection import open_connection
from services.messaging.declare import Redeclare, declare_topology, redeclare_on_reconnect
from services.messaging.errors import TopologyMismatch
from services.messaging.exits import ServiceExit, log_refusal
from services.messaging.logs import get_logger
from services.messaging.publisher import Publisher

log = get_logger("gateway.broker")

RELINK_SECONDS = 5.0
# What the gateway's consumers hold at shutdown is store work (a status report, a dead letter):
# short, and redelivered if cut off, so the wait is bounded well below an orchestrator's kill.
DRAIN_SECONDS = 10.0


class Startable(Protocol):
    async def start(self, connection: AbstractRobustConnection) -> None: ...

    async def stop(self, drain_seconds: float) -> bool: ...

    @property
    def consuming(self) -> bool: ...


class BrokerLink:
    def __init__(
        self, settings: GatewaySettings, *, refuse: Callable[[], None] | None = None
    ) -> None:
        """`refuse` ends the gateway when its first link finds a queue declared with other
        arguments (as a consumer exits with code 2). Without it (an app served by something
        else) the link is retried and the gateway stays unready until the queue is fixed."""
        self.settings = settings
        self._refuse = refuse
        self._consumers: list[Startable] = []
        self._started: set[int] = set()
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
        self._consuming: AbstractRobustConnection | None = None

    def consume_with(self, consumer: Startable) -> None:
        """Start `consumer` on the consumers' connection once the topology is declared."""
        self._consumers.append(consumer)

    @property
    def ready(self) -> bool:
        """Connected, the topology declared, publishing not blocked by a resource alarm (every
        event would be answered 503 after the publish timeout: a load balancer should send
        them elsewhere), and every consumer consuming (a gateway that publishes but no longer
        drains dead letters or status is not well)."""
        return (
            self._declared
            and self.publisher.ready
            and not self.publisher.blocked
            and all(c.consuming for c in self._consumers if id(c) in self._started)
        )

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._link())

    async def _link(self) -> None:
        """Connect until it works; a topology mismatch (an operator has to fix the queue)
        ends the gateway, or where it cannot, is retried as an unexpected failure is: logged,
        never left to end the task quietly (the gateway would answer 503 for ever)."""
        while True:
            try:
                await self._connect()
                return
            except TopologyMismatch as exc:
                if self._refuse is not None:
                    log_refusal(log, ServiceExit.TOPOLOGY, exc)
                    self._refuse()
                    return
                if self.topology_error != str(exc):
                    log.exception("topology mismatch; not ready until the queue is fixed")
                self.topology_error = str(exc)
            except Exception:
                log.exception("linking to the broker failed unexpectedly; retrying")
            await asyncio.sleep(RELINK_SECONDS)

    async def _connect(self) -> None:
        topologies = self.settings.all_topologies()
        async for attempt in AsyncRetrying(
            wait=wait_exponential(multiplier=0.2, max=5),
            retry=retry_if_exception_type((AMQPError, ConnectionError, OSError)),
            before_sleep=lambda state: log.warning(
                "broker not reachable; retrying", extra={"attempt": state.attempt_number}
            ),
        ):
            with attempt:
                connection = self.publisher.connection or await self.publisher.connect()
                await declare_topology(
                    connection, topologies, unbind_retired=self.settings.unbind_retired
                )
                for consumer in self._consumers:
                    if id(consumer) not in self._started:
                        await consumer.start(await self._consumers_connection())
                        self._started.add(id(consumer))
        self.topology_error = None
        self._redeclare = redeclare_on_reconnect(  # held: aio-pika keeps it weakly
            connection,
            topologies,
            self._declared_again,
            unbind_retired=self.settings.unbind_retired,
        )
        self._declared = True
        log.info("connected to the broker; topology declared")

    async def _consumers_connection(self) -> AbstractRobustConnection:
        if self._consuming is None:
            self._consuming = await open_connection(
                self.settings.amqp_url, heartbeat=self.settings.heartbeat, name="gateway-consumers"
            )
        return self._consuming

    def _declared_again(self, declared: bool) -> None:
        """After a reconnect: not ready while the topology could not be declared again."""
        self._declared = declared

    async def close(self) -> None:
        """Stop linking, let the consumers finish (and ack) what they hold, then disconnect."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        started = [c for c in self._consumers if id(c) in self._started]
        await asyncio.gather(*(c.stop(DRAIN_SECONDS) for c in started))
        if self._consuming is not None:
            await self._consuming.close()
            self._consuming = None
        await self.publisher.close()
