"""The gateway's application class: FastAPI, with a short path to the ingest endpoints.

Ingest is the gateway's hot path: thousands of requests a second on one core. Through FastAPI's
whole stack (middleware, routing, request handling) a request cost more than the endpoint's
own work but the publish (profile in README, "Benchmarks"), and the ingest endpoints use none
of it: they take the `Request`, read and validate the body themselves and return a `Response`.
So a `POST` to one of their exact paths calls the endpoint directly. Everything else goes
through FastAPI as usual, and so do the same endpoints reached another way (under a mount
prefix): they are ordinary routes, in the OpenAPI document like every other.

An app given middleware of its own takes the full path for every request: no middleware is
ever skipped. HTTP errors are answered by the app's own `HTTPException` handler.

Every HTTP request, on either path, has its body watched by `body_rate` when the app has one
(`services.gateway.body_rate`: slow bodies are answered `408`).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from services.gateway.body_rate import BodyRate

Endpoint = Callable[[Request], Awaitable[Response]]


class Gateway(FastAPI):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._short_paths: dict[str, Endpoint] = {}
        self.body_rate: BodyRate | None = None

    def short_path(self, path: str, endpoint: Endpoint) -> None:
        """Serve `POST path` by calling `endpoint` directly (it must be a route as well)."""
        self._short_paths[path] = endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.body_rate is not None:
            receive, send = self.body_rate.exchange(scope, receive, send)
        if scope["type"] == "http" and scope["method"] == "POST" and not self.user_middleware:
            endpoint = self._short_paths.get(scope["path"])
            if endpoint is not None:
                scope["app"] = self
                await self._serve(endpoint, scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    async def _serve(self, endpoint: Endpoint, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        try:
            response = await endpoint(request)
        except HTTPException as exc:
            # The most specific handler, as Starlette picks it.
            handler = next(
                self.exception_handlers[cls]
                for cls in type(exc).__mro__
                if cls in self.exception_handlers
            )
            answer = handler(request, exc)
            response = await answer if inspect.isawaitable(answer) else answer
        await response(scope, receive, send)
