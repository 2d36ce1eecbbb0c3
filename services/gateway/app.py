"""The gateway application factory: `uvicorn services.gateway.app:create_app --factory`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

from fastapi import FastAPI

from contracts.events import EVENT_ADAPTER, INGEST_ADAPTER
from services.gateway.broker import BrokerLink
from services.gateway.routes import router
from services.gateway.settings import GatewaySettings
from services.messaging.dead_letters import DeadLetterDrain
from services.messaging.store import open_store, store_url
from services.ops.operations import Operations
from services.ops.routes import router as ops_router
from services.ops.store import FailureStore

_REF = "#/components/schemas/{model}"
PURGE_INTERVAL_SECONDS = 3600


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


async def _purge_periodically(failures: FailureStore, retention: timedelta) -> None:
    while True:
        await failures.purge_closed(retention)
        await asyncio.sleep(PURGE_INTERVAL_SECONDS)


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or GatewaySettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = open_store(store_url(settings.database_url, settings.data_dir, "gateway"))
        failures = FailureStore(engine)
        await failures.start()
        drain = DeadLetterDrain(
            settings.namespace,
            [topology.dead_letter_queue for topology in settings.all_topologies()],
            failures.add_letter,
        )
        broker = BrokerLink(settings, drain)
        app.state.broker = broker
        app.state.failures = failures
        app.state.operations = Operations(
            failures,
            broker.publisher,
            settings.namespace,
            lease=timedelta(seconds=settings.replay_lease_seconds),
        )
        broker.start()
        purge = asyncio.get_running_loop().create_task(
            _purge_periodically(failures, timedelta(days=settings.ops_retention_days))
        )
        try:
            yield
        finally:
            purge.cancel()
            await broker.close()
            await engine.dispose()

    app = FastAPI(
        title="Courier gateway",
        version="0.1.0",
        summary="Durable background work and events: submit events, the broker keeps them.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.include_router(router)
    app.include_router(ops_router)
    app.openapi = lambda: _with_event_schemas(app)  # type: ignore[method-assign]
    return app
