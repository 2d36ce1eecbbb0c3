"""The ops API over HTTP, as the CLI uses it: every failure becomes an `OpsError` that carries
the message the operator reads and the CLI's exit code."""

from __future__ import annotations

from collections.abc import Mapping
from enum import IntEnum
from typing import Any

import httpx

__all__ = ["ExitCode", "OpsClient", "OpsError"]


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1
    USAGE = 2
    AUTH = 3
    UNREACHABLE = 4
    UNAVAILABLE = 5
    INTERRUPTED = 130


class OpsError(Exception):
    """Something the operator must hear about; carries the exit code and any partial result."""

    def __init__(
        self,
        message: str,
        code: ExitCode = ExitCode.FAILED,
        *,
        status: int | None = None,
        detail: Any = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status
        self.detail = detail
        self.partial: dict[str, Any] | None = None


class OpsClient:
    """The ops API over HTTP; every failure becomes an `OpsError` with a clear message."""

    def __init__(self, url: str, token: str, timeout: float) -> None:
        self.url = url.rstrip("/")
        self._shown = _without_password(self.url)
        """The URL as messages quote it: a proxy's basic auth password stays out."""
        self._timeout = timeout
        self._http = httpx.Client(
            base_url=f"{self.url}/v1/ops",
            headers={"Authorization": f"Bearer {token}", "User-Agent": "courier-cli"},
            timeout=timeout,
        )

    def close(self) -> None:
        self._http.close()

    def get(self, path: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        # httpx would send a None as an empty value (`cursor=`): leave those out.
        query = {key: value for key, value in (params or {}).items() if value is not None}
        return self._send("GET", path, params=query)

    def post(self, path: str, body: Mapping[str, Any], *, extra_seconds: float = 0.0) -> Any:
        """POST; `extra_seconds` on top of the timeout for work the gateway paces (--rate)."""
        return self._send("POST", path, body=dict(body), timeout=self._timeout + extra_seconds)

    def _send(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        body: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        try:
            response = self._http.request(
                method, path, params=params, json=body, timeout=timeout or self._timeout
            )
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise OpsError(
                f"cannot reach the gateway at {self._shown}: {exc or type(exc).__name__} "
                "(check --url / COURIER_URL)",
                ExitCode.UNREACHABLE,
            ) from None
        except httpx.TimeoutException:
            raise OpsError(
                f"the gateway at {self._shown} did not answer in time; a replay or discard may "
                "still have happened: check `courier dlq actions`",
                ExitCode.FAILED,
            ) from None
        except httpx.HTTPError as exc:
            raise OpsError(
                f"talking to the gateway at {self._shown} failed: {type(exc).__name__}: "
                f"{str(exc).replace(self.url, self._shown)}"
            ) from None
        return _decode(response)


def _without_password(url: str) -> str:
    """`url` with its password, if any, as `******` (as aio-pika shows an AMQP URL)."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        return "the --url given (not a URL)"
    if not parsed.password:
        return url
    return str(parsed.copy_with(username=parsed.username, password="******"))  # noqa: S106


def _decode(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        body = None
    status = response.status_code
    if response.is_success and isinstance(body, dict):
        return body
    if response.is_success:
        raise OpsError(
            f"{response.request.url.path} answered {status} without a JSON object; "
            "is --url the Courier gateway?",
            status=status,
        )
    detail = body.get("detail") if isinstance(body, dict) else response.text[:300]
    if status == 401:
        raise OpsError(
            "the gateway wants an ops token (401): pass --token or set COURIER_OPS_TOKEN",
            ExitCode.AUTH,
            status=status,
        )
    if status == 403:
        raise OpsError(
            "the gateway refused this ops token (403): check COURIER_OPS_TOKEN against the "
            "gateway's COURIER_OPS_TOKENS",
            ExitCode.AUTH,
            status=status,
        )
    if status == 503:
        error = detail.get("error") if isinstance(detail, dict) else detail
        retry = response.headers.get("retry-after")
        raise OpsError(
            f"unavailable (503): {error or 'no detail'}"
            + (f"; retry in {retry}s" if retry else ""),
            ExitCode.UNAVAILABLE,
            status=status,
            detail=detail,
        )
    if status == 422:
        raise OpsError(
            f"the gateway rejected the request (422): {_validation_text(detail)}",
            status=status,
            detail=detail,
        )
    if status == 404 and detail == "Not Found":
        raise OpsError(
            f"{response.request.url.path} does not exist (404); is --url the Courier gateway?",
            status=status,
        )
    raise OpsError(f"the gateway answered {status}: {detail}", status=status, detail=detail)


def _validation_text(detail: Any) -> str:
    if not isinstance(detail, list):
        return str(detail)
    parts = []
    for error in detail:
        if isinstance(error, dict):
            where = ".".join(str(p) for p in error.get("loc", ()) if p not in ("body", "query"))
            parts.append(f"{where}: {error.get('msg')}" if where else str(error.get("msg")))
    return "; ".join(parts) or str(detail)
