"""Confirmed, persistent, mandatory publishing.

One robust connection and its confirming channels, used round-robin: one by default, which
carries many publishes in flight at once. More channels cost the broker more work per message
(each channel is a process that confirms on its own: measured, 4 channels took ~0.03-0.05 ms
more broker CPU per event end to end than 1) and bought no throughput here, even at 20,000
events/s of batched ingest. `publish` returns only after the broker confirmed; otherwise it
raises:

* `Unroutable` when the broker returned the message (nothing bound for the routing key);
* `BrokerUnavailable` when not connected, on a nack, or without a confirm in time.

`publish_many` pipelines a batch on one channel under one deadline and returns each message's
outcome (None once confirmed, else the error a single publish would have raised), so a caller
can say exactly which messages the broker took.

A nacked channel is replaced: on RabbitMQ 3.10 a channel that saw a quorum leader die can keep
nacking every publish, while a fresh channel is confirmed at once. The old channel is closed
once the publishes in flight on it are confirmed or refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import struct
import uuid
from asyncio import FIRST_COMPLETED
from collections.abc import Coroutine, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple, cast

import aio_pika
import aiormq
import orjson
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from aiormq import spec
from aiormq.abc import ChannelFrame, FrameType
from aiormq.channel import Returning
from aiormq.exceptions import AMQPError, ChannelInvalidStateError, DeliveryError, PublishError
from pamqp.header import ContentHeader

from contracts.envelope import Envelope
from services.messaging.connection import open_connection
from services.messaging.errors import BrokerUnavailable, Unpublishable, Unroutable
from services.messaging.logs import get_logger

log = get_logger("publisher")

CONTENT_TYPE = "application/cloudevents+json"
HeaderValue = str | int | float | bool | datetime | None
PERSISTENT = int(aio_pika.DeliveryMode.PERSISTENT)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

CLOSE_TIMEOUT = 1.0
"""How long `close` lets its background work end after the connection closed."""

Outcome = Unroutable | BrokerUnavailable | Unpublishable | None
"""A message's fate in `publish_many`: None once confirmed, else why the broker did not take it."""


class Outgoing(NamedTuple):
    """One message of a pipelined batch (its properties must carry a `message_id`)."""

    body: bytes
    properties: spec.Basic.Properties
    routing_key: str


def event_body(event: Envelope) -> bytes:
    """The event as a structured-mode CloudEvent: the bytes `EVENT_ADAPTER.dump_json` gives,
    from the event's own model serializer (the union's dispatch would triple the cost)."""
    return event.__pydantic_serializer__.to_json(event)


class Serialised(NamedTuple):
    """An event with its body (`event_body`), serialised once for every place it goes: a
    handler's follow-up is published, kept in the inbox record and, as a result, reported."""

    event: Envelope
    body: bytes

    @classmethod
    def of(cls, event: Envelope) -> Serialised:
        return cls(event, event_body(event))


def envelope_body(event: Envelope, data: Mapping[str, Any]) -> bytes:
    """The structured-mode CloudEvent of `event` with `data` given as plain values (what
    `event_body` would give had `data` been its payload): a batch of records, or of events
    already serialised (`orjson.Fragment`), goes out without building a model per item."""
    return orjson.dumps(
        {
            "type": event.type,
            "specversion": event.specversion,
            "id": event.id,
            "source": event.source,
            "time": event.time,
            "datacontenttype": event.datacontenttype,
            "dataschema": event.dataschema,
            "data": data,
        },
        option=orjson.OPT_UTC_Z,
    )


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
        timestamp=_amqp_timestamp(event.time),
        headers=dict(headers) if headers else None,
    )


def _amqp_timestamp(at: datetime) -> datetime | None:
    """`at` as AMQP's timestamp, which counts unsigned seconds since 1970 (pamqp takes a naive
    time for UTC): None for an event dated earlier (its `time` may be any RFC 3339 time); the
    body has the time either way."""
    aware = at if at.tzinfo is not None else at.replace(tzinfo=UTC)
    return at if aware >= EPOCH else None


class Publisher:
    def __init__(
        self,
        url: str,
        *,
        channels: int = 1,
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
        self._replacing: set[int] = set()  # channel slots whose replacement is opening
        # Publishes waiting for the end of this turn of the loop, by exchange (see `_send`).
        self._coalesced: dict[str, list[tuple[Outgoing, asyncio.Future[Outcome]]]] = {}

    @property
    def connection(self) -> AbstractRobustConnection | None:
        return self._connection

    async def connect(self) -> AbstractRobustConnection:
        """Open the connection and channels; raises if the broker does not answer."""
        connection = await open_connection(self._url, heartbeat=self._heartbeat, name=self._name)
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
    def blocked(self) -> bool:
        """The broker blocks this connection's publishes (a memory or disk alarm): each waits
        until the alarm clears, and is answered as not confirmed after `confirm_timeout`.
        (aiormq keeps the state in a private event; `tests/faults/test_resource_alarm.py`
        pins it.)"""
        connection = self._connection
        transport = None if connection is None else connection.transport
        if transport is None:
            return False
        unblocked = getattr(transport.connection, "_Connection__connection_unblocked", None)
        return isinstance(unblocked, asyncio.Event) and not unblocked.is_set()

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
            body if body is not None else event_body(event),
            event_properties(event, headers),
            exchange,
            routing_key or event.type,
        )

    async def publish_events(self, events: Sequence[Envelope], *, exchange: str) -> list[Outcome]:
        """`publish_event` for many events at once (routed by type): see `publish_many`."""
        return await self.publish_many(
            [Outgoing(event_body(event), event_properties(event), event.type) for event in events],
            exchange=exchange,
        )

    async def publish_many(self, messages: Sequence[Outgoing], *, exchange: str) -> list[Outcome]:
        """Publish every message (persistent as given, mandatory) pipelined on one channel,
        and wait up to the confirm timeout for all their confirms together.

        Never raises for a message the broker did not take: its outcome says why (returned,
        nacked, not confirmed in time, or no connection), as `publish` would have raised."""
        if not messages:
            return []
        try:
            slot, channel = self._pick()
        except BrokerUnavailable as exc:
            return [BrokerUnavailable(str(exc)) for _ in messages]  # one each: each is raised
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._confirm_timeout
        outcomes: list[Outcome] = [None] * len(messages)
        waiting = list(range(len(messages)))
        while waiting:
            if loop.time() >= deadline:
                # Written now, they could only be reported timed out: a caller's retry would
                # then publish them twice. Not written, the report is exact.
                for i in waiting:
                    outcomes[i] = self._timed_out(written=False)
                break
            now: list[int] = []
            try:
                async with asyncio.timeout_at(deadline):
                    # aio-pika's underlay of a channel is always aiormq's Channel.
                    underlay = cast(aiormq.Channel, await channel.get_underlay_channel())
                    now, waiting, confirmations = await _write_pipelined(
                        underlay, exchange, messages, waiting
                    )
            except TimeoutError:  # before or while writing: `_write_locked` took them back
                for i in (*now, *waiting):
                    outcomes[i] = self._timed_out(written=False)
                break
            except _Unframable as exc:  # nothing written: the others go in the next round
                for i, failure in exc.failures.items():
                    unpublishable = Unpublishable(f"the message cannot be framed: {failure}")
                    unpublishable.__cause__ = failure
                    outcomes[i] = unpublishable
                waiting = [i for i in waiting if i not in exc.failures]
                continue
            except (AMQPError, ChannelInvalidStateError, ConnectionError) as exc:
                for i in (*now, *waiting):
                    outcomes[i] = _connection_failed(exc)
                break
            await asyncio.wait(confirmations, timeout=max(deadline - loop.time(), 0))
            for i, confirmation in zip(now, confirmations, strict=True):
                outcomes[i] = self._outcome(confirmation, exchange, messages[i].routing_key)
        if any(
            isinstance(o, BrokerUnavailable) and isinstance(o.__cause__, DeliveryError)
            for o in outcomes
        ):
            self._replace_channel(slot, channel)
        return outcomes

    def _outcome(
        self, confirmation: asyncio.Future[Any], exchange: str, routing_key: str
    ) -> Outcome:
        if not confirmation.done():
            confirmation.cancel()  # a late confirm is then ignored by aiormq
            return self._timed_out(written=True)
        if confirmation.cancelled():
            return BrokerUnavailable(
                "the channel closed before the broker confirmed", maybe_published=True
            )
        exc = confirmation.exception()
        failure: Outcome
        if exc is None:
            return None
        if isinstance(exc, PublishError):  # returned: the channel has on_return_raises
            failure = Unroutable(exchange, routing_key)
        elif isinstance(exc, DeliveryError):
            failure = BrokerUnavailable("the broker refused the message (nack)")
        elif isinstance(exc, AMQPError | ChannelInvalidStateError | ConnectionError):
            failure = _connection_failed(exc, written=True)
        elif type(exc) is Exception:
            # What aiormq fails its waiting futures with when a channel closes without a
            # reason (this publisher's `close`, or aio-pika's during a reconnect).
            failure = BrokerUnavailable(
                "the channel closed before the broker confirmed", maybe_published=True
            )
        else:
            raise exc
        failure.__cause__ = exc
        return failure

    def _timed_out(self, *, written: bool) -> BrokerUnavailable:
        return BrokerUnavailable(
            f"no confirm within {self._confirm_timeout}s", maybe_published=written
        )

    async def _send(
        self, body: bytes, properties: spec.Basic.Properties, exchange: str, routing_key: str
    ) -> None:
        """Publish one message, written with the others sent in the same turn of the event loop
        (`publish_many`: one lock, one frame buffer, one socket write and one deadline for all
        of them, where each on its own cost a lock round, a timeout, a drain and a write)."""
        if not properties.message_id:
            # Returns are matched by message id: give one, as aiormq's `basic_publish` does.
            properties.message_id = uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        outcome: asyncio.Future[Outcome] = loop.create_future()
        if not self._coalesced:
            loop.call_soon(self._publish_coalesced)
        self._coalesced.setdefault(exchange, []).append(
            (Outgoing(body, properties, routing_key), outcome)
        )
        failure = await outcome
        if failure is not None:
            raise failure

    def _publish_coalesced(self) -> None:
        coalesced, self._coalesced = self._coalesced, {}
        for exchange, waiting in coalesced.items():
            self._in_background(self._publish_waiting(exchange, waiting))

    async def _publish_waiting(
        self, exchange: str, waiting: list[tuple[Outgoing, asyncio.Future[Outcome]]]
    ) -> None:
        try:
            outcomes = await self.publish_many(
                [message for message, _ in waiting], exchange=exchange
            )
        except asyncio.CancelledError:  # the publisher closed
            for _, outcome in waiting:
                if not outcome.done():
                    outcome.set_result(
                        BrokerUnavailable(
                            "the publisher closed before a confirm", maybe_published=True
                        )
                    )
            raise
        except BaseException as exc:  # a bug: every waiting publisher sees it
            for _, outcome in waiting:
                if not outcome.done():
                    outcome.set_exception(exc)
            raise
        for (_, outcome), result in zip(waiting, outcomes, strict=True):
            if not outcome.done():  # its publisher may have been cancelled meanwhile
                outcome.set_result(result)

    def _replace_channel(self, slot: int, channel: AbstractRobustChannel) -> None:
        if slot in self._replacing:
            return  # one replacement per slot at a time, or the spare fresh channel would leak
        self._replacing.add(slot)

        async def replace() -> None:
            try:
                if self._connection is None or self._channels[slot] is not channel:
                    return  # replaced already
                try:
                    fresh = await self._open_channel(self._connection)
                except (AMQPError, ChannelInvalidStateError, ConnectionError):
                    log.warning("could not replace a nacked channel", exc_info=True)
                    return
                self._channels[slot] = fresh
            finally:
                self._replacing.discard(slot)
            # New publishes take the fresh channel; those written on the old one keep their
            # confirms (closing now would fail messages the broker may well have taken).
            await self._settled(channel)
            with contextlib.suppress(AMQPError, ChannelInvalidStateError, ConnectionError):
                await channel.close()

        self._in_background(replace())

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _settled(self, channel: AbstractRobustChannel) -> None:
        """Wait until every publish on `channel` is confirmed or refused (those that picked it
        before its replacement may still be writing), at most the confirm timeout: each
        publisher gives up on its own by then."""
        with contextlib.suppress(
            TimeoutError, AMQPError, ChannelInvalidStateError, ConnectionError
        ):
            async with asyncio.timeout(self._confirm_timeout):
                underlay = cast(aiormq.Channel, await channel.get_underlay_channel())
                while waiting := [c for c in underlay.confirmations.values() if not c.done()]:
                    await asyncio.wait(waiting)

    async def close(self) -> None:
        """Close the connection: publishes still waiting for a confirm fail, and the publisher's
        own background work (coalesced publishes, channel replacements) ends with it."""
        if self._connection is not None:
            await self._connection.close()
        self._connection = None
        self._channels = []
        # Closing failed what was waiting for a confirm, so this work ends at once; cancelled
        # only if it does not (its waiting publishers then fail, never hang).
        if background := set(self._background):
            _, late = await asyncio.wait(background, timeout=CLOSE_TIMEOUT)
            for task in late:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)


def _connection_failed(exc: BaseException, *, written: bool = False) -> BrokerUnavailable:
    return BrokerUnavailable(f"connection to the broker failed: {exc!r}", maybe_published=written)


async def _write_pipelined(
    channel: aiormq.Channel, exchange: str, messages: Sequence[Outgoing], waiting: list[int]
) -> tuple[list[int], list[int], list[asyncio.Future[Any]]]:
    """Write the `waiting` messages (indexes) that can go now, each registered for its confirm;
    those written, those left for a later round (see `_one_per_message_id`), and the
    written ones' confirmation futures.

    What aiormq's `basic_publish` does for one message (a delivery tag, a confirmation future
    rejected if the channel closes, the message id a return is matched by, all under the
    channel's lock), done for the batch with one lock, one frame buffer and one socket write:
    per message, `basic_publish` costs a lock round, a timeout, a drain wait and a write.
    Which ids are free is decided under the lock, with no suspension before they are
    registered: a writer held up by backpressure cannot let a second message with one of its
    ids through meanwhile."""
    if not all(messages[i].properties.message_id for i in waiting):
        raise ValueError("a pipelined message needs a message_id: returns are matched by it")
    while True:
        async with channel.lock:
            now, later, busy = _one_per_message_id(channel, messages, waiting)
            if now:
                return now, later, await _write_locked(channel, exchange, messages, now)
        # Every one is in flight elsewhere: wait for one of those to settle.
        await asyncio.wait(busy, return_when=FIRST_COMPLETED)


async def _write_locked(
    channel: aiormq.Channel, exchange: str, messages: Sequence[Outgoing], now: list[int]
) -> list[asyncio.Future[Any]]:
    batch = [messages[i] for i in now]
    try:
        payload = ChannelFrame.marshall(channel.number, _frames(channel, exchange, batch))
    except _FRAMING_ERRORS:
        # One message's fault must not fail the others framed with it: find which.
        raise _Unframable(_unframable(channel, exchange, messages, now)) from None
    first = channel.delivery_tag + 1
    confirmations = [
        _expect_confirm(channel, tag, message.properties.message_id or "")
        for tag, message in enumerate(batch, first)
    ]
    channel.delivery_tag += len(batch)
    try:
        await channel.write_queue.put(payload)
    except BaseException:
        # Not written, so the broker never saw these tags: give them back.
        channel.delivery_tag = first - 1
        for tag, confirmation in enumerate(confirmations, first):
            channel.confirmations.pop(tag, None)
            confirmation.cancel()
        raise
    return confirmations


_FRAMING_ERRORS = (TypeError, ValueError, OverflowError, struct.error)
"""What pamqp raises for a value it cannot encode."""


class _Unframable(Exception):
    """Messages of a batch that cannot be framed (index → what pamqp raised); nothing was
    written."""

    def __init__(self, failures: dict[int, Exception]) -> None:
        super().__init__(f"{len(failures)} message(s) cannot be framed")
        self.failures = failures


def _unframable(
    channel: aiormq.Channel, exchange: str, messages: Sequence[Outgoing], now: list[int]
) -> dict[int, Exception]:
    failures: dict[int, Exception] = {}
    for i in now:
        try:
            ChannelFrame.marshall(channel.number, _frames(channel, exchange, [messages[i]]))
        except _FRAMING_ERRORS as exc:
            failures[i] = exc
    if not failures:
        raise RuntimeError("a batch failed to frame, but each of its messages frames alone")
    return failures


def _frames(
    channel: aiormq.Channel, exchange: str, messages: Sequence[Outgoing]
) -> list[FrameType]:
    frames: list[FrameType] = []
    for message in messages:
        frames.append(
            spec.Basic.Publish(exchange=exchange, routing_key=message.routing_key, mandatory=True)
        )
        frames.append(ContentHeader(properties=message.properties, body_size=len(message.body)))
        frames.extend(channel._split_body(message.body))
    return frames


def _one_per_message_id(
    channel: aiormq.Channel, messages: Sequence[Outgoing], waiting: list[int]
) -> tuple[list[int], list[int], set[asyncio.Future[Any]]]:
    """Of the `waiting` messages (indexes), those to write now, those to write after them, and
    the publishes in flight the latter wait for.

    aiormq matches a returned message to its publish by message id: two in flight on a channel
    with one id would get each other's outcome (the returned one confirmed, silently). So a
    message whose id is in flight already (earlier in the batch, or another caller's) waits
    for that one to settle; ids are nearly always unique, so nearly always all go at once."""
    now: list[int] = []
    later: list[int] = []
    busy: set[asyncio.Future[Any]] = set()
    taken: set[str] = set()
    for i in waiting:
        message_id = messages[i].properties.message_id or ""
        in_flight = _in_flight(channel, message_id)
        if in_flight is not None:
            busy.add(in_flight)
            later.append(i)
        elif message_id in taken:
            later.append(i)
        else:
            taken.add(message_id)
            now.append(i)
    return now, later, busy


def _in_flight(channel: aiormq.Channel, message_id: str) -> asyncio.Future[Any] | None:
    """The confirmation of the publish with this id still in flight on the channel, if any.
    A `Returning` placeholder is not one: aiormq leaves it for a returned message's
    confirm, its publish has failed already, and nothing ever completes it."""
    confirmation = channel.confirmations.get(channel.message_id_delivery_tag.get(message_id, 0))
    if confirmation is None or isinstance(confirmation, Returning) or confirmation.done():
        return None
    return confirmation


def _expect_confirm(channel: aiormq.Channel, tag: int, message_id: str) -> asyncio.Future[Any]:
    confirmation = channel.create_future()
    channel.confirmations[tag] = confirmation
    channel.message_id_delivery_tag[message_id] = tag

    def forget(_: asyncio.Future[Any]) -> None:
        if channel.message_id_delivery_tag.get(message_id) == tag:
            del channel.message_id_delivery_tag[message_id]

    confirmation.add_done_callback(forget)
    return confirmation
