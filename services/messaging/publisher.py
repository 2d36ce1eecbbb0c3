"""Confirmed, persistent, mandatory publishing.

One robust connection, a few confirming channels used round-robin (a channel carries many
publishes in flight at once; several spread the framing work). `publish` returns only after
the broker confirmed; otherwise it raises:

* `Unroutable` when the broker returned the message (nothing bound for the routing key);
* `BrokerUnavailable` when not connected, on a nack, or without a confirm in time.

A nacked channel is replaced: on RabbitMQ 3.10 a channel that saw a quorum leader die can keep
nacking every publish, while a fresh channel is confirmed at once.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Mapping
from datetime import datetime

import aio_pika
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from aiormq import spec
from aiormq.exceptions import AMQPError, ChannelInvalidStateError, DeliveryError, PublishError

from contracts.envelope import Envelope
from contracts.events import EVENT_ADAPTER
from services.messaging.errors import BrokerUnavailable, Unroutable
from services.messaging.logs import get_logger

log = get_logger("publisher")

CONTENT_TYPE = "application/cloudevents+json"
HeaderValue = str | int | float | bool | datetime | None
PERSISTENT = int(aio_pika.DeliveryMode.PERSISTENT)


def event_properties(
    event: Envelope, headers: Mapping[str, HeaderValue] | None = None
) -> spec.Basic.Properties:
    """AMQP properties of a persistent message carrying the event as a structured-mode
    CloudEvent (built directly: no intermediate message object on the hot path)."""
    return spec.Basic.Properties(
        content_type=CONTENT_TYPE,
        delivery_mode=PERSISTENT,
        message_id=event.id,
        message_type=event.type,
        correlation_id=event.correlation(),
        timestamp=event.time,
        headers=dict(headers) if headers else None,
    )


class Publisher:
    def __init__(
        self,
        url: str,
        *,
        channels: int = 4,
        confirm_timeout: float = 5.0,
        heartbeat: int = 30,
        name: str = "courier-publisher",
    ) -> None:
        self._url = url
        self._channel_count = channels
        self._confirm_timeout = confirm_timeout
        self._heartbeat = heartbeat
        self._name = name
        self._connection: AbstractRobustConnection | None = None
        self._channels: list[AbstractRobustChannel] = []
        self._next = itertools.count()
        self._background: set[asyncio.Task[None]] = set()

    @property
    def connection(self) -> AbstractRobustConnection | None:
        return self._connection

    async def connect(self) -> AbstractRobustConnection:
        """Open the connection and channels; raises if the broker does not answer."""
        connection = await aio_pika.connect_robust(
            self._url,
            heartbeat=self._heartbeat,
            client_properties={"connection_name": self._name},
        )
        try:
            self._channels = [
                await self._open_channel(connection) for _ in range(self._channel_count)
            ]
        except BaseException:
            await connection.close()
            raise
        self._connection = connection
        return connection

    async def _open_channel(self, connection: AbstractRobustConnection) -> AbstractRobustChannel:
        return await connection.channel(publisher_confirms=True, on_return_raises=True)

    @property
    def ready(self) -> bool:
        """Connected with an open channel: a publish can be attempted."""
        connection = self._connection
        return (
            connection is not None
            and connection.connected.is_set()
            and any(not ch.is_closed for ch in self._channels)
        )

    def _pick(self) -> tuple[int, AbstractRobustChannel]:
        # Checked per publish: the connection first, then each channel only as it is tried
        # (`ready` would look at every channel, on every publish).
        connection = self._connection
        if connection is None or not connection.connected.is_set() or not self._channels:
            raise BrokerUnavailable("not connected to the broker")
        for _ in range(len(self._channels)):
            slot = next(self._next) % len(self._channels)
            if not self._channels[slot].is_closed:
                return slot, self._channels[slot]
        raise BrokerUnavailable("no open channel to the broker")

    async def publish(self, message: aio_pika.Message, *, exchange: str, routing_key: str) -> None:
        await self._send(message.body, message.properties, exchange, routing_key)

    async def publish_raw(
        self, body: bytes, properties: spec.Basic.Properties, *, exchange: str, routing_key: str
    ) -> None:
        """Publish a body with ready AMQP properties (a delivery's copy, say)."""
        await self._send(body, properties, exchange, routing_key)

    async def publish_event(
        self,
        event: Envelope,
        *,
        exchange: str,
        routing_key: str | None = None,
        body: bytes | None = None,
        headers: Mapping[str, HeaderValue] | None = None,
    ) -> None:
        await self._send(
            body if body is not None else EVENT_ADAPTER.dump_json(event),  # type: ignore[arg-type]
            event_properties(event, headers),
            exchange,
            routing_key or event.type,
        )

    async def _send(
        self, body: bytes, properties: spec.Basic.Properties, exchange: str, routing_key: str
    ) -> None:
        slot, channel = self._pick()
        try:
            async with asyncio.timeout(self._confirm_timeout):
                # Straight to the channel's aiormq layer: aio-pika's Exchange and Message
                # objects would only be rebuilt into these same frames.
                underlay = await channel.get_underlay_channel()
                await underlay.basic_publish(
                    body,
                    exchange=exchange,
                    routing_key=routing_key,
                    properties=properties,
                    mandatory=True,
                )
        except PublishError as exc:  # returned: the channel has on_return_raises
            raise Unroutable(exchange, routing_key) from exc
        except DeliveryError as exc:
            self._replace_channel(slot, channel)
            raise BrokerUnavailable("the broker refused the message (nack)") from exc
        except TimeoutError as exc:
            raise BrokerUnavailable(f"no confirm within {self._confirm_timeout}s") from exc
        except (AMQPError, ChannelInvalidStateError, ConnectionError) as exc:
            raise BrokerUnavailable(f"connection to the broker failed: {exc!r}") from exc

    def _replace_channel(self, slot: int, channel: AbstractRobustChannel) -> None:
        async def replace() -> None:
            if self._connection is None or self._channels[slot] is not channel:
                return  # someone else replaced it already
            try:
                fresh = await self._open_channel(self._connection)
            except (AMQPError, ChannelInvalidStateError, ConnectionError):
                log.warning("could not replace a nacked channel", exc_info=True)
                return
            self._channels[slot] = fresh
            await channel.close()

        task = asyncio.get_running_loop().create_task(replace())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()
        self._connection = None
        self._channels = []
