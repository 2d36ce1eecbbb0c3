"""Dead letters as values, draining dead-letter queues, and replaying a dead letter.

A dead letter reaches a `<ns>.<service>.dlq` queue two ways: the consumer republishes it with
Courier's `courier-*` headers (reasons `invalid`, `permanent`, `retries_exhausted`), or the
broker dead-letters it after `x-delivery-limit` redeliveries (reason `delivery_limit`, the story
only in `x-death`). `read_dead_letter` turns either into one `DeadLetter` value.

The drain consumes every service's dead-letter queue and acknowledges a message only after the
sink (the operators' failure store) committed it. A replay republishes a dead letter, confirmed,
straight into the work queue of the service that failed it (a cancellation into its control
queue; not to the topic exchange, so other subscribers do not get it twice), with its attempt
counter reset and its replay count raised.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import math
import re
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import (
    AbstractChannel,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from aiormq import spec
from aiormq.abc import AbstractChannel as AbstractAmqpChannel
from aiormq.abc import DeliveredMessage
from aiormq.exceptions import AMQPError, ChannelInvalidStateError
from pydantic import TypeAdapter, ValidationError

from contracts.topology import ServiceTopology, queue_for, service_of_queue, workers_of
from contracts.tracking import EventIdField
from services.messaging import failure as f
from services.messaging.acks import Acks, delivery_tag
from services.messaging.declare import declare_topology
from services.messaging.hold import LONGEST_PAUSE, hold_pauses
from services.messaging.logs import get_logger
from services.messaging.publisher import CONTENT_TYPE, Publisher

log = get_logger("dead_letters")

_EVENT_ID: TypeAdapter[str] = TypeAdapter(EventIdField)


@dataclass(frozen=True)
class DeadLetter:
    id: str
    service: str
    queue: str
    event_id: str | None
    event_type: str | None
    reason: str
    attempts: int
    replays: int
    first_failure: datetime
    last_failure: datetime
    exception_type: str | None
    exception_message: str | None
    traceback: str | None
    fingerprint: str
    group: str
    """Failures that share a cause: fingerprint plus the normalised message."""
    body: bytes
    headers: dict[str, Any]
    """The message's headers, JSON-safe, for operators to read."""
    correlation_id: str | None


_VARIABLE_PARTS = (
    (re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I), "<uuid>"),
    (re.compile(r"\b0x[0-9a-f]+\b|\b[0-9a-f]{16,}\b", re.I), "<hex>"),
    (re.compile(r"'[^']*'|\"[^\"]*\""), "<str>"),
    (re.compile(r"\d+(\.\d+)?"), "<n>"),
)


def normalise_message(message: str) -> str:
    """The message with its variable parts (ids, numbers, quoted values) replaced."""
    for pattern, placeholder in _VARIABLE_PARTS:
        message = pattern.sub(placeholder, message)
    return message[:300]


def group_key(fingerprint: str, message: str) -> str:
    return hashlib.sha256(f"{fingerprint}|{normalise_message(message)}".encode()).hexdigest()[:16]


def json_safe(value: Any) -> Any:
    """AMQP header values (datetimes, bytes, nested tables) as JSON-compatible values; any
    other (a decimal, which a Java or .NET producer may send; an infinite float) as its text.
    A value JSON cannot hold would keep the letter out of the store for ever."""
    if value is None or isinstance(value, str | int):  # a bool is an int
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode(errors="replace")
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return str(value)


def _as_datetime(value: Any, default: datetime) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return default


def precise_time(value: Any) -> datetime | None:
    """An ISO 8601 time header (`FAILED_AT`) as an aware datetime; None if absent or not one
    (anyone may publish to a work queue)."""
    if not isinstance(value, str | bytes):
        return None
    try:
        parsed = datetime.fromisoformat(value.decode() if isinstance(value, bytes) else value)
    except ValueError:
        return None
    aware = parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    try:
        aware.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00:00+01:00: before year 1 in UTC, in no store
        return None
    return aware


def in_status(letter: DeadLetter) -> bool:
    """Whether the letter is of an event the gateway's status tracks at the letter's service:
    a type that service works on, and an id an event could have. Anyone may publish to a work
    queue: an id or a type the gateway never accepted must not make status rows."""
    event_id, event_type = letter.event_id, letter.event_type
    if event_id is None or event_type is None or letter.service not in workers_of(event_type):
        return False
    try:
        _EVENT_ID.validate_python(event_id)
    except ValidationError:
        return False
    return True


def read_dead_letter(
    namespace: str,
    *,
    body: bytes,
    headers: Mapping[str, Any],
    message_id: str | None,
    message_type: str | None,
    correlation_id: str | None,
    now: datetime | None = None,
) -> DeadLetter:
    now = now or datetime.now(UTC)
    if f.REASON in headers:  # dead-lettered by a Courier consumer, with the whole story
        fingerprint = str(headers.get(f.FINGERPRINT, "unknown"))
        message = str(headers.get(f.EXCEPTION_MESSAGE, ""))
        return DeadLetter(
            id=_letter_id(headers.get(f.DEAD_LETTER_ID)) or _stable_id(message_id, headers, body),
            service=str(headers.get(f.SERVICE)),
            queue=str(headers.get(f.QUEUE)),
            event_id=_str_or_none(headers.get(f.EVENT_ID)) or message_id,
            event_type=_str_or_none(headers.get(f.EVENT_TYPE)) or message_type,
            reason=str(headers[f.REASON]),
            attempts=f.attempt_of(headers),
            replays=_int(headers.get(f.REPLAYS)),
            first_failure=precise_time(headers.get(f.FIRST_FAILED_AT))
            or _as_datetime(headers.get(f.FIRST_FAILURE), now),
            last_failure=precise_time(headers.get(f.FAILED_AT))
            or _as_datetime(headers.get(f.LAST_FAILURE), now),
            exception_type=_str_or_none(headers.get(f.EXCEPTION_TYPE)),
            exception_message=message,
            traceback=_str_or_none(headers.get(f.TRACEBACK)),
            fingerprint=fingerprint,
            group=group_key(fingerprint, message),
            body=body,
            headers=json_safe(dict(headers)),
            correlation_id=correlation_id,
        )
    return _broker_dead_letter(
        namespace, body, headers, message_id, message_type, correlation_id, now
    )


def read_delivered(namespace: str, message: DeliveredMessage) -> DeadLetter:
    """`read_dead_letter` of a message consumed from a dead-letter queue."""
    properties = message.header.properties
    return read_dead_letter(
        namespace,
        body=message.body,
        headers=properties.headers or {},
        message_id=properties.message_id,
        message_type=properties.message_type,
        correlation_id=properties.correlation_id,
    )


def _broker_dead_letter(
    namespace: str,
    body: bytes,
    headers: Mapping[str, Any],
    message_id: str | None,
    message_type: str | None,
    correlation_id: str | None,
    now: datetime,
) -> DeadLetter:
    """A message the broker dead-lettered itself (after `x-delivery-limit` redeliveries)."""
    deaths = headers.get("x-death")
    death = deaths[0] if isinstance(deaths, list) and deaths else {}
    death = death if isinstance(death, Mapping) else {}  # anyone may publish to a DLQ
    # x-death[0] is the newest death: a message may have expired out of a delay tier before
    # the delivery limit dead-lettered it from its work queue (x-first-death-* names the tier).
    queue = str(death.get("queue") or headers.get("x-last-death-queue") or "unknown")
    reason = str(death.get("reason") or headers.get("x-last-death-reason") or "unknown")
    service = service_of_queue(namespace, queue)
    fingerprint = hashlib.sha256(f"{reason}|{service}|{message_type}".encode()).hexdigest()[:16]
    died = _as_datetime(death.get("time"), now)
    first = precise_time(headers.get(f.FIRST_FAILED_AT)) or _as_datetime(
        headers.get(f.FIRST_FAILURE), died
    )
    return DeadLetter(
        id=_stable_id(message_id, headers, body),
        service=service,
        queue=queue,
        event_id=message_id,
        event_type=message_type,
        reason=reason,
        attempts=f.attempt_of(headers),
        replays=_int(headers.get(f.REPLAYS)),
        # x-death's time has whole seconds: a first failure to the microsecond in that same
        # second would come after it.
        first_failure=min(first, died),
        last_failure=died,
        exception_type=None,
        exception_message=f"the broker dead-lettered the message: {reason}",
        traceback=None,
        fingerprint=fingerprint,
        group=group_key(fingerprint, reason),
        body=body,
        headers=json_safe(dict(headers)),
        correlation_id=correlation_id,
    )


_LETTER_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
"""What a letter id may be: what its URL (`/v1/ops/dead-letters/{id}`) and a selection by ids
take as it is. Courier's consumers give a UUID."""


def _letter_id(value: object) -> str | None:
    """The letter's own id, unless it is one the ops API could not name (a letter published by
    hand with `a/b`, `..` or a long id was listed but could not be shown or replayed by id):
    then the letter gets a stable id of its own, as a broker's letter does."""
    return value if isinstance(value, str) and _LETTER_ID.fullmatch(value) else None


def _stable_id(message_id: str | None, headers: Mapping[str, Any], body: bytes) -> str:
    """The same message redelivered to the drain gets the same id, so the store does not hold it
    twice. The replay count tells apart deaths of one event after successive replays, whose
    `x-death` (time in whole seconds) can be identical; the body tells apart different messages
    that died in the same second without a message id (or with a reused one), which would
    otherwise be taken for one, the second acked as stored already and lost."""
    key = orjson.dumps(
        json_safe(
            {
                "id": message_id,
                "replays": headers.get(f.REPLAYS),
                "death": headers.get("x-death"),
                "body": hashlib.sha256(body).hexdigest(),
            }
        )
    )
    return hashlib.sha256(key).hexdigest()[:32]


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def _int(value: Any) -> int:
    return value if type(value) is int else 0  # a bool is no count


MAX_COUNT = 2**31 - 1


def plain(letter: DeadLetter) -> DeadLetter:
    """The letter with nothing a store could refuse: control characters (NUL among them) and
    unpaired surrogates in its strings escaped, its counts within 32 bits. An ordinary letter
    is unchanged; the body is never touched, so a replay publishes what failed."""
    return replace(
        letter,
        service=printable(letter.service),
        queue=printable(letter.queue),
        event_id=_printable_or_none(letter.event_id),
        event_type=_printable_or_none(letter.event_type),
        reason=printable(letter.reason),
        attempts=min(max(letter.attempts, 0), MAX_COUNT),
        replays=min(max(letter.replays, 0), MAX_COUNT),
        exception_type=_printable_or_none(letter.exception_type),
        exception_message=_printable_or_none(letter.exception_message),
        traceback=_printable_or_none(letter.traceback),
        headers=_printable_values(letter.headers),
        correlation_id=_printable_or_none(letter.correlation_id),
    )


def printable(text: str) -> str:
    """`text` with control characters (but newlines and tabs) and unpaired surrogates escaped."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c in "\n\t" else repr(c)[1:-1] for c in text)


def _printable_or_none(text: str | None) -> str | None:
    return None if text is None else printable(text)


def _printable_values(value: Any) -> Any:
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value if -MAX_COUNT <= value <= MAX_COUNT else str(value)
    if isinstance(value, dict):
        return {printable(str(k)): _printable_values(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_printable_values(v) for v in value]
    return value


# --- draining -------------------------------------------------------------------------------

Sink = Callable[[DeadLetter], Awaitable[None]]

CANCEL_TIMEOUT = 5.0
DELIVERY_HOPS = 2
DRAIN_PREFETCH = 128
"""Dead letters the drain holds at once from each queue, stored in shared transactions: a
window of 64 waited for a store commit, a status commit and the acks' round trip per 64
letters (~1,500-2,000 a second on SQLite, `bench.dlq_drain`); 128 keep ~2,000-3,200, 256
little more. The window is per queue (a quorum queue has no channel-wide prefetch), and a
letter is the size of the event that failed (a file's is its announcement, not the file): a
window of typical events is a few MiB; of the largest the gateway accepts (1 MiB), 128 MiB a
queue whose service failed them all."""
FIRST_HOLD_PAUSE = 0.5


class DeadLetterDrain:
    """Consumes dead-letter queues into a sink; acks only after the sink returned.

    Consumed on the channel's aiormq layer, with acks coalesced (`Acks`), as the consumers do:
    no aio-pika message object and second task per delivery, and one ack for a run of stored
    letters rather than a write per letter."""

    def __init__(
        self,
        namespace: str,
        queues: Sequence[str],
        sink: Sink,
        prefetch: int = DRAIN_PREFETCH,
        topologies: Sequence[ServiceTopology] = (),
    ) -> None:
        """`topologies`: those that declare the queues, declared again when one is deleted."""
        self._namespace = namespace
        self._queues = queues
        self._sink = sink
        self._prefetch = prefetch
        self._declared_by = {topology.dead_letter_queue: topology for topology in topologies}
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._consuming: list[AbstractQueue] = []
        self._tags: dict[str, str] = {}
        """Each queue's latest consumer tag, noted before the consume is sent: `stop` cancels
        it even if the consume was cut short after the broker had it."""
        self._lost: set[str] = set()
        """Queues not consumed until consumed again: the broker cancelled their consumer (the
        queue was deleted), or the channel came back after a reconnect."""
        self._consumed_on: dict[str, AbstractAmqpChannel] = {}
        """The channel (aiormq's) each queue's consumer was made on: a reconnect brings a new
        one, which a queue consumed again before `_reopened` ran is on already."""
        self._again: set[asyncio.Task[None]] = set()
        self._storing: set[asyncio.Task[Any]] = set()
        """The deliveries' tasks (aiormq runs each in its own) still storing their letter."""
        self._acks = Acks()

    async def start(self, connection: AbstractRobustConnection) -> None:
        self._connection = connection
        self._channel = channel = await connection.channel()
        await channel.set_qos(prefetch_count=self._prefetch)
        for name in self._queues:
            queue = await channel.get_queue(name, ensure=True)
            await self._subscribe(queue)
            self._consuming.append(queue)
        await self._watch_cancels(channel)
        if isinstance(channel, AbstractRobustChannel):
            channel.reopen_callbacks.add(self._reopened)

    async def _subscribe(self, queue: AbstractQueue) -> None:
        """Consume `queue` on the channel's aiormq layer."""
        underlay = await queue.channel.get_underlay_channel()
        self._tags[queue.name] = tag = f"courier.dead-letters.{uuid.uuid4().hex}"
        await underlay.basic_consume(
            queue.name, functools.partial(self._on_message, queue.name), consumer_tag=tag
        )
        self._consumed_on[queue.name] = underlay

    async def _watch_cancels(self, channel: object) -> None:
        assert isinstance(channel, AbstractChannel)
        underlay = await channel.get_underlay_channel()
        underlay.on_consumer_cancel_callbacks.add(self._on_broker_cancel)

    async def _reopened(self, channel: object) -> None:
        """After a reconnect the robust channel is back with its QoS, but not with consumers
        made on its aiormq layer: each queue is consumed again, unless a `_consume_again`
        that was waiting did so on the new channel already (a second consumer would double
        the window, and outlive `stop`, which cancels the one it knows)."""
        assert isinstance(channel, AbstractChannel)
        await self._watch_cancels(channel)
        underlay = await channel.get_underlay_channel()
        for queue in self._consuming:
            if self._consumed_on.get(queue.name) is not underlay:
                self._consume_again_soon(queue)

    def _on_broker_cancel(self, frame: spec.Basic.Cancel) -> None:
        """The broker cancelled a consumer: its queue was deleted (an operator's mistake), and
        the letters that would reach it are returned to their work queue over and over, unseen.
        Not consuming until it is declared again and consumed."""
        for queue in self._consuming:
            if self._tags.get(queue.name) == frame.consumer_tag and queue.name not in self._lost:
                log.warning(
                    "the broker cancelled a dead-letter consumer; declaring its queue again",
                    extra={"queue": queue.name},
                )
                self._consume_again_soon(queue)

    def _consume_again_soon(self, queue: AbstractQueue) -> None:
        if queue.name in self._lost:
            return  # already being consumed again
        self._lost.add(queue.name)
        task = asyncio.get_running_loop().create_task(self._consume_again(queue))
        self._again.add(task)
        task.add_done_callback(self._again.discard)

    async def _consume_again(self, queue: AbstractQueue) -> None:
        pause = FIRST_HOLD_PAUSE
        while queue.name in self._lost and self._connection is not None:
            try:
                await self._declare_again(self._connection, queue.name)
                await self._subscribe(queue)
            except Exception:  # said, and tried again: never a drain that silently drains nothing
                log.warning("could not consume dead letters again; retrying", exc_info=True)
                await asyncio.sleep(pause)
                pause = min(pause * 2, LONGEST_PAUSE)
                continue
            self._lost.discard(queue.name)
            log.info("consuming dead letters again", extra={"queue": queue.name})

    async def _declare_again(self, connection: AbstractRobustConnection, name: str) -> None:
        """Declare the queue's service topology again; without one, make sure the queue is
        back (a consume on a missing queue would close the drain's channel)."""
        topology = self._declared_by.get(name)
        if topology is not None:
            await declare_topology(connection, [topology])
            return
        async with connection.channel() as channel:
            await channel.get_queue(name, ensure=True)

    @property
    def consuming(self) -> bool:
        """Connected with the consumers on an open channel (consumed again after a
        reconnect)."""
        connection, channel = self._connection, self._channel
        return (
            connection is not None
            and connection.connected.is_set()
            and channel is not None
            and not channel.is_closed
            and len(self._consuming) == len(self._queues)
            and not self._lost
        )

    async def stop(self, drain_seconds: float) -> bool:
        """Stop taking dead letters and wait up to `drain_seconds` for those being stored to be
        acked, so a letter the store has is not left in its queue (and redelivered on the next
        start). True if drained."""
        consuming, self._consuming = self._consuming, []
        self._lost.clear()
        for task in self._again:
            task.cancel()
        # Ended before the cancels below: one in the middle of its consume would otherwise
        # leave a consumer nobody cancels.
        await asyncio.gather(*self._again, return_exceptions=True)
        if self._connection is None or not self._connection.connected.is_set():
            consuming = []  # the broker is away: nothing is delivered, and a cancel would wait
        for queue in consuming:
            try:
                async with asyncio.timeout(CANCEL_TIMEOUT):
                    await queue.cancel(self._tags[queue.name])
            except (TimeoutError, AMQPError, ChannelInvalidStateError, ConnectionError):
                log.warning("could not cancel the dead-letter consumer; the channel is gone")
                break
        # A letter delivered just before the cancel's answer reaches `_on_message` in a task
        # of its own (aiormq's): let those run, so the wait below sees it.
        for _ in range(DELIVERY_HOPS):
            await asyncio.sleep(0)
        drained = await self._stored(drain_seconds)
        await self._acks.flush()  # what was stored is acked, not redelivered
        return drained

    async def _stored(self, drain_seconds: float) -> bool:
        """Wait up to `drain_seconds` for the letters being stored; True if all were."""
        if not self._storing:
            return True
        _, late = await asyncio.wait(set(self._storing), timeout=drain_seconds)
        if not late:
            return True
        log.warning(
            "dead letters still being stored at shutdown return to their queue",
            extra={"in_flight": len(late), "drain_seconds": drain_seconds},
        )
        # Stop them, as Consumer.stop does: nothing they do may outlive the store's shutdown;
        # unacked, their letters return to the queue when the channel closes.
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
        return False

    async def _on_message(self, queue: str, message: DeliveredMessage) -> None:
        task = asyncio.current_task()
        assert task is not None  # aiormq runs each delivery's callback in a task
        self._acks.delivered(message.channel, delivery_tag(message))
        self._storing.add(task)
        try:
            await self._keep(queue, message)
        finally:
            self._storing.discard(task)

    async def _keep(self, queue: str, message: DeliveredMessage) -> None:
        letter = read_delivered(self._namespace, message)
        # While the store is away the letter is held, unacked, and stored again after a pause:
        # each return to its queue would count as a delivery, and a quorum queue with a
        # delivery limit (RabbitMQ 4 gives every one a default of 20) drops a letter past it.
        # A full prefetch window of held letters stops the broker sending more.
        pauses = hold_pauses(FIRST_HOLD_PAUSE)
        while True:
            try:
                await self._store(letter)
                break
            except Exception:
                ids = {"event_id": letter.event_id, "correlation_id": letter.correlation_id}
                pause = next(pauses, None)
                if pause is None or message.channel.is_closed:
                    log.exception(
                        "could not store a dead letter; it goes back to its queue", extra=ids
                    )
                    if not message.channel.is_closed:  # else the broker has it back already
                        await self._send_back(queue, message)
                    return
                log.exception(
                    "could not store a dead letter; holding it and trying again",
                    extra={**ids, "retry_in_seconds": pause},
                )
            await asyncio.sleep(pause)
        self._acks.settle(message.channel, delivery_tag(message))
        if f.REASON not in letter.headers:
            # The consumer that made a letter logged it; the broker logs nothing (a message
            # that kept killing its consumer until the delivery limit, a reject, an expiry).
            log.error(
                "dead-lettered by the broker",
                extra={
                    "event_id": letter.event_id,
                    "correlation_id": letter.correlation_id,
                    "event_type": letter.event_type,
                    "queue": letter.queue,  # the service's (`service` is this line's writer)
                    "reason": letter.reason,
                },
            )

    async def _send_back(self, queue: str, message: DeliveredMessage) -> None:
        """Put a letter held for too long back at the end of its queue as a new message (its
        copy confirmed, then the delivery acked), rather than return it with `nack`: a return
        counts as a delivery, and past a quorum queue's delivery limit the letter is dropped
        (RabbitMQ 4 gives every queue a default of 20: twenty holds, some three hours of store
        outage). A crash in between leaves two copies, which the store keeps once (same
        headers and message id: same letter id). A letter without a message id is returned
        (the client would give its copy a random one, which the letter would show as its
        event's id)."""
        channel = message.channel
        if message.header.properties.message_id:
            try:
                confirmed = await channel.basic_publish(
                    message.body, routing_key=queue, properties=_fresh_copy(message)
                )
                if isinstance(confirmed, spec.Basic.Ack):
                    self._acks.settle(channel, delivery_tag(message))
                    return
                log.error("the broker did not take the dead letter's copy; returning it")
            except Exception:  # the channel closed over it (the broker has it back), or a bug
                log.exception("could not put the dead letter back as new; returning it")
        if not channel.is_closed:
            await channel.basic_nack(delivery_tag(message), requeue=True)
            self._acks.forget(channel, delivery_tag(message))

    async def _store(self, letter: DeadLetter) -> None:
        """Into the sink as it is or else in plain form: a letter whose strings or counts the
        store cannot hold (a NUL in a message id, a 40-bit attempt header: anyone may publish
        to a work queue) would otherwise go back to its queue for ever, never seen."""
        try:
            await self._sink(letter)
        except Exception as exc:
            fallback = plain(letter)
            if fallback == letter:
                raise  # nothing in it to refuse: the store is unavailable
            # Expected (PostgreSQL refuses a NUL in text, which a failing webhook's answer may
            # hold): the store's reason, without a traceback for each such letter.
            log.warning(
                "the store refused a dead letter as it was; storing it in plain form",
                extra={
                    "event_id": letter.event_id,
                    "correlation_id": letter.correlation_id,
                    "error": f"{type(exc).__name__}: {str(exc)[:300]}",
                },
            )
            await self._sink(fallback)


def _fresh_copy(message: DeliveredMessage) -> spec.Basic.Properties:
    """The properties of a persistent copy of a delivery, less its delivery count (a new message
    starts at none), an expiry (a letter must not vanish) and a user id (checked against the
    publishing connection's user)."""
    properties = message.header.properties
    headers = {k: v for k, v in (properties.headers or {}).items() if k != "x-delivery-count"}
    return spec.Basic.Properties(
        content_type=properties.content_type,
        content_encoding=properties.content_encoding,
        headers=headers,
        delivery_mode=int(aio_pika.DeliveryMode.PERSISTENT),
        priority=properties.priority,
        correlation_id=properties.correlation_id,
        reply_to=properties.reply_to,
        message_id=properties.message_id,
        timestamp=properties.timestamp,
        message_type=properties.message_type,
        app_id=properties.app_id,
    )


# --- replaying ------------------------------------------------------------------------------


def replay_message(letter: DeadLetter) -> aio_pika.Message:
    """The dead letter as a fresh first attempt, marked with one more replay."""
    kept = {
        k: v
        for k, v in letter.headers.items()
        if k not in f.FAILURE_HEADERS and k not in f.BROKER_HEADERS and k != f.REPLAYS
    }
    return aio_pika.Message(
        letter.body,
        headers={**kept, f.REPLAYS: letter.replays + 1},
        content_type=CONTENT_TYPE,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=letter.event_id,
        type=letter.event_type,
        correlation_id=letter.correlation_id,
    )


def replay_queue(namespace: str, letter: DeadLetter) -> str:
    """Where a replay sends the letter: the queue its service takes that event type from
    (`queue_for`): a cancellation to the control queue, ahead of the work backlog as when it
    was first sent; a file to the files lane; anything else to the work queue."""
    return queue_for(namespace, letter.service, letter.event_type or "")


async def replay(publisher: Publisher, namespace: str, letter: DeadLetter) -> None:
    """Publish the dead letter into its service's queue (`replay_queue`); returns once
    confirmed."""
    await publisher.publish(
        replay_message(letter), exchange="", routing_key=replay_queue(namespace, letter)
    )
