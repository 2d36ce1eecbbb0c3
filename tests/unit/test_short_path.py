"""The gateway's short path: POSTs to the ingest paths skip FastAPI's stack, nothing else does."""

from __future__ import annotations

import httpx
from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.responses import Response

from services.gateway.short_path import Gateway


async def endpoint(request: Request) -> Response:
    body = await request.body()
    if body == b"refuse":
        raise HTTPException(503, "broker away", headers={"Retry-After": "5"})
    via = "short" if "route" not in request.scope else "full"
    return JSONResponse({"via": via, "state": request.app.state.marker}, status_code=202)


def client(app: Gateway) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gateway")


def gateway() -> Gateway:
    app = Gateway()
    app.state.marker = "app state"
    app.post("/v1/events", status_code=202)(endpoint)
    app.get("/v1/events")(lambda: {"listed": True})
    app.short_path("/v1/events", endpoint)
    return app


async def test_a_post_to_a_short_path_calls_the_endpoint_directly() -> None:
    response = await client(gateway()).post("/v1/events", content=b"{}")
    assert response.status_code == 202
    assert response.json() == {"via": "short", "state": "app state"}


async def test_an_http_error_on_the_short_path_is_answered_like_on_the_full_path() -> None:
    response = await client(gateway()).post("/v1/events", content=b"refuse")
    assert response.status_code == 503
    assert response.json() == {"detail": "broker away"}
    assert response.headers["retry-after"] == "5"


async def test_the_apps_own_http_error_handler_answers_on_the_short_path() -> None:
    app = gateway()

    @app.exception_handler(HTTPException)
    async def teapot(request: Request, exc: HTTPException) -> Response:
        return JSONResponse({"problem": exc.detail}, status_code=exc.status_code)

    response = await client(app).post("/v1/events", content=b"refuse")
    assert response.json() == {"problem": "broker away"}


async def test_other_methods_on_a_short_path_go_through_fastapi() -> None:
    response = await client(gateway()).get("/v1/events")
    assert response.json() == {"listed": True}


async def test_an_app_with_middleware_of_its_own_takes_the_full_path() -> None:
    app = gateway()
    seen: list[str] = []

    async def record(request: Request, call_next: RequestResponseEndpoint) -> Response:
        seen.append(request.url.path)
        return await call_next(request)

    app.add_middleware(BaseHTTPMiddleware, dispatch=record)
    response = await client(app).post("/v1/events", content=b"{}")
    assert response.json()["via"] == "full"
    assert seen == ["/v1/events"]


async def test_a_short_path_route_is_in_the_openapi_document() -> None:
    response = await client(gateway()).get("/openapi.json")
    assert "post" in response.json()["paths"]["/v1/events"]
