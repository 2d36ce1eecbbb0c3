"""The consumer: validate, handle, publish follow-ups, acknowledge — in that order.

The acknowledgement policy, in one place:

* event already in the inbox (a redelivery)                → republish its recorded
                                                              follow-ups, ack, no second effect;
* handler succeeded, inbox record committed, every follow-up
  event confirmed                                          → ack;
* body is not a valid event, or no handler for its type     → dead letter `invalid`, then ack;
* handler raised a permanent error                         → dead letter `permanent`, then ack;
* handler raised anything else                             → delay tier (confirmed), then ack,
                                                              or dead letter `retries_exhausted`
                                                              (`RetryLater`: a tier at least its
                                                              `min_delay` long);
* a crash before any of these                              → the broker redelivers; after
                                                              `x-delivery-limit` it dead-letters
                                                              the message as `delivery_limit`.

Every republish (retry or dead letter) is confirmed before the original is acked, so a crash in
between duplicates a message at worst, never loses it. Handlers never see aio-pika: they take a
typed event and return the follow-up events to publish, or raise.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from aio_pika.abc import AbstractQueue, AbstractRobustChannel, AbstractRobustConnection
from aiormq import spec
from aiormq.abc import DeliveredMessage
from aiormq.exceptions import AMQPError, ChannelInvalidStateError
from pydantic import ValidationError
from pydantic_core import PydanticSerializationError

from contracts.envelope import Envelope
from contracts.events import EVENT_ADAPTER
from contracts.topology import RESULT_TYPES, QueueSpec, ServiceTopology
from contracts.tracking import State
from services.messaging.acks import Acks, delivery_tag
from services.messaging.dead_letters import group_key
from services.messaging.declare import declare_topology
from services.messaging.errors import (
    BrokerUnavailable,
    CourierError,
    PermanentError,
    StoreUnavailable,
    Unroutable,
    causes,
)
from services.messaging.failure import (
    EVENT_ID,
    EVENT_TYPE,
    EXCEPTION_MESSAGE,
    FINGERPRINT,
    Failure,
    FailureReason,
    attempt_of,
)
from services.messaging.hold import hold_pauses
from services.messaging.inbox import Cancelled, Handled, Inbox
from services.messaging.logs import event_context, get_logger
from services.messaging.publisher import CONTENT_TYPE, PERSISTENT, Publisher, Serialised
from services.messaging.results import ResultReporter
from services.messaging.retry import RetryPolicy
from services.messaging.status import StatusReporter
from services.messaging.store import store_unavailable

log = get_logger("consumer")

MAX_REQUEUE_BACKOFF = 30.0
FIRST_HOLD_PAUSE = 0.2
CANCEL_TIMEOUT = 5.0
RESUBSCRIBE_BACKOFF = (0.5, 10.0)

T = TypeVar("T")

Handler = Callable[..., Awaitable[Sequence[Envelope] | None]]
"""An async function taking one typed event (and, if stateful, the store transaction) and
returning the follow-up events to publish (or None)."""


class UnhandledEventType(CourierError):
    """A message reached a queue whose service has no handler for its type (a routing bug)."""


class HandlerCancelled(CourierError):
    """Something the handler awaited was cancelled (a future it shared, an executor shut down
    with its queued work), though its delivery was not: a transient failure of the handler."""


async def _cancelled_as_failure(work: Awaitable[T]) -> T:
    """Await a handler's work; a cancellation that is not this delivery's own (stopping, a
    closed channel) becomes `HandlerCancelled`. Left a cancellation, it would end the
    delivery's task unsettled and unlogged until the broker's consumer timeout closed the
    channel, returning every other delivery on it."""
    try:
        return await work
    except asyncio.CancelledError as exc:
        task = asyncio.current_task()
        if task is None or task.cancelling():
            raise
        raise HandlerCancelled("the handler's work was cancelled; its delivery was not") from exc


@dataclass(frozen=True)
class Route:
    handler: Handler
    retry: RetryPolicy
    stateful: bool = False
    """The handler takes `(event, conn)` and writes its state through `conn`, in the same
    transaction that records the event in the inbox."""
    idempotent: bool = False
    """Handling the event again changes nothing (an upsert with a natural key, a state that only
    moves forward), so the inbox is skipped: no look-up before the handler, no record after it.
    A redelivery runs the handler again, and publishes its follow-ups again (ids derived from
    the input, so downstream inboxes drop them). Cancellations, kept in the inbox, do not apply."""
    takes_attempt: bool = False
    """The handler also takes `attempt=`: 1 for a first delivery (a redelivery and a replay are
    first deliveries too), more for a retry back from a delay tier."""

    def __post_init__(self) -> None:
        if self.stateful and self.idempotent:
            raise ValueError("a stateful route records its state with the inbox: not idempotent")


def _unavailable(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) says a dependency is away, not that the delivery or
    the runtime is wrong: the broker did not take a publish, or the store could not be
    reached or was busy."""
    return store_unavailable(exc) or any(
        isinstance(seen, BrokerUnavailable | StoreUnavailable | OSError | TimeoutError)
        for seen in causes(exc)
    )


class _NotSettled(Exception):
    """The handler succeeded, but recording the event in the inbox or publishing its follow-ups
    failed: settle nothing, return the delivery later (an infrastructure failure, not the
    handler's), rather than retry or dead-letter it.

    `retry` does again what failed after the handler, and `settle` that and what follows (the
    ack, the report): what a held delivery tries next, so the handler's effect is not repeated.
    Neither is set where the handler must run again (its transaction rolled back)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.retry: Callable[[], Awaitable[datetime | None]] | None = None
        self.settle: Callable[[], Awaitable[None]] | None = None


class _AlreadyHandled(PermanentError):
    """Raised inside the inbox transaction to roll back the state of a concurrent duplicate.

    Permanent, so the in-process retry does not run the handler again."""


def with_cause(follow_up: Envelope, cause: Envelope) -> Envelope:
    """A follow-up event carries the cause's correlation id and names the cause."""
    return follow_up.model_copy(
        update={"correlationid": cause.correlation(), "causationid": cause.id}
    )


class FollowUpNotSerialisable(PermanentError):
    """A handler returned a follow-up that cannot be serialised (a model built without
    validation, holding what JSON cannot carry): running the handler again gives the same
    follow-up, so its input is dead-lettered at once, with this reason."""


def _serialised(produced: Iterable[Envelope], cause: Envelope) -> list[Serialised]:
    """A handler's follow-ups, each serialised once: published, recorded, maybe reported."""
    serialised = []
    for event in produced:
        try:
            serialised.append(Serialised.of(with_cause(event, cause)))
        except PydanticSerializationError as exc:
            raise FollowUpNotSerialisable(
                f"the handler's follow-up {event.type!r} ({event.id}) cannot be serialised: {exc}"
            ) from exc
    return serialised


class Consumer:
    def __init__(
        self,
        *,
        topology: ServiceTopology,
        routes: Mapping[str, Route],
        publisher: Publisher,
        inbox: Inbox,
        prefetch: int,
        reporter: StatusReporter | None = None,
        results: ResultReporter | None = None,
        queue: QueueSpec | None = None,
        one_at_a_time: OneAtATime | None = None,
    ) -> None:
        """`one_at_a_time`: share it between the consumers of one service's queues, so that a
        duplicate in another of its queues waits too (and finds the inbox record)."""
        for event_type, route in routes.items():
            unknown = set(route.retry.delays) - set(topology.retry_delays)
            if unknown:
                raise ValueError(
                    f"{event_type}: retry delays {sorted(unknown)} are not declared tiers "
                    f"{topology.retry_delays}"
                )
        self._topology = topology
        self._routes = routes
        self._publisher = publisher
        self._inbox = inbox
        self._prefetch = prefetch
        self._reporter = reporter
        # Without a lingering reporter (the runtime's), results go as soon as they come.
        self._results = results or ResultReporter(
            topology.service, publisher, topology.events_exchange, linger=0, batch=prefetch
        )
        self._queue_spec = queue or topology.work_queue_spec()
        # Status is reported for the work this service exists for, not for control requests.
        self._reported_types = frozenset(topology.event_types)
        self._queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._subscribed = False
        self._subscribing = asyncio.Lock()
        self._resubscribing: asyncio.Task[None] | None = None
        self._connection: AbstractRobustConnection | None = None
        self._in_flight = 0
        self._holding = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._infrastructure_failures = 0
        self._one_at_a_time = one_at_a_time or OneAtATime()
        self._idle = asyncio.Event()
        self._idle.set()
        self._backlog = 0
        self._settled = 0
        self._caught_up = asyncio.Event()
        self._acks = Acks()

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self, connection: AbstractRobustConnection) -> None:
        """Start consuming, and again whenever the robust channel comes back after a reconnect."""
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=self._prefetch)
        spec_ = self._queue_spec
        self._queue = await channel.declare_queue(
            spec_.name, durable=spec_.durable, arguments=dict(spec_.arguments)
        )
        # What waited in the queue when consuming began (see `caught_up`).
        self._backlog = self._queue.declaration_result.message_count or 0
        if self._settled >= self._backlog:
            self._caught_up.set()
        self._consumer_tag = f"courier.{self._topology.service}.{uuid.uuid4().hex}"
        await self._subscribe()
        if isinstance(channel, AbstractRobustChannel):
            channel.reopen_callbacks.add(self._on_reopened)
        self._connection = connection
        log.info("consuming", extra={"queue": spec_.name, "prefetch": self._prefetch})

    async def _subscribe(self) -> None:
        """Consume on the channel's aiormq layer: aio-pika would wrap each delivery in a
        message object and a second task, which cost more than the runtime's own work with
        an event (profiled with bench.consumer). The robust channel still restores the
        channel, its QoS and the queue after a reconnect; `_on_reopened` consumes again."""
        assert self._queue is not None
        assert self._consumer_tag is not None
        async with self._subscribing:  # a reconnect and a broker cancel may overlap
            if self._subscribed:
                return
            underlay = await self._queue.channel.get_underlay_channel()
            underlay.on_consumer_cancel_callbacks.add(self._on_broker_cancel)
            await underlay.basic_consume(
                self._queue_spec.name, self._on_message, consumer_tag=self._consumer_tag
            )
            self._subscribed = True

    async def _on_reopened(self, channel: object) -> None:
        self._subscribed = False
        if self._consumer_tag is None:  # stopped
            return
        try:
            await self._subscribe()
        except Exception:
            # aio-pika gathers reopen callbacks and drops their errors: say it, and keep
            # trying, or the service would sit connected and idle until its watchdog.
            log.exception("could not consume again after a reconnect; retrying")
            self._resubscribe_soon()
            return
        log.info("consuming again after a reconnect", extra={"queue": self._queue_spec.name})

    def _on_broker_cancel(self, frame: spec.Basic.Cancel) -> None:
        """The broker cancelled the consumer (its queue was deleted, or it moved): consume
        again, declaring the queue anew, until it works; not consuming meanwhile."""
        if frame.consumer_tag != self._consumer_tag or self._consumer_tag is None:
            return
        self._subscribed = False
        log.warning("the broker cancelled the consumer", extra={"queue": self._queue_spec.name})
        self._resubscribe_soon()

    def _resubscribe_soon(self) -> None:
        if self._resubscribing is None or self._resubscribing.done():
            self._resubscribing = asyncio.get_running_loop().create_task(self._resubscribe())

    async def _resubscribe(self) -> None:
        pause, longest = RESUBSCRIBE_BACKOFF
        while self._consumer_tag is not None and not self._subscribed:
            connection, queue = self._connection, self._queue
            if connection is None or queue is None or connection.is_closed:
                return  # closed: a reconnect, if any, consumes again (`_on_reopened`)
            try:
                # The service's whole topology: a deleted queue lost its bindings too.
                await declare_topology(connection, [self._topology])
                await queue.declare()
                await self._subscribe()
                log.info("consuming again", extra={"queue": self._queue_spec.name})
            except Exception:  # whatever it is, said and tried again: never an idle consumer
                log.warning("could not consume again; retrying", exc_info=True)
                await asyncio.sleep(pause)
                pause = min(pause * 2, longest)

    @property
    def consuming(self) -> bool:
        connection, queue = self._connection, self._queue
        return (
            connection is not None
            and connection.connected.is_set()
            and queue is not None
            and not queue.channel.is_closed
            and self._consumer_tag is not None
            and self._subscribed
        )

    async def caught_up(self) -> None:
        """Wait until the messages that waited in the queue when consuming began are settled:
        a service applies the control requests that arrived while it was down before it takes
        the work they are about. Bound it with a timeout."""
        await self._caught_up.wait()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def holding(self) -> int:
        """Deliveries held because a dependency (the store, the broker for publishing) is
        away: consuming, but making no progress with them."""
        return self._holding

    async def stop(self, drain_seconds: float) -> bool:
        """Stop taking messages; wait up to `drain_seconds` for in-flight ones. True if drained."""
        deadline = asyncio.get_running_loop().time() + drain_seconds
        if self._resubscribing is not None:
            self._resubscribing.cancel()
        if self._queue is not None and self._consumer_tag is not None:
            # With the broker away a robust channel would wait for it for ever: bound the
            # cancel (deliveries stop anyway once the connection closes).
            if self.consuming:
                try:
                    # Within the drain (handlers go on meanwhile), not before it: 5 s more
                    # with the broker away.
                    async with asyncio.timeout(min(CANCEL_TIMEOUT, drain_seconds)):
                        await self._queue.cancel(self._consumer_tag)
                except (TimeoutError, AMQPError, ChannelInvalidStateError, ConnectionError):
                    log.warning("could not cancel the consumer; the channel is gone already")
            self._consumer_tag = None
            self._subscribed = False
        try:
            async with asyncio.timeout_at(deadline):
                await self._idle.wait()
        except TimeoutError:
            log.warning(
                "in-flight handlers did not finish in time; their messages return to the queue",
                extra={"in_flight": self._in_flight, "drain_seconds": drain_seconds},
            )
            # Stop them: unsettled, their messages return to the queue when the channel
            # closes, and nothing they do after this point (a half-recorded effect, a retry
            # copy) can race the shutdown.
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._acks.flush()  # what did finish is acked, not redelivered
            return False
        await self._acks.flush()
        return True

    # --- one delivery -------------------------------------------------------------------------

    def _ack(self, message: DeliveredMessage) -> None:
        self._acks.settle(message.channel, delivery_tag(message))

    def _acked(self, message: DeliveredMessage) -> bool:
        return self._acks.is_settled(message.channel, delivery_tag(message))

    async def _on_message(self, message: DeliveredMessage) -> None:
        self._acks.delivered(message.channel, delivery_tag(message))
        self._in_flight += 1
        self._idle.clear()
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        settled = False  # acked, or due to be: what `caught_up` counts (not a requeue)
        try:
            await self._process_held(message)
            settled = True
            self._infrastructure_failures = 0
        except Exception:  # settled below: never left hanging, never dropped
            # Could not ack, retry or dead-letter, and not for want of a dependency (or not
            # within the hold): a bug in this runtime, a topology without a route for a
            # follow-up. Back off, then return the message to the queue; the quorum queue's
            # delivery limit bounds how often.
            self._infrastructure_failures += 1
            pause = min(MAX_REQUEUE_BACKOFF, 0.1 * 2 ** min(self._infrastructure_failures, 10))
            properties = message.header.properties
            log.exception(
                "delivery not settled; returning it to the queue",
                extra={
                    "event_id": properties.message_id,
                    "correlation_id": properties.correlation_id,
                    "backoff_seconds": pause,
                },
            )
            if self._acked(message):
                settled = True
                return  # settled before the failure: a nack now would close the channel
            await asyncio.sleep(pause)
            await _requeue(message)
            self._acks.forget(message.channel, delivery_tag(message))
        finally:
            if task is not None:
                self._tasks.discard(task)
            if settled:
                self._settled += 1
                if self._settled >= self._backlog:
                    self._caught_up.set()
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def _process_held(self, message: DeliveredMessage) -> None:
        """`_process`, tried again while a dependency is away (the store, or the broker for
        publishing): the delivery is fine, and each return to the queue would count against
        its delivery limit, so a short outage would dead-letter healthy work. Held, with
        back-off (`hold_pauses`), for at most ten minutes; a full prefetch window of held deliveries
        also stops the broker sending more. Repeating is safe: the inbox and derived ids
        make a second try what a redelivery would be."""
        try:
            await self._process(message)
            return
        except Exception as exc:
            if not self._may_hold(message, exc):
                raise
            failure = exc
        self._holding += 1
        try:
            await self._hold(message, failure)
        finally:
            self._holding -= 1

    async def _hold(self, message: DeliveredMessage, failure: Exception) -> None:
        """Try `_process` again after each of `hold_pauses`; raise what failed last if the
        dependency is not back in time, or the failure is no longer one to hold for."""
        for pause in hold_pauses(FIRST_HOLD_PAUSE):
            properties = message.header.properties
            log.warning(
                "a dependency is unavailable; holding the delivery and trying again",
                exc_info=failure,
                extra={
                    "event_id": properties.message_id,
                    "correlation_id": properties.correlation_id,
                    "backoff_seconds": pause,
                },
            )
            await asyncio.sleep(pause)
            try:
                settle = failure.settle if isinstance(failure, _NotSettled) else None
                await (settle() if settle is not None else self._process(message))
                return
            except Exception as exc:
                if not self._may_hold(message, exc):
                    raise
                failure = exc
        raise failure

    def _may_hold(self, message: DeliveredMessage, exc: Exception) -> bool:
        return (
            _unavailable(exc)
            and not self._acked(message)
            and not message.channel.is_closed  # else the broker has it back
            and self._consumer_tag is not None  # else stopping
        )

    async def _process(self, message: DeliveredMessage) -> None:
        headers = message.header.properties.headers or {}
        attempt = attempt_of(headers)
        try:
            event: Envelope = EVENT_ADAPTER.validate_json(message.body)
        except ValidationError as exc:
            await self._dead_letter(message, Failure.of(exc, attempt), "invalid")
            return
        with event_context(event.id, event.correlation()):
            route = self._routes.get(event.type)
            if route is None:
                exc_ = UnhandledEventType(f"{self._topology.service} has no handler for this type")
                await self._dead_letter(message, Failure.of(exc_, attempt), "invalid", event)
                return
            # One delivery of an event id at a time in this service's consumers: a duplicate
            # waits, then finds the inbox record instead of running the handler beside the
            # original.
            await self._one_at_a_time.acquire(event.id)
            try:
                await self._handle(message, event, route, attempt)
            finally:
                self._one_at_a_time.release(event.id)

    async def _handle(
        self, message: DeliveredMessage, event: Envelope, route: Route, attempt: int
    ) -> None:
        known = None if route.idempotent else await self._inbox.lookup(event.id)
        if isinstance(known, Cancelled):
            # Noted before the ack, to stamp the report with: a crash after the ack would
            # take the report, which the note owes until told (`Inbox.unreported`).
            skipped_at = await self._inbox.skipped(event)
            self._ack(message)
            self._report(event, "cancelled", at=skipped_at)
            log.info("skipped: cancelled")
            return
        if known is not None:
            await self._skip_duplicate(message, event, known)
            return
        self._report(event, "processing", attempt=attempt)
        try:
            handled_at = await self._attempt(route, event, attempt)
        except _AlreadyHandled:
            await self._skip_recorded(message, event)
            return
        except _NotSettled as exc:
            if exc.retry is not None:  # held, it tries that again, never the handler
                exc.settle = functools.partial(
                    self._settle_again, message, event, attempt, exc.retry
                )
            raise
        except StoreUnavailable as exc:
            # An outage, not the handler's failure: held, then handled again (no attempt spent).
            raise _NotSettled(f"the handler's store is unavailable: {exc}") from exc
        except Exception as exc:  # noqa: BLE001  # classified and settled below, never dropped
            await self._on_failure(message, event, route.retry, Failure.of(exc, attempt))
            return
        self._succeeded(message, event, handled_at, attempt)

    def _succeeded(
        self, message: DeliveredMessage, event: Envelope, handled_at: datetime | None, attempt: int
    ) -> None:
        self._ack(message)
        # Stamped with the inbox record's time: the record can tell this report again after a
        # crash took it (`Inbox.unreported`), and the gateway sees the same report twice.
        self._report(event, "succeeded", at=handled_at, attempt=attempt)
        log.debug("handled", extra={"event_type": event.type, "attempt": attempt})

    async def _skip_recorded(self, message: DeliveredMessage, event: Envelope) -> None:
        known = await self._inbox.lookup(event.id)
        await self._skip_duplicate(message, event, known if isinstance(known, Handled) else None)

    async def _settle_again(
        self,
        message: DeliveredMessage,
        event: Envelope,
        attempt: int,
        retry: Callable[[], Awaitable[datetime | None]],
    ) -> None:
        """Settle a held delivery whose handler succeeded: `retry` what failed after it (the
        inbox record, the follow-ups' publish), then ack and report as `_handle` does."""
        with event_context(event.id, event.correlation()):
            await self._one_at_a_time.acquire(event.id)
            try:
                handled_at = await retry()
            except _AlreadyHandled:  # a duplicate recorded it meanwhile
                await self._skip_recorded(message, event)
                return
            except _NotSettled as exc:
                exc.settle = functools.partial(self._settle_again, message, event, attempt, retry)
                raise
            finally:
                self._one_at_a_time.release(event.id)
            self._succeeded(message, event, handled_at, attempt)

    def _report(
        self, event: Envelope, state: State, at: datetime | None = None, **detail: Any
    ) -> None:
        if self._reporter is not None and event.type in self._reported_types:
            self._reporter.report(event.id, event.type, state, at=at, **detail)

    async def _attempt(self, route: Route, event: Envelope, attempt: int) -> datetime | None:
        """Run the handler (retrying blips in process), record the event in the inbox and
        publish its follow-ups, confirmed; when the inbox recorded it (None for a route
        without a record).

        A stateful handler writes its state in the inbox transaction, so each try is one
        transaction, and its follow-ups are published once that committed; a store that
        refuses the transaction holds the delivery (`_NotSettled`) and spends no attempt.
        Otherwise only the handler is retried: a store or broker error after it must not run
        the handler's effect again (`_NotSettled`: the delivery is held while the dependency
        is away, else returned to the queue after a back-off)."""
        handler = (
            functools.partial(route.handler, attempt=attempt)
            if route.takes_attempt
            else route.handler
        )
        if route.stateful:

            async def stateful() -> tuple[list[Serialised], datetime]:
                async with self._inbox.transaction() as conn:
                    produced = await _cancelled_as_failure(handler(event, conn)) or ()
                    follow_ups = _serialised(produced, event)
                    bodies = [f.body for f in follow_ups]
                    handled_at = await self._inbox.record(conn, event, bodies, attempt)
                    if handled_at is None:
                        raise _AlreadyHandled
                return follow_ups, handled_at

            try:
                follow_ups, handled_at = await route.retry.call(stateful)
            except Exception as exc:
                if store_unavailable(exc) and not route.retry.is_permanent(exc):
                    # The transaction is the runtime's, not the handler's: a store that
                    # refuses it (locked, full, away, failing over) holds the delivery, as
                    # the inbox record of a plain route does, and spends none of its
                    # attempts; unless the handler gave up itself (a permanent error). The
                    # transaction rolled back, so the next try is a first one.
                    raise _NotSettled(
                        f"the store did not take the handler's state: {exc!r}"
                    ) from exc
                raise
            await self._publish_handled(follow_ups, handled_at)
            return handled_at
        produced = await route.retry.call(lambda: _cancelled_as_failure(handler(event)))
        follow_ups = _serialised(produced or (), event)
        if route.idempotent:
            await self._publish_handled(follow_ups, None)
            return None
        try:
            return await self._record_and_publish(event, follow_ups, attempt)
        except _NotSettled as exc:
            exc.retry = functools.partial(self._record_and_publish, event, follow_ups, attempt)
            raise

    async def _publish_handled(
        self, follow_ups: Sequence[Serialised], handled_at: datetime | None
    ) -> datetime | None:
        """Publish the follow-ups of a handled event (recorded at `handled_at`, if it was); a
        failure now is the infrastructure's, not the handler's, which must not run again
        (`_NotSettled`, whose retry is this publish)."""
        try:
            await self._publish_follow_ups(follow_ups)
        except Exception as exc:
            not_settled = _NotSettled(f"publishing the follow-ups failed: {exc!r}")
            not_settled.retry = functools.partial(self._publish_handled, follow_ups, handled_at)
            raise not_settled from exc
        return handled_at

    async def _record_and_publish(
        self, event: Envelope, follow_ups: Sequence[Serialised], attempt: int
    ) -> datetime:
        """Record a handled event and publish its follow-ups, overlapping: one disk sync fewer
        on the way. Both finish before anything is settled (a returned delivery finds the
        record); a crash between them is a crash before the ack, which the inbox and the
        follow-ups' derived ids cover. When the record was made."""
        remember = self._inbox.remember(event, [f.body for f in follow_ups], attempt)
        recorded: datetime | BaseException | None
        published: BaseException | None = None
        if follow_ups:
            recorded, published = await asyncio.gather(
                remember, self._publish_follow_ups(follow_ups), return_exceptions=True
            )
        else:
            recorded = await _outcome(remember)
        for outcome in (recorded, published):
            if isinstance(outcome, Exception):
                raise _NotSettled(f"the handler succeeded but: {outcome!r}") from outcome
            if isinstance(outcome, BaseException):
                raise outcome  # cancelled: the delivery returns with the channel
        if recorded is None:
            raise _AlreadyHandled
        assert not isinstance(recorded, BaseException)  # raised above
        return recorded

    async def _skip_duplicate(
        self, message: DeliveredMessage, event: Envelope, known: Handled | None
    ) -> None:
        # The first handling may have crashed before its follow-ups were confirmed: send them
        # again (same derived ids, so downstream inboxes drop them if they did arrive).
        follow_ups = known.follow_ups if known is not None else ()
        await self._publish_follow_ups([Serialised.of(e) for e in follow_ups])
        self._ack(message)
        if known is not None and known.attempt is not None:
            # Its success, as the record has it: the first handling may have lost its report
            # (its channel closed before the ack, the process killed before the next report).
            # The same report the gateway may have, which it keeps once.
            self._report(event, "succeeded", at=known.handled_at, attempt=known.attempt)
        self._report(event, "skipped_duplicate")
        log.info("skipped duplicate", extra={"follow_ups": len(follow_ups)})

    async def _publish_follow_ups(self, follow_ups: Sequence[Serialised]) -> None:
        """Publish each follow-up to its subscribers, and hand the gateway those it keeps as
        results (`ResultReporter`); all confirmed before this returns."""
        exchange = self._topology.events_exchange
        results = [f.body for f in follow_ups if f.event.type in RESULT_TYPES]
        reported = self._results.report(results) if results else None
        publish = self._publisher.publish_event
        try:
            if len(follow_ups) == 1:  # the usual case: no task for a gather
                await publish(follow_ups[0].event, exchange=exchange, body=follow_ups[0].body)
            else:
                await asyncio.gather(
                    *(publish(f.event, exchange=exchange, body=f.body) for f in follow_ups)
                )
        except BaseException:
            if reported is not None:  # settled, but the publish's failure is the one raised
                await asyncio.gather(reported, return_exceptions=True)
            raise
        if reported is not None:
            await reported

    async def _on_failure(
        self,
        message: DeliveredMessage,
        event: Envelope,
        policy: RetryPolicy,
        failure: Failure,
    ) -> None:
        if policy.is_permanent(failure.exc):
            await self._dead_letter(message, failure, "permanent", event)
            return
        delay = policy.next_delay(failure.attempt, failure.exc)
        if delay is None:
            await self._dead_letter(message, failure, "retries_exhausted", event)
            return
        retry_headers = failure.retry_headers(message.header.properties.headers or {})
        await self._publish_to_own(
            message.body, _republished(message, retry_headers), self._topology.retry_queue(delay)
        )
        self._ack(message)
        self._report(
            event,
            "retrying",
            attempt=failure.attempt,
            next_attempt_at=failure.at + timedelta(seconds=delay),
            detail=failure.summary(),
        )
        log.warning(
            "attempt failed; retrying later",
            extra={
                "event_type": event.type,
                "attempt": failure.attempt,
                "retry_in_seconds": delay,
                "error": failure.summary(),
            },
        )

    async def _publish_to_own(
        self, body: bytes, properties: spec.Basic.Properties, queue: str
    ) -> None:
        """Publish into one of the service's own queues (a delay tier, its dead-letter queue).
        Unroutable, an operator deleted it: the topology is declared again and the publish
        tried once more. (Nothing declared it again: every failure went back to the queue
        until the broker's delivery limit, the retry schedule and the failure's story lost,
        and with the dead-letter queue gone, the event stayed `processing` out of sight.)"""
        try:
            await self._publisher.publish_raw(body, properties, exchange="", routing_key=queue)
        except Unroutable:
            connection = self._connection
            if connection is None or connection.is_closed:
                raise
            log.warning(
                "a queue of the service is gone; declaring it again", extra={"queue": queue}
            )
            await declare_topology(connection, [self._topology])
            await self._publisher.publish_raw(body, properties, exchange="", routing_key=queue)

    async def _dead_letter(
        self,
        message: DeliveredMessage,
        failure: Failure,
        reason: FailureReason,
        event: Envelope | None = None,
    ) -> None:
        properties = message.header.properties
        dead_headers = failure.dead_letter_headers(
            properties.headers or {},
            reason=reason,
            service=self._topology.service,
            queue=self._queue_spec.name,  # the lane it failed in (work, control, files)
            event_id=event.id if event is not None else properties.message_id,
            event_type=event.type if event is not None else properties.message_type,
        )
        await self._publish_to_own(
            message.body, _republished(message, dead_headers), self._topology.dead_letter_queue
        )
        self._ack(message)
        if event is not None:
            # The gateway shows `dead_lettered` from the letter itself, which no crash of this
            # process can take. This report is the same transition (the failure's time, to the
            # microsecond, as `courier-failed-at` carries it), for a gateway that does not
            # project consumers' letters (an earlier version): either way, one history entry.
            self._report(
                event,
                "dead_lettered",
                at=failure.at,
                attempt=failure.attempt,
                reason=reason,
                group=group_key(dead_headers[FINGERPRINT], dead_headers[EXCEPTION_MESSAGE]),
                detail=failure.summary(),
            )
        log.error(
            "dead-lettered",
            extra={
                "reason": reason,
                "event_id": dead_headers[EVENT_ID],
                "event_type": dead_headers[EVENT_TYPE],
                "attempt": failure.attempt,
                "error": failure.summary(),
            },
        )


async def _outcome(work: Awaitable[T]) -> T | Exception:
    """What `work` returned, or the exception it raised (as `gather(return_exceptions=True)`)."""
    try:
        return await work
    except Exception as exc:  # noqa: BLE001  # handed to the caller, which raises it
        return exc


def _republished(message: DeliveredMessage, headers: dict[str, Any]) -> spec.Basic.Properties:
    """The properties of a persistent copy of a delivery with new headers; identity unchanged."""
    properties = message.header.properties
    return spec.Basic.Properties(
        content_type=properties.content_type or CONTENT_TYPE,
        delivery_mode=PERSISTENT,
        message_id=properties.message_id,
        message_type=properties.message_type,
        correlation_id=properties.correlation_id,
        timestamp=properties.timestamp,
        headers=headers,
    )


async def _requeue(message: DeliveredMessage) -> None:
    # If the channel is gone, the broker returns the message by itself.
    with contextlib.suppress(AMQPError, ChannelInvalidStateError, ConnectionError):
        await message.channel.basic_nack(delivery_tag(message), requeue=True)


class OneAtATime:
    """Exclusive holds on keys: a lock per key that costs a dict entry, not a lock object, when
    nobody waits (almost always: a duplicate delivery in flight is rare)."""

    def __init__(self) -> None:
        self._held: dict[str, list[asyncio.Future[None]]] = {}

    async def acquire(self, key: str) -> None:
        while (waiting := self._held.get(key)) is not None:
            wake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            waiting.append(wake)
            await wake  # then check again: another waiter may have taken it first
        self._held[key] = []

    def release(self, key: str) -> None:
        for wake in self._held.pop(key):
            if not wake.done():  # its waiter was cancelled
                wake.set_result(None)
