"""Declares topology values (`contracts.topology`) on the broker, idempotently.

Every service calls this at start-up (and after each reconnect, through aio-pika's robust
channels). A queue that already exists with other arguments makes the broker close the channel
with PRECONDITION_FAILED; that is turned into a `TopologyMismatch` that says what to do.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractQueue,
    AbstractRobustConnection,
)
from aiormq.exceptions import AMQPError, ChannelPreconditionFailed

from contracts.topology import ExchangeSpec, QueueSpec, ServiceTopology
from services.messaging.errors import TopologyMismatch
from services.messaging.logs import get_logger

log = get_logger("declare")

_EXCHANGE_TYPES = {"topic": aio_pika.ExchangeType.TOPIC, "direct": aio_pika.ExchangeType.DIRECT}


async def declare_exchange(channel: AbstractChannel, spec: ExchangeSpec) -> None:
    await channel.declare_exchange(spec.name, _EXCHANGE_TYPES[spec.kind], durable=spec.durable)


async def declare_queue(channel: AbstractChannel, spec: QueueSpec) -> AbstractQueue:
    try:
        return await channel.declare_queue(
            spec.name, durable=spec.durable, arguments=dict(spec.arguments)
        )
    except ChannelPreconditionFailed as exc:
        raise TopologyMismatch(
            f"queue {spec.name!r} exists with other arguments than this service declares "
            f"({exc}); wanted {dict(spec.arguments)}. Drain and delete the queue, or configure "
            "the service like the deployment that created it."
        ) from exc


async def declare_topology(
    connection: AbstractConnection,
    topologies: Iterable[ServiceTopology],
    *,
    unbind_retired: bool = False,
    unbind_moved: bool = False,
) -> None:
    """Declare exchanges, queues and bindings of the given services, on a throwaway channel;
    with `unbind_retired`, also remove the bindings earlier versions made that these no longer
    use (only once no service of such a version runs: it may still rely on them). With
    `unbind_moved` (or `unbind_retired`), remove the work queues' bindings of types now in a
    lane: what the service that consumes the lane does as it starts.

    A dedicated channel keeps a PRECONDITION_FAILED from closing a channel that is in use.
    """
    async with connection.channel() as channel:
        seen_exchanges: set[ExchangeSpec] = set()
        for topology in topologies:
            for exchange in topology.exchanges():
                if exchange not in seen_exchanges:
                    await declare_exchange(channel, exchange)
                    seen_exchanges.add(exchange)
            queues = {spec.name: await declare_queue(channel, spec) for spec in topology.queues()}
            for binding in topology.bindings():
                await queues[binding.queue].bind(binding.exchange, routing_key=binding.routing_key)
            stale = [
                *(topology.retired_bindings() if unbind_retired else ()),
                *(topology.moved_bindings() if unbind_moved or unbind_retired else ()),
            ]
            for binding in stale:
                # Unbinding what is not bound is a no-op.
                await queues[binding.queue].unbind(
                    binding.exchange, routing_key=binding.routing_key
                )


Redeclare = Callable[[AbstractRobustConnection | None], Awaitable[None]]


REDECLARE_BACKOFF = (1.0, 30.0)
"""First and longest pause between tries to declare again after a reconnect that failed to."""


def redeclare_on_reconnect(
    connection: AbstractRobustConnection,
    topologies: Iterable[ServiceTopology],
    on_result: Callable[[bool], None] = lambda declared: None,
    *,
    unbind_retired: bool = False,
    unbind_moved: bool = False,
) -> Redeclare:
    """Declare again after every reconnect: a broker that lost its definitions gets them back.
    A declaration that fails (a queue redeclared with other arguments meanwhile, say) is
    tried again with backoff until it works; `on_result` hears each outcome, so readiness
    can say what is true.

    aio-pika holds reconnect callbacks weakly: keep the returned callback for as long as the
    connection lives.
    """
    wanted = tuple(topologies)
    retrying: set[asyncio.Task[None]] = set()

    async def attempt(conn: AbstractRobustConnection) -> bool:
        try:
            await declare_topology(
                conn, wanted, unbind_retired=unbind_retired, unbind_moved=unbind_moved
            )
        except (TopologyMismatch, AMQPError, ConnectionError):
            on_result(False)
            log.exception("declaring the topology after a reconnect failed")
            return False
        on_result(True)
        return True

    async def until_declared(conn: AbstractRobustConnection) -> None:
        pause, longest = REDECLARE_BACKOFF
        while not conn.is_closed:
            await asyncio.sleep(pause)
            if await attempt(conn):
                return
            pause = min(pause * 2, longest)

    async def redeclare(conn: AbstractRobustConnection | None, /) -> None:
        if conn is None:
            return
        # aio-pika awaits this callback in its reconnect: the retries go on beside it.
        if not await attempt(conn) and not retrying:
            task = asyncio.get_running_loop().create_task(until_declared(conn))
            retrying.add(task)
            task.add_done_callback(retrying.discard)

    connection.reconnect_callbacks.add(redeclare)
    return redeclare
