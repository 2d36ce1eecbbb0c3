"""The gateway application factory, served by `python -m services.gateway` (uvicorn with the
bounded-head protocol; `uvicorn services.gateway.app:create_app --factory` runs it without)."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import timedelta
from typing import Any, TypeVar

from fastapi import FastAPI

from contracts.envelope import Envelope
from contracts.events import EVENT_ADAPTER, INGEST_ADAPTER
from contracts.topology import events_exchange
from services.blobs import LocalBlobStore
from services.gateway.body_rate import SWEEP_SECONDS as BODY_SWEEP_SECONDS
from services.gateway.body_rate import BodyRate
from services.gateway.broker import BrokerLink
from services.gateway.callbacks import Callbacks
from services.gateway.file_announcer import FileAnnouncer
from services.gateway.file_routes import router as files_router
from services.gateway.files import Files
from services.gateway.idempotency import IdempotencyKeys
from services.gateway.letters import keep_letters
from services.gateway.routes import router, store_away, submit_batch, submit_event
from services.gateway.settings import GatewaySettings
from services.gateway.short_path import Gateway
from services.gateway.tracking import Tracking
from services.messaging.consumer import Consumer, Route
from services.messaging.dead_letters import DeadLetterDrain
from services.messaging.errors import StoreOfAnotherNamespace
from services.messaging.exits import ServiceExit, log_refusal
from services.messaging.heap import freeze_start_up_heap
from services.messaging.inbox import Inbox
from services.messaging.logs import get_logger
from services.messaging.periodic import run_every
from services.messaging.publisher import Publisher
from services.messaging.retry import RetryPolicy
from services.messaging.store import STORE_ERRORS, claim, open_store, store_checked, store_url
from services.ops.operations import Operations
from services.ops.routes import router as ops_router
from services.ops.store import FailureStore, open_letter_of

log = get_logger("gateway")

_REF = "#/components/schemas/{model}"
PURGE_INTERVAL_SECONDS = 3600
CALLBACK_SWEEP_SECONDS = 60
ABANDONED_UPLOAD_AGE = timedelta(hours=1)
"""A partial upload nobody wrote to, or a blob no record points to, this long: left by a crash."""
PROJECTION_PREFETCH = 64
SERVICE = "gateway"
EventT = TypeVar("EventT", bound=Envelope)


def _with_event_schemas(app: FastAPI) -> dict[str, Any]:
    """OpenAPI with every event schema (the routes read raw bodies, so FastAPI can't infer them)."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, adapter in (("IngestEvent", INGEST_ADAPTER), ("Event", EVENT_ADAPTER)):
            event_schema = adapter.json_schema(ref_template=_REF, mode="validation")
            components.update(event_schema.pop("$defs", {}))
            components[name] = event_schema
        app.openapi_schema = schema
    return app.openapi_schema


def _housekeeping(
    stack: AsyncExitStack,
    failures: FailureStore,
    keys: IdempotencyKeys,
    inbox: Inbox,
    retention: timedelta,
) -> None:
    run_every(
        stack, PURGE_INTERVAL_SECONDS, "failures-purge", lambda: failures.purge_closed(retention)
    )
    run_every(stack, PURGE_INTERVAL_SECONDS, "idempotency-purge", keys.purge)
    run_every(stack, PURGE_INTERVAL_SECONDS, "inbox-prune", lambda: inbox.prune(retention))


def _held_while_away(
    apply: Callable[[EventT], Awaitable[None]],
) -> Callable[[EventT], Awaitable[None]]:
    """A projection handler whose store away holds its delivery (`StoreUnavailable`) instead
    of spending retry attempts: a report dead-lettered after an outage left its events'
    status and callbacks behind until an operator replayed it."""

    async def held(event: EventT) -> None:
        await store_checked(apply(event), f"apply {event.type}")

    return held


def _projection_consumer(
    settings: GatewaySettings,
    tracking: Tracking,
    inbox: Inbox,
    publisher: Publisher,
    files: Files,
) -> Consumer:
    """The gateway's own consumer: status reports and results, into its projection."""
    topology = settings.topology(SERVICE)
    policy = RetryPolicy(delays=settings.retry_delays)
    routes = {
        "status.reported": Route(
            _held_while_away(tracking.apply_reported), policy, idempotent=True
        ),
        "results.reported": Route(
            _held_while_away(tracking.record_results), policy, idempotent=True
        ),
        # Results of processors of an earlier version, through the binding they rely on
        # (kept until COURIER_UNBIND_RETIRED), and what it queued before.
        "dataset.processed": Route(
            _held_while_away(tracking.record_result), policy, idempotent=True
        ),
        "file.processed": Route(files.record_result, policy, stateful=True),
    }
    return Consumer(
        topology=topology,
        routes=routes,
        publisher=publisher,
        inbox=inbox,
        prefetch=PROJECTION_PREFETCH,
    )


def create_app(
    settings: GatewaySettings | None = None, *, stop: Callable[[ServiceExit], None] | None = None
) -> FastAPI:
    """The gateway. `stop`, from the process that serves it, ends that process with an exit
    code when the gateway must not go on: its store claimed by another namespace, a queue
    declared with other arguments."""
    settings = settings or GatewaySettings()
    body_rate = BodyRate(
        settings.min_body_rate, settings.body_rate_grace_seconds, settings.body_idle_timeout_seconds
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            engine = open_store(store_url(settings.database_url, settings.data_dir, "gateway"))
            stack.push_async_callback(engine.dispose)
            try:
                await claim(engine, settings.namespace)
            except StoreOfAnotherNamespace as exc:
                # Said plainly, not only at the end of uvicorn's start-up traceback.
                log_refusal(log, ServiceExit.STORE_CLAIMED, exc)
                if stop is not None:
                    stop(ServiceExit.STORE_CLAIMED)
                raise
            failures = FailureStore(engine)
            refuse = None if stop is None else functools.partial(stop, ServiceExit.TOPOLOGY)
            broker = BrokerLink(settings, refuse=refuse)  # connects only once started, below
            callbacks = Callbacks(engine, broker.publisher, events_exchange(settings.namespace))
            stack.callback(callbacks.close)
            tracking = Tracking(
                engine,
                on_final=callbacks.publish_settled,
                results_batch=PROJECTION_PREFETCH // 2,
            )
            keys = IdempotencyKeys(
                engine,
                ttl=timedelta(hours=settings.idempotency_ttl_hours),
                lease=timedelta(seconds=settings.publish_timeout * 3),
            )
            inbox = Inbox(engine, SERVICE)
            stack.callback(inbox.close)
            # Twice a publish's wait for its confirm: an upload still publishing is not taken.
            announce_after = timedelta(seconds=2 * settings.publish_timeout)
            files = Files(engine, announce_after=announce_after)
            for store in (failures, tracking, keys, inbox, files):
                await store.start()
            # Letters a replay left claimed (it died, here or in a previous run) are dead again
            # once its lease ran out: at start-up and then every half lease (the lease counts
            # from the last renewal, so no live replay loses them).
            lease = timedelta(seconds=settings.replay_lease_seconds)
            run_every(
                stack,
                max(1.0, settings.replay_lease_seconds / 2),
                "replay-leases",
                lambda: failures.release_expired(lease),
            )
            stack.push_async_callback(tracking.close)

            broker.consume_with(
                DeadLetterDrain(
                    settings.namespace,
                    [topology.dead_letter_queue for topology in settings.all_topologies()],
                    keep_letters(failures, tracking),
                    prefetch=settings.dlq_prefetch,
                    topologies=settings.all_topologies(),
                )
            )
            broker.consume_with(
                _projection_consumer(settings, tracking, inbox, broker.publisher, files)
            )
            stack.push_async_callback(broker.close)
            app.state.broker = broker
            app.state.failures = failures
            app.state.tracking = tracking
            app.state.idempotency = keys
            app.state.files = files
            app.state.blobs = LocalBlobStore(settings.blob_dir)
            app.state.operations = Operations(
                failures,
                broker.publisher,
                settings.namespace,
                lease=timedelta(seconds=settings.replay_lease_seconds),
                on_replayed=tracking.apply,
            )
            broker.start()
            _housekeeping(stack, failures, keys, inbox, timedelta(days=settings.ops_retention_days))
            tracking_retention = timedelta(days=settings.tracking_retention_days)
            run_every(
                stack,
                PURGE_INTERVAL_SECONDS,
                "tracking-prune",
                lambda: tracking.prune(tracking_retention),
            )
            file_retention = timedelta(days=settings.file_retention_days)
            run_every(
                stack,
                PURGE_INTERVAL_SECONDS,
                "files-prune",
                # A file whose dead letter is still open stays for its replay.
                lambda: files.prune(app.state.blobs, file_retention, held=open_letter_of),
            )
            run_every(
                stack,
                PURGE_INTERVAL_SECONDS,
                "blobs-sweep",
                lambda: files.sweep(app.state.blobs, ABANDONED_UPLOAD_AGE),
            )
            run_every(stack, CALLBACK_SWEEP_SECONDS, "callback-sweep", callbacks.sweep)
            app.state.file_announcer = announcer = FileAnnouncer(
                files, broker, events_exchange(settings.namespace), tracking
            )
            # As often as they fall due: a look-up in an index that is empty but for them.
            run_every(stack, announce_after.total_seconds(), "file-announce-sweep", announcer.sweep)
            if body_rate.enforced:
                run_every(stack, BODY_SWEEP_SECONDS, "slow-bodies", body_rate.sweep)
            freeze_start_up_heap(stack)
            yield

    app = Gateway(
        title="Courier gateway",
        version="0.1.0",
        summary="Durable background work and events: submit events, the broker keeps them.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.body_rate = body_rate
    for error in STORE_ERRORS:
        app.add_exception_handler(error, store_away)
    app.include_router(router)
    app.include_router(ops_router)
    app.include_router(files_router)
    app.short_path("/v1/events", submit_event)
    app.short_path("/v1/events/batch", submit_batch)
    app.openapi = lambda: _with_event_schemas(app)  # type: ignore[method-assign]
    return app
