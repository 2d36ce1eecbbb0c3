"""Courier's exception hierarchy.

    CourierError
    ├── BrokerUnavailable      the broker did not take a publish: down, nack, or no confirm in time
    ├── Unroutable             the broker returned a mandatory publish: no queue bound (a bug)
    ├── TopologyMismatch       an existing queue was declared with other arguments
    └── PermanentError         raised by a handler: retrying cannot help; dead-letter at once

Any other exception a handler raises is transient: retried, then dead-lettered when exhausted.
"""

from __future__ import annotations


class CourierError(Exception):
    """Base of every error Courier raises on purpose."""


class BrokerUnavailable(CourierError):
    """The broker did not confirm a publish; the message may be retried later."""


class Unroutable(CourierError):
    """A mandatory publish was returned: nothing is bound for its routing key."""

    def __init__(self, exchange: str, routing_key: str) -> None:
        super().__init__(f"no queue bound on {exchange!r} for routing key {routing_key!r}")
        self.exchange = exchange
        self.routing_key = routing_key


class TopologyMismatch(CourierError):
    """A broker object exists with other arguments than this service declares."""


class PermanentError(CourierError):
    """Raised by a handler when the input can never succeed (bad data, refused by a target)."""
