"""Declaring the topology: idempotent, and a clear refusal when a queue differs."""

from __future__ import annotations

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection

from services.messaging.declare import declare_topology
from services.messaging.errors import TopologyMismatch
from tests.conftest import Namespace
from tests.support.queues import ready_messages

pytestmark = pytest.mark.broker


async def test_declaring_twice_is_harmless(namespace: Namespace) -> None:
    settings = namespace.settings()
    connection = await aio_pika.connect(namespace.amqp_url)
    async with connection:
        await declare_topology(connection, settings.all_topologies())
        await declare_topology(connection, settings.all_topologies())


async def test_a_queue_declared_with_other_arguments_is_a_clear_mismatch(
    namespace: Namespace,
) -> None:
    connection = await aio_pika.connect(namespace.amqp_url)
    async with connection:
        await declare_topology(connection, namespace.settings(delivery_limit=3).all_topologies())
        with pytest.raises(TopologyMismatch, match=r"x-delivery-limit.*Drain and delete"):
            await declare_topology(
                connection, namespace.settings(delivery_limit=9).all_topologies()
            )
        # The connection stays usable: the failed declare used a channel of its own.
        assert not connection.is_closed


async def _declare(namespace: Namespace, connection: AbstractConnection, **kwargs: bool) -> None:
    await declare_topology(connection, namespace.settings().all_topologies(), **kwargs)


async def _bind_as_before(namespace: Namespace, channel: AbstractChannel) -> None:
    """Bind the gateway's queue to `dataset.processed`, as gateways before result reports did."""
    gateway = namespace.settings().topology("gateway")
    queue = await channel.get_queue(gateway.queue)
    await queue.bind(gateway.events_exchange, routing_key="dataset.processed")


async def _routed_to_gateway(namespace: Namespace, channel: AbstractChannel, key: str) -> int:
    """Publish one message with routing key `key`: how many reach the gateway's queue."""
    gateway = namespace.settings().topology("gateway")
    queue = await channel.get_queue(gateway.queue)
    await queue.purge()
    exchange = await channel.get_exchange(gateway.events_exchange)
    await exchange.publish(aio_pika.Message(b"{}"), routing_key=key)
    return await ready_messages(namespace.amqp_url, gateway.queue)


async def test_declaring_keeps_a_binding_an_earlier_version_made(namespace: Namespace) -> None:
    """A processor of the earlier version may still run: its results reach the gateway only
    through that binding."""
    connection = await aio_pika.connect(namespace.amqp_url)
    async with connection, connection.channel() as channel:
        await _declare(namespace, connection)
        await _bind_as_before(namespace, channel)
        await _declare(namespace, connection)
        assert await _routed_to_gateway(namespace, channel, "dataset.processed") == 1


async def test_declaring_with_unbind_retired_removes_a_binding_an_earlier_version_made(
    namespace: Namespace,
) -> None:
    connection = await aio_pika.connect(namespace.amqp_url)
    async with connection, connection.channel() as channel:
        await _declare(namespace, connection)
        await _bind_as_before(namespace, channel)
        await _declare(namespace, connection, unbind_retired=True)
        assert await _routed_to_gateway(namespace, channel, "dataset.processed") == 0
        assert await _routed_to_gateway(namespace, channel, "results.reported") == 1
        # Declaring again, with nothing left to unbind, is harmless.
        await _declare(namespace, connection, unbind_retired=True)


async def _files_routed(namespace: Namespace, channel: AbstractChannel) -> tuple[int, int]:
    """Publish one `file.uploaded`: how many reach the processor's work queue and its lane."""
    processor = namespace.settings().topology("processor")
    [files] = processor.lanes
    queues = [processor.queue, processor.for_lane(files).queue]
    for name in queues:
        await (await channel.get_queue(name)).purge()
    exchange = await channel.get_exchange(processor.events_exchange)
    await exchange.publish(aio_pika.Message(b"{}"), routing_key="file.uploaded")
    work, lane = [await ready_messages(namespace.amqp_url, name) for name in queues]
    return work, lane


async def _bind_files_as_before(namespace: Namespace, channel: AbstractChannel) -> None:
    """Bind the processor's work queue to `file.uploaded`, as processors before the lane did."""
    processor = namespace.settings().topology("processor")
    queue = await channel.get_queue(processor.queue)
    await queue.bind(processor.events_exchange, routing_key="file.uploaded")


@pytest.mark.parametrize(
    ("flags", "routed"),
    [
        ({}, (1, 1)),  # the gateway's declaration: earlier processors may still run
        ({"unbind_moved": True}, (0, 1)),  # the processor's own: it consumes the lane
        ({"unbind_retired": True}, (0, 1)),
    ],
)
async def test_a_files_binding_an_earlier_processor_made_stays_until_unbound_as_moved(
    namespace: Namespace, flags: dict[str, bool], routed: tuple[int, int]
) -> None:
    connection = await aio_pika.connect(namespace.amqp_url)
    async with connection, connection.channel() as channel:
        await _declare(namespace, connection)
        await _bind_files_as_before(namespace, channel)
        await _declare(namespace, connection, **flags)
        assert await _files_routed(namespace, channel) == routed
