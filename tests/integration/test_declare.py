"""Declaring the topology: idempotent, and a clear refusal when a queue differs."""

from __future__ import annotations

import aio_pika
import pytest

from services.messaging.declare import declare_topology
from services.messaging.errors import TopologyMismatch
from tests.conftest import Namespace

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
