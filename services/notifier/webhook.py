"""The webhook channel: POST the event as JSON to the recipient URL, signed.

The request body is the CloudEvents envelope of the event that asked for the notification
(structured mode, `application/json`), without the submitter's `callbackurl` (see
`webhook_body`). Headers: `Courier-Signature` (see `signing`),
`Idempotency-Key` = the event id (the same on every retry, so a receiver can dedup; an id a
header cannot carry as it is, such as one with non-ASCII characters, as its SHA-256 in hex), and
`User-Agent`. Redirects are not followed.

How the answer is classified:

* 2xx                                     → delivered;
* 408, 429, 5xx, timeouts, connection errors → transient (`WebhookUnavailable`, a `RetryLater`
                                            carrying the receiver's `Retry-After`): retried;
* anything else (3xx, other 4xx)          → permanent (`WebhookRejected`, with the status and
                                            the start of the body): dead-lettered at once.

The status line decides: a body that stalls or breaks after it changes nothing.

Targets are guarded (`targets`): the connection is opened by a network backend that resolves the
host itself and refuses non-public addresses unless allow-listed.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Final

import httpcore
import httpx

from contracts.envelope import Envelope
from services.messaging.dead_letters import printable
from services.messaging.errors import PermanentError, RetryLater
from services.messaging.logs import get_logger
from services.notifier.breaker import DEFAULT_COOLDOWN, ReceiverBreaker
from services.notifier.channels import Notification
from services.notifier.signing import SIGNATURE_HEADER, sign
from services.notifier.targets import (
    Resolver,
    TargetPolicy,
    TargetRefused,
    check_url,
    dns_host,
    resolve,
)

log = get_logger("notifier.webhook")

USER_AGENT: Final = "Courier-Webhook/1"
MAX_ERROR_BODY: Final = 512
"""Bytes of a refusing receiver's body kept in the error (and so in the dead letter)."""
TRANSIENT_STATUSES: Final = frozenset({408, 429})
DEFAULT_PORTS: Final = {"http": 80, "https": 443}


class WebhookUnavailable(RetryLater):
    """The receiver answered with a status worth retrying (408, 429, 5xx)."""

    def __init__(self, status: int, body: str, retry_after: float | None) -> None:
        detail = f"webhook answered {status}" + (f": {body}" if body else "")
        if retry_after is not None:
            detail += f" (Retry-After {retry_after:g} s)"
        super().__init__(detail, min_delay=retry_after or 0.0)
        self.status = status
        self.body = body


class WebhookRejected(PermanentError):
    """The receiver refused the request (3xx, 4xx other than 408 and 429): retrying cannot help."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"webhook answered {status}" + (f": {body}" if body else ""))
        self.status = status
        self.body = body


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from a `Retry-After` header (delay-seconds or an HTTP-date), else None."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # not "²", which `isdigit` takes too
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


def _trimmed(body: bytes) -> str:
    text = body[:MAX_ERROR_BODY].decode("utf-8", errors="replace")
    # One line, for it ends up in a header and a log line, and escaped as the failure store
    # escapes text: the receiver's escape sequences must reach no operator's terminal.
    return printable(" ".join(text.split()))


_PRIVATE: Final[dict[str, Any]] = {"callbackurl": True, "data": {"notify"}}


def webhook_body(event: Envelope) -> bytes:
    """The JSON a receiver gets: the event's envelope without the submitter's callback URL,
    which is none of the receiver's business and often holds a secret token in its path or
    query, nor whom else the event notifies (a dataset's or a processed file's `notify`), for
    the same reason."""
    return event.model_dump_json(exclude=_PRIVATE).encode()


def check_response(status: int, headers: Mapping[str, str], body: bytes, now: datetime) -> None:
    """Return for a 2xx; raise `WebhookUnavailable` (transient) or `WebhookRejected`."""
    if 200 <= status < 300:
        return
    if status in TRANSIENT_STATUSES or 500 <= status < 600:
        raise WebhookUnavailable(
            status, _trimmed(body), parse_retry_after(headers.get("retry-after"), now)
        )
    raise WebhookRejected(status, _trimmed(body))


class WebhookSecrets:
    """Signing secrets: one per receiving host, else the default."""

    def __init__(self, default: bytes | None, by_host: Mapping[str, bytes]) -> None:
        self._default = default
        self._by_host = {dns_host(host): secret for host, secret in by_host.items()}

    def __bool__(self) -> bool:
        return self._default is not None or bool(self._by_host)

    def for_host(self, host: str | bytes) -> bytes | None:
        """The secret for `host`, written either way (`bücher.de` or `xn--bcher-kva.de`)."""
        return self._by_host.get(dns_host(host), self._default)


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """Opens TCP connections only to addresses the target policy allows.

    The host is resolved here, every address is checked, and the connection goes to one of the
    checked addresses (in resolver order), so a second, different DNS answer never gets used.
    TLS still verifies the certificate against the host name.
    """

    def __init__(
        self,
        policy: TargetPolicy,
        resolver: Resolver = resolve,
        inner: httpcore.AsyncNetworkBackend | None = None,
    ) -> None:
        self._policy = policy
        self._resolver = resolver
        self._inner = inner or httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109  # httpcore's interface
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            async with asyncio.timeout(timeout):
                addresses = await self._policy.addresses(host, port, self._resolver)
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"resolving {host} timed out") from None
        except OSError as exc:  # socket.gaierror: no such name, resolver down
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from exc
        last: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    str(address),
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None  # `addresses` is never empty: the policy refuses that
        # Named: "All connection attempts failed" in a dead letter does not say whose.
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise type(last)(f"{where}: {last}") from last

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109  # httpcore's interface
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise TargetRefused("webhooks never go to a Unix socket")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport (pooling, HTTP/1.1, error mapping) over the guarded backend."""

    def __init__(self, backend: GuardedBackend, limits: httpx.Limits) -> None:
        super().__init__(limits=limits, trust_env=False)
        # httpx has no public hook for the network backend: rebuild its pool with the same
        # settings plus ours. Tested by `test_webhook_refuses_private_targets_through_the_client`.
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=backend,
        )


def webhook_client(
    policy: TargetPolicy,
    *,
    timeout: float,
    connect_timeout: float,
    max_connections: int,
    resolver: Resolver = resolve,
) -> httpx.AsyncClient:
    """The pooled client of the webhook channel; open it at start-up, close it at shutdown.

    No proxies from the environment (they would resolve the host themselves, around the guard),
    no redirects (a 3xx is a permanent failure).
    """
    limits = httpx.Limits(
        max_connections=max_connections,
        max_keepalive_connections=max_connections,
        keepalive_expiry=30.0,
    )
    return httpx.AsyncClient(
        transport=GuardedTransport(GuardedBackend(policy, resolver), limits),
        timeout=httpx.Timeout(timeout, connect=connect_timeout),
        follow_redirects=False,
        trust_env=False,
        headers={"User-Agent": USER_AGENT},
    )


class WebhookChannel:
    def __init__(
        self,
        client: httpx.AsyncClient,
        secrets: WebhookSecrets,
        *,
        timeout: float,
        cooldown: float = DEFAULT_COOLDOWN,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`cooldown`: seconds a receiver that did not answer in time is not asked (see
        `breaker`); 0: always asked."""
        self._client = client
        self._secrets = secrets
        self._timeout = timeout
        self._breaker = ReceiverBreaker(cooldown)
        self._clock = clock

    async def deliver(self, notification: Notification) -> None:
        url = check_url(notification.recipient)
        secret = self._secrets.for_host(url.raw_host)
        if secret is None:
            raise TargetRefused(f"no webhook signing secret for {dns_host(url.raw_host)}")
        body = webhook_body(notification.event)  # what is signed is what is sent
        headers = {
            "Content-Type": "application/json",
            "Idempotency-Key": idempotency_key(notification.event_id),
            SIGNATURE_HEADER: sign(secret, int(self._clock()), body),
            # A compressed answer would be inflated whole before any cap applies (a small
            # gzip bomb, hundreds of MB): ask for none, and read what comes as it is.
            "Accept-Encoding": "identity",
        }
        receiver = f"{dns_host(url.raw_host)}:{url.port or DEFAULT_PORTS[url.scheme]}"
        self._breaker.enter(receiver)
        answered = timed_out = False
        start = bytearray()
        try:
            # httpx's timeouts bound each phase; this bounds the whole exchange (a slow drip).
            async with (
                asyncio.timeout(self._timeout),
                self._client.stream("POST", url, content=body, headers=headers) as response,
            ):
                # The status line decides. A short body is still read, so that the
                # connection can serve the next webhook.
                answered = True
                await _read_start(response, start)
        except (httpx.HTTPError, TimeoutError, OSError) as exc:
            if not answered:
                # The receiver's silence, not a wait for one of the notifier's own connections.
                timed_out = isinstance(
                    exc, (TimeoutError, httpx.TimeoutException)
                ) and not isinstance(exc, httpx.PoolTimeout)
                if isinstance(exc, TimeoutError) and not str(exc):
                    # The whole exchange's bound, which says nothing: nor would the letter.
                    host = dns_host(url.raw_host)
                    raise TimeoutError(f"{host} did not answer within {self._timeout:g} s") from exc
                raise
            # Reading the answer failed after its status line (a body that stalls, or a reset).
            # The status still decides: an accepted notification retried would be sent twice,
            # and a refusal stays a refusal.
            log.info(
                "reading the rest of a webhook's answer failed",
                extra={"status": response.status_code, "error": repr(exc)},
            )
        finally:
            self._breaker.settle(receiver, timed_out=timed_out)
        check_response(response.status_code, response.headers, bytes(start), datetime.now(UTC))


async def _read_start(response: httpx.Response, start: bytearray) -> None:
    """Read the first MAX_ERROR_BODY bytes of an answer's body into `start`, as sent (not
    decoded: bounded); what arrived stays there if reading fails."""
    async for chunk in response.aiter_raw():
        start += chunk[: MAX_ERROR_BODY + 1 - len(start)]
        if len(start) > MAX_ERROR_BODY:
            break


_HEADER_SAFE = re.compile(r"[\x21-\x7e]+")
"""Visible ASCII: what a header value carries as it is everywhere (no spaces to trim)."""


def idempotency_key(event_id: str) -> str:
    """The `Idempotency-Key` of a notification: its id, or the id's SHA-256 in hex where a
    header cannot carry the id as it is (HTTP clients refuse non-ASCII values). The same on
    every attempt either way."""
    if _HEADER_SAFE.fullmatch(event_id):
        return event_id
    return hashlib.sha256(event_id.encode()).hexdigest()
