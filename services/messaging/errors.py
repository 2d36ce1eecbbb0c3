"""Courier's exception hierarchy.

    CourierError
    ├── BrokerUnavailable      the broker did not take a publish: down, nack, or no confirm in time
    ├── Unroutable             the broker returned a mandatory publish: no queue bound (a bug)
    ├── Unpublishable          a message AMQP cannot carry (a property too long, of a type it
    │                          has no encoding for): a bug; sending it again cannot help
    ├── TopologyMismatch       an existing queue was declared with other arguments
    ├── StoreOfAnotherNamespace  the service's store holds another deployment's data
    ├── PermanentError         raised by a handler: retrying cannot help; dead-letter at once
    ├── RetryLater             raised by a handler: transient, and not worth retrying before
    │                          `min_delay` seconds (e.g. an HTTP `Retry-After`)
    └── StoreUnavailable       raised by a handler: the service's own store is away; the delivery
                               is held until it is back, spending no attempt

Any other exception a handler raises is transient: retried, then dead-lettered when exhausted.
A handler marks one with `no_immediate_retry` when retrying it at once would repeat what it must
not: it then waits for a delay tier, its type and classification unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypeVar

E = TypeVar("E", bound=BaseException)

_NO_IMMEDIATE_RETRY = "courier_no_immediate_retry"


def no_immediate_retry(exc: E) -> E:
    """Mark `exc` to be retried on a delay tier only, not at once in process (`RetryPolicy`)."""
    setattr(exc, _NO_IMMEDIATE_RETRY, True)
    return exc


def wants_no_immediate_retry(exc: BaseException) -> bool:
    return bool(getattr(exc, _NO_IMMEDIATE_RETRY, False))


def causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and what caused it, outermost first; where a database layer wrapped a driver's
    error (SQLAlchemy's `orig`) that is not the cause already, the driver's error too."""
    seen: BaseException | None = exc
    while seen is not None:
        yield seen
        orig = getattr(seen, "orig", None)
        if isinstance(orig, BaseException) and orig is not seen.__cause__:
            yield orig
        seen = seen.__cause__


class CourierError(Exception):
    """Base of every error Courier raises on purpose."""


class BrokerUnavailable(CourierError):
    """The broker did not confirm a publish; the message may be retried later.

    `maybe_published`: the message was written and then neither confirmed nor refused (no
    confirm in time, the connection lost meanwhile), so the broker may have it. A retry must
    reuse the message's id, which consumers deduplicate; a nack or no connection at all
    leave it False: the broker does not have the message."""

    def __init__(self, message: str, *, maybe_published: bool = False) -> None:
        super().__init__(message)
        self.maybe_published = maybe_published


class Unroutable(CourierError):
    """A mandatory publish was returned: nothing is bound for its routing key."""

    def __init__(self, exchange: str, routing_key: str) -> None:
        super().__init__(f"no queue bound on {exchange!r} for routing key {routing_key!r}")
        self.exchange = exchange
        self.routing_key = routing_key


class Unpublishable(CourierError):
    """A message could not be framed for AMQP: one of its properties or headers is too long, or
    of a type the protocol has no encoding for (its cause says which). A bug, never the
    broker's doing: publishing it again cannot help."""


class TopologyMismatch(CourierError):
    """A broker object exists with other arguments than this service declares."""


class StoreOfAnotherNamespace(CourierError):
    """The service's store (database or data directory) was claimed by a deployment of another
    `COURIER_NAMESPACE`: sharing it would mix their data."""


class PermanentError(CourierError):
    """Raised by a handler when the input can never succeed (bad data, refused by a target)."""


class StoreUnavailable(CourierError):
    """Raised by a handler when the service's own store refuses its work for a while (away,
    locked, full, failing over), raised from the store's error. The delivery is then held and
    handled again with back-off, as when the inbox record fails, instead of being retried
    through the delay tiers: each of those spends an attempt, and a long outage would
    dead-letter work that only waited. The handler runs again, so it must know what it did
    already (the notifier remembers a notification it sent but could not record)."""


class RetryLater(CourierError):
    """Raised by a handler for a transient failure that should not be retried for a while.

    No immediate in-process retry is made when `min_delay` is positive, and the delayed retry
    goes to the first declared delay tier of at least `min_delay` seconds (the longest tier if
    none is that long). It still counts as an attempt, so a target that keeps asking to wait is
    dead-lettered as `retries_exhausted` in the end.
    """

    def __init__(self, message: str, *, min_delay: float = 0.0) -> None:
        super().__init__(message)
        self.min_delay = max(0.0, min_delay)
