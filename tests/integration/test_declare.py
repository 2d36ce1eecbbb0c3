"""Declaring the topology: idempotent, and a clear refusal when a queue differs."""

from __future__ import annotations

import aio_pika
import pytest

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


async def test_declaring_removes_a_binding_an_earlier_version_made(namespace: Namespace) -> None:
    """Gateways before batched result reports bound their queue to `dataset.processed`; an
    upgraded broker must stop routing each result there."""
    settings = namespace.settings()
    gateway = settings.topology("gateway")
    connection = await aio_pika.connect(namespace.amqp_url)
    async with connection, connection.channel() as channel:
        await declare_topology(connection, settings.all_topologies())
        queue = await channel.get_queue(gateway.queue)
        await queue.bind(gateway.events_exchange, routing_key="dataset.processed")  # as before
        exchange = await channel.get_exchange(gateway.events_exchange)
        before = await exchange.publish(
            aio_pika.Message(b"{}"), routing_key="dataset.processed", mandatory=True
        )
        assert before is not None and await ready_messages(namespace.amqp_url, queue.name) == 1
        await queue.purge()

        await declare_topology(connection, settings.all_topologies())

        await exchange.publish(aio_pika.Message(b"{}"), routing_key="dataset.processed")
        assert await ready_messages(namespace.amqp_url, queue.name) == 0
        # Declaring again (nothing left to unbind) is harmless.
        await declare_topology(connection, settings.all_topologies())
