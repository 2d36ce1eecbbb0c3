"""A consuming service's life: connect, declare, consume, watch, drain on SIGTERM, exit.

Exit codes: 0 after a clean stop (SIGTERM/SIGINT), 1 when the service could not consume for
`unready_exit_after` seconds (a supervisor restarts it), 2 when the broker's topology does not
match this service's (an operator must act; restarting cannot help).
"""

from __future__ import annotations

import asyncio
import functools
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from contextlib import AsyncExitStack
from datetime import timedelta
from typing import Final, NoReturn, TypeVar

import uvloop
from aio_pika.abc import AbstractRobustConnection
from aiormq.exceptions import AMQPConnectionError, ChannelInvalidStateError
from sqlalchemy.ext.asyncio import AsyncConnection
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
)

from contracts.topology import ServiceTopology
from contracts.tracking import CancellationRequested
from services.messaging.connection import open_connection
from services.messaging.consumer import Consumer, OneAtATime, Route
from services.messaging.declare import declare_topology, redeclare_on_reconnect
from services.messaging.errors import StoreOfAnotherNamespace, TopologyMismatch
from services.messaging.exits import ServiceExit, log_refusal
from services.messaging.health import serve_health
from services.messaging.heap import freeze_start_up_heap
from services.messaging.inbox import Inbox
from services.messaging.logs import configure_logging, get_logger
from services.messaging.periodic import run_every
from services.messaging.publisher import Publisher
from services.messaging.results import ResultReporter
from services.messaging.settings import ConsumerSettings
from services.messaging.status import StatusReporter
from services.messaging.store import STORE_ERRORS, claim, open_store, store_url

log = get_logger("runtime")

S = TypeVar("S", bound=ConsumerSettings)
T = TypeVar("T")
RoutesFactory = Callable[[AsyncExitStack, S], Awaitable[Mapping[str, Route]]]
"""Builds a service's routes and their resources; resources register their cleanup on the stack."""

CONTROL_PREFETCH = 16
CATCH_UP_SECONDS = 30.0
PRUNE_INTERVAL_SECONDS = 3600
# The closes after the drain that wait for the broker (the last status report, the publisher,
# the connection) share this; with 5 s each, a stop with the broker away ran ~15 s past the
# shutdown timeout, past a supervisor's grace period.
CLOSE_BUDGET = 5.0
# Also a channel the broker closed under a declaration: the connection went right after it came.
_CONNECT_ERRORS = (AMQPConnectionError, ChannelInvalidStateError, ConnectionError, OSError)


async def _connect(
    settings: ConsumerSettings, service: str, publisher: Publisher, topology: ServiceTopology
) -> AbstractRobustConnection:
    """Connect consumer and publisher and declare the topology, retrying for up to
    `unready_exit_after` seconds (a broker that drops the connection right after accepting it
    is retried like one that refuses it). A `TopologyMismatch` is not retried."""
    async for attempt in AsyncRetrying(
        stop=stop_after_delay(settings.unready_exit_after),
        wait=wait_exponential(multiplier=0.5, max=5),
        retry=retry_if_exception_type(_CONNECT_ERRORS),
        reraise=True,
        before_sleep=lambda state: log.warning(
            "broker not reachable; retrying",
            extra={
                "attempt": state.attempt_number,
                "error": repr(state.outcome and state.outcome.exception()),
            },
        ),
    ):
        with attempt:
            connection = await open_connection(
                settings.amqp_url, heartbeat=settings.heartbeat, name=f"{service}-consumer"
            )
            try:
                await publisher.connect()
                # It consumes its lanes: the work queue's bindings of their types go.
                await declare_topology(connection, [topology], unbind_moved=True)
            except BaseException:
                await publisher.close()
                await connection.close()
                raise
            return connection
    raise AssertionError("unreachable: tenacity reraises")


async def _unless_stopped(work: Awaitable[T], stop: asyncio.Event) -> T | None:
    """`work`'s result, or None once `stop` is set first (`work` is cancelled then): a
    service told to stop while it waits for the broker stops, rather than waiting on until
    `COURIER_UNREADY_EXIT_AFTER` ends it with a failure."""
    working = asyncio.ensure_future(work)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({working, stopping}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        working.cancel()
        raise
    finally:
        stopping.cancel()
    if working.done():
        return working.result()
    working.cancel()
    await asyncio.gather(working, return_exceptions=True)
    return None


async def _watch(
    consuming: Callable[[], bool], stop: asyncio.Event, unready_exit_after: float
) -> int:
    """Wait for a stop signal; give up if not consuming for too long."""
    last_consuming = time.monotonic()
    while not stop.is_set():
        if consuming():
            last_consuming = time.monotonic()
        elif time.monotonic() - last_consuming > unready_exit_after:
            log.error("not consuming for too long; exiting", extra={"seconds": unready_exit_after})
            return ServiceExit.FAILED
        try:
            async with asyncio.timeout(1.0):
                await stop.wait()
        except TimeoutError:
            continue
    return ServiceExit.OK


async def _open_inbox(
    stack: AsyncExitStack, settings: ConsumerSettings, service: str, reported: Collection[str]
) -> Inbox:
    engine = open_store(store_url(settings.database_url, settings.data_dir, service))
    stack.push_async_callback(engine.dispose)
    inbox = Inbox(
        engine,
        service,
        commit_delay=settings.inbox_commit_delay_ms / 1000,
        batch=max(1, settings.prefetch // 2),
        reported_types=reported,
        # What a store of a version before owed reports re-sent at start: owed once upgraded.
        earlier_recovery=timedelta(seconds=settings.status_recovery_seconds),
    )
    stack.callback(inbox.close)
    await inbox.start()
    retention = timedelta(hours=settings.inbox_retention_hours)

    async def prune() -> None:
        log.info("inbox pruned", extra={"removed": await inbox.prune(retention)})

    run_every(stack, PRUNE_INTERVAL_SECONDS, "inbox-prune", prune)
    return inbox


class _Closing:
    """Closes that may wait for an absent broker: never hang a shutdown on them. They share
    one budget, from the first of them on."""

    def __init__(self, seconds: float = CLOSE_BUDGET) -> None:
        self._seconds = seconds
        self._deadline: float | None = None

    async def bounded(self, close: Callable[[], Awaitable[object]]) -> None:
        if self._deadline is None:
            self._deadline = asyncio.get_running_loop().time() + self._seconds
        try:
            async with asyncio.timeout_at(self._deadline):
                await close()
        except TimeoutError:
            log.warning(
                "closing took too long; leaving it",
                extra={
                    "closing": getattr(close, "__qualname__", repr(close)),
                    "budget_seconds": self._seconds,
                },
            )


async def _record_cancellation(
    inbox: Inbox, event: CancellationRequested, conn: AsyncConnection
) -> None:
    """A cancelled event is skipped when (if ever) it arrives; cancelling twice is harmless."""
    await inbox.cancel(conn, event.data.event_id)


STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)


def _ignore_stop_signals() -> None:
    """Once stopped: a stop asked again while the process ends (a supervisor, an impatient
    operator) finds nothing left to stop. With the loop's handlers gone, it killed the process
    (exit -15) after a clean stop."""
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.remove_signal_handler(sig)  # else the loop puts back the default as it closes
        signal.signal(sig, signal.SIG_IGN)


async def serve(service: str, settings: S, build_routes: RoutesFactory[S]) -> int:
    # From the first step: a stop asked while the store is claimed is a stop, not a kill.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    try:
        return await _serve(service, settings, build_routes, stop)
    except StoreOfAnotherNamespace as exc:
        log_refusal(log, ServiceExit.STORE_CLAIMED, exc)
        return ServiceExit.STORE_CLAIMED


async def _claim_store(settings: ConsumerSettings, service: str) -> bool:
    """Claim the service's store for its namespace first: refused, the service must leave
    before it declares anything on the broker or builds its routes."""
    engine = open_store(store_url(settings.database_url, settings.data_dir, service))
    try:
        await claim(engine, settings.namespace)
    finally:
        await engine.dispose()
    return True


async def _serve(
    service: str, settings: S, build_routes: RoutesFactory[S], stop: asyncio.Event
) -> int:
    try:
        claimed = await _unless_stopped(_claim_store(settings, service), stop)
    except STORE_ERRORS:
        # Away, or a file that cannot be opened: as with an absent broker, the supervisor
        # starts the service again.
        log.exception("could not open the store; exiting")
        return ServiceExit.FAILED
    if not claimed:
        log.info("stopped while opening the store")
        return ServiceExit.OK
    topology = settings.topology(service)

    consumers: list[Consumer] = []

    def consuming() -> bool:
        return bool(consumers) and all(consumer.consuming for consumer in consumers)

    def ready() -> bool:
        # Not while deliveries wait for the store (or the broker) to come back: consuming,
        # yet doing no work. Only readiness says so; the watchdog, which restarts a
        # service that cannot consume, would not bring a store back.
        return consuming() and not any(consumer.holding for consumer in consumers)

    async with AsyncExitStack() as stack:
        if settings.health_port:
            # From the start: alive (`/healthz`) while it waits for the broker, not ready.
            try:
                server = await serve_health(
                    settings.health_host, settings.health_port, ready, service
                )
            except OSError as exc:  # the port taken, an address this host does not have
                log.exception(
                    "cannot serve /healthz and /readyz on COURIER_HEALTH_HOST and "
                    "COURIER_HEALTH_PORT; exiting",
                    extra={
                        "host": settings.health_host,
                        "port": settings.health_port,
                        "error": str(exc),
                    },
                )
                return ServiceExit.FAILED
            stack.callback(server.close)
        routes = await build_routes(stack, settings)
        publisher = Publisher(
            settings.amqp_url,
            channels=settings.publisher_channels,
            confirm_timeout=settings.publish_timeout,
            heartbeat=settings.heartbeat,
            name=f"{service}-publisher",
        )
        try:
            connection = await _unless_stopped(
                _connect(settings, service, publisher, topology), stop
            )
            if connection is None:
                log.info("stopped while waiting for the broker")
                return ServiceExit.OK
        except TopologyMismatch as exc:
            log_refusal(log, ServiceExit.TOPOLOGY, exc)
            return ServiceExit.TOPOLOGY
        except _CONNECT_ERRORS:
            log.exception("could not reach the broker; exiting")
            return ServiceExit.FAILED
        closing = _Closing()
        stack.push_async_callback(closing.bounded, publisher.close)
        stack.push_async_callback(closing.bounded, connection.close)
        keep_declared = redeclare_on_reconnect(  # held for the loop
            connection, [topology], unbind_moved=True
        )

        recovering = settings.status_recovery_seconds > 0
        # The consumers' `_reported_types`, unless owed reports are never told again.
        owing = topology.event_types if recovering else ()
        inbox = await _open_inbox(stack, settings, service, owing)
        reporter = StatusReporter(
            service,
            publisher,
            topology.events_exchange,
            interval=settings.status_report_interval_ms / 1000,
            ledger=inbox if recovering else None,
            recover_after=settings.status_recovery_seconds,
        )
        reporter.start(catch_up=True)  # what a crash took, in its first rounds
        # After the drain: report what finished.
        stack.push_async_callback(closing.bounded, reporter.close)
        results = ResultReporter(
            service,
            publisher,
            topology.events_exchange,
            linger=settings.result_report_delay_ms / 1000,
            batch=max(1, settings.prefetch // 2),
        )
        cancel = Route(
            functools.partial(_record_cancellation, inbox), settings.retry_policy(), stateful=True
        )
        one_at_a_time = OneAtATime()
        consumers += [
            Consumer(
                topology=topology,
                # A lane's types too: an earlier version's binding may still route them here.
                routes={**routes, **dict.fromkeys(topology.control_event_types, cancel)},
                publisher=publisher,
                inbox=inbox,
                prefetch=settings.prefetch,
                reporter=reporter,
                results=results,
                one_at_a_time=one_at_a_time,
            ),
            *(
                Consumer(
                    topology=topology.for_lane(lane),
                    routes={t: routes[t] for t in lane.event_types},
                    publisher=publisher,
                    inbox=inbox,
                    prefetch=settings.lane_prefetch(lane.name),
                    reporter=reporter,
                    results=results,
                    one_at_a_time=one_at_a_time,
                )
                for lane in topology.lanes
            ),
        ]
        control = topology.control_queue_spec()
        if control is not None:
            # Control first, and caught up with what arrived while this service was down: a
            # cancellation waiting in the control queue must be recorded before its event is
            # taken.
            controls = Consumer(
                topology=topology,
                routes=dict.fromkeys(topology.control_event_types, cancel),
                publisher=publisher,
                inbox=inbox,
                prefetch=CONTROL_PREFETCH,
                queue=control,
                one_at_a_time=one_at_a_time,
            )
            await controls.start(connection)
            try:
                async with asyncio.timeout(CATCH_UP_SECONDS):
                    await controls.caught_up()
            except TimeoutError:
                log.warning("control requests not all applied before consuming work")
        for consumer in consumers:
            await consumer.start(connection)
        if control is not None:
            consumers.append(controls)
        freeze_start_up_heap(stack)
        code = await _watch(consuming, stop, settings.unready_exit_after)
        log.info(
            "stopping: draining in-flight handlers",
            extra={"in_flight": sum(consumer.in_flight for consumer in consumers)},
        )
        await asyncio.gather(*(c.stop(settings.shutdown_timeout) for c in consumers))
        del keep_declared
    log.info("stopped", extra={"exit_code": code})
    return code


def run(service: str, settings: S, build_routes: RoutesFactory[S]) -> NoReturn:
    """Entry point of a consuming service: configure logging once, serve, exit with its code."""
    configure_logging(settings.log_level, service)
    # uvloop (as the gateway runs under uvicorn): a faster loop and transports, ~7 % more
    # messages per CPU second in bench.consumer's path.
    sys.exit(uvloop.run(_serve_and_end(service, settings, build_routes)))


async def _serve_and_end(service: str, settings: S, build_routes: RoutesFactory[S]) -> int:
    try:
        return await serve(service, settings, build_routes)
    finally:
        _ignore_stop_signals()
