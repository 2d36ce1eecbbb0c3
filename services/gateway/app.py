"""The gateway application factory: `uvicorn services.gateway.app:create_app --factory`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from contracts.events import EVENT_ADAPTER, INGEST_ADAPTER
from services.gateway.broker import BrokerLink
from services.gateway.routes import router
from services.gateway.settings import GatewaySettings

_REF = "#/components/schemas/{model}"


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


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or GatewaySettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        broker = BrokerLink(settings)
        app.state.broker = broker
        broker.start()
        try:
            yield
        finally:
            await broker.close()

    app = FastAPI(
        title="Courier gateway",
        version="0.1.0",
        summary="Durable background work and events: submit events, the broker keeps them.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.include_router(router)
    app.openapi = lambda: _with_event_schemas(app)  # type: ignore[method-assign]
    return app
