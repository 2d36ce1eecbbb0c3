"""The broker topology, as values: every exchange, queue, binding and route Courier uses.

This is the only place that names broker objects. Names derive from pure functions of a
namespace (which isolates deployments and test runs) and a service name:

    <ns>.events                    topic exchange, routing key = event type
    <ns>.<service>                 the service's work queue (quorum), bound to its event types
    <ns>.<service>.<lane>          a lane: the event types of `LANES` the service takes apart
    <ns>.<service>.retry.<N>s      delay tier: queue-level TTL, dead-letters back to the work queue
    <ns>.<service>.<lane>.retry.<N>s   a lane's delay tier, back to the lane
    <ns>.<service>.dlq             dead letters of the service (quorum)
    <ns>.<service>.control         control requests (cancellations) ahead of the work backlog
    <ns>.dlx                       direct exchange the work queues dead-letter into

Declaring these values on a broker is `services.messaging.declare`'s job; nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Final, Literal

from contracts.events import EVENT_MODELS

ExchangeKind = Literal["topic", "direct"]

# Which service consumes which event types. Each service gets its own copy of each event.
SUBSCRIPTIONS: Final[dict[str, tuple[str, ...]]] = {
    "processor": ("dataset.submitted", "file.uploaded"),
    "notifier": (
        "notification.requested",
        "dataset.processed",
        "file.processed",
        "callback.requested",
    ),
    # The gateway keeps the status projection and the results it serves (`RESULT_TYPES`
    # reach it batched in `results.reported`).
    "gateway": ("status.reported", "results.reported", "file.processed"),
}

RESULT_TYPES: Final[frozenset[str]] = frozenset({"dataset.processed"})
"""Follow-up events the gateway keeps as results. A consumer that publishes one also reports it
in a `results.reported` batch, confirmed before it acknowledges the input: at a steady rate the
gateway takes a delivery per batch, not per result (each cost it ~0.3 ms of CPU)."""


@dataclass(frozen=True)
class Lane:
    """Event types a service takes from a queue of their own, at a prefetch of their own.

    Analysing a large file holds a handler (and a CPU worker) for minutes. In the work queue a
    burst of files would sit in the prefetch window, delivered, where the broker's
    `consumer_timeout` counts, and every quick event behind them would wait. In a lane, files
    beyond what the service works on at once wait in their queue, and the work queue flows.
    """

    name: str
    event_types: tuple[str, ...]


LANES: Final[dict[str, tuple[Lane, ...]]] = {
    "processor": (Lane("files", ("file.uploaded",)),),
}

RETIRED_BINDINGS: Final[dict[str, tuple[str, ...]]] = {
    # Before results were reported in batches, the gateway subscribed to each result.
    "gateway": ("dataset.processed",),
}
"""Event types a service subscribed to in an earlier version. Declaring with `unbind_retired`
(the gateway's `COURIER_UNBIND_RETIRED`, once no service of that version runs) removes them, so
an upgraded broker stops routing them there. (Types moved into a lane are `moved_bindings`.)"""

# Services that do the work and report status; each gets a control queue for cancellations.
WORKERS: Final[frozenset[str]] = frozenset({"processor", "notifier"})
CONTROL_EVENT_TYPES: Final[tuple[str, ...]] = ("cancellation.requested",)


def workers_of(event_type: str) -> tuple[str, ...]:
    """The services that will do work for an event of this type (what its status tracks)."""
    return tuple(s for s, types in SUBSCRIPTIONS.items() if s in WORKERS and event_type in types)


DEFAULT_RETRY_DELAYS: Final[tuple[int, ...]] = (5, 30, 120, 600)
DEFAULT_DELIVERY_LIMIT: Final = 5


def events_exchange(ns: str) -> str:
    return f"{ns}.events"


def dead_letter_exchange(ns: str) -> str:
    return f"{ns}.dlx"


def work_queue(ns: str, service: str) -> str:
    return f"{ns}.{service}"


def dead_letter_queue(ns: str, service: str) -> str:
    return f"{work_queue(ns, service)}.dlq"


def control_queue(ns: str, service: str) -> str:
    return f"{work_queue(ns, service)}.control"


def lane_queue(ns: str, service: str, lane: str) -> str:
    return f"{work_queue(ns, service)}.{lane}"


def retry_queue(ns: str, service: str, delay_seconds: int, lane: str | None = None) -> str:
    consumed = lane_queue(ns, service, lane) if lane else work_queue(ns, service)
    return f"{consumed}.retry.{delay_seconds}s"


def queue_for(ns: str, service: str, event_type: str) -> str:
    """The queue a service takes events of this type from (where a replay sends one back):
    a control request's control queue, a lane's queue, or else the work queue."""
    if event_type in CONTROL_EVENT_TYPES and service in WORKERS:
        return control_queue(ns, service)
    for lane in LANES.get(service, ()):
        if event_type in lane.event_types:
            return lane_queue(ns, service, lane.name)
    return work_queue(ns, service)


def service_of_queue(ns: str, queue: str) -> str:
    """The service a queue belongs to: the inverse of the name functions above (a service's
    name has no dot; every queue of it starts with `<ns>.<service>`)."""
    return queue.removeprefix(f"{ns}.").partition(".")[0]


_RESERVED_LANE_NAMES: Final = frozenset({"dlq", "control", "retry"})


@dataclass(frozen=True)
class ExchangeSpec:
    name: str
    kind: ExchangeKind
    durable: bool = True


@dataclass(frozen=True)
class QueueSpec:
    name: str
    arguments: dict[str, str | int] = field(default_factory=dict)
    durable: bool = True


@dataclass(frozen=True)
class BindingSpec:
    queue: str
    exchange: str
    routing_key: str


def _lossless_dead_lettering(exchange: str, routing_key: str) -> dict[str, str | int]:
    # at-least-once needs reject-publish too, or the broker silently falls back to at-most-once.
    return {
        "x-dead-letter-exchange": exchange,
        "x-dead-letter-routing-key": routing_key,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


@dataclass(frozen=True)
class ServiceTopology:
    """Everything one consuming service needs on the broker."""

    namespace: str
    service: str
    event_types: tuple[str, ...]
    control_event_types: tuple[str, ...] = ()
    retired_event_types: tuple[str, ...] = ()
    """Types the work queue was bound to by earlier versions (`RETIRED_BINDINGS`)."""
    retry_delays: tuple[int, ...] = DEFAULT_RETRY_DELAYS
    delivery_limit: int = DEFAULT_DELIVERY_LIMIT
    max_length: int | None = None
    lanes: tuple[Lane, ...] = ()
    """Event types (of `event_types`) taken from queues of their own (`LANES`)."""
    lane: str | None = None
    """Set on the view of one lane (`for_lane`): its queue and delay tiers are the lane's."""

    def __post_init__(self) -> None:
        unknown = set(self.event_types + self.control_event_types) - EVENT_MODELS.keys()
        if unknown:
            raise ValueError(f"unknown event types for {self.service}: {sorted(unknown)}")
        self._check_lanes()
        if any(d <= 0 for d in self.retry_delays) or list(self.retry_delays) != sorted(
            set(self.retry_delays)
        ):
            raise ValueError("retry delays must be positive, distinct and ascending")
        if self.delivery_limit < 1:
            raise ValueError("delivery limit must be at least 1")

    def _check_lanes(self) -> None:
        names = [lane.name for lane in self.lanes]
        if len(set(names)) != len(names) or any(
            not name.isidentifier() or name in _RESERVED_LANE_NAMES for name in names
        ):
            raise ValueError(f"lane names must be distinct identifiers, not reserved: {names}")
        laned = self.laned_types
        if len(set(laned)) != len(laned) or not set(laned) <= set(self.event_types):
            raise ValueError(
                f"each lane's event types must be the service's, in one lane only: {laned}"
            )

    @property
    def laned_types(self) -> tuple[str, ...]:
        """The event types taken from a lane, not from the work queue."""
        return tuple(t for lane in self.lanes for t in lane.event_types)

    def for_lane(self, lane: Lane) -> ServiceTopology:
        """What a consumer of `lane` works with: the lane's queue, its delay tiers (which expire
        back into the lane) and the service's dead-letter queue."""
        return replace(
            self,
            event_types=lane.event_types,
            control_event_types=(),
            retired_event_types=(),
            lanes=(),
            lane=lane.name,
        )

    @property
    def queue(self) -> str:
        if self.lane is not None:
            return lane_queue(self.namespace, self.service, self.lane)
        return work_queue(self.namespace, self.service)

    @property
    def dead_letter_queue(self) -> str:
        return dead_letter_queue(self.namespace, self.service)

    @property
    def events_exchange(self) -> str:
        return events_exchange(self.namespace)

    def retry_queue(self, delay_seconds: int) -> str:
        return retry_queue(self.namespace, self.service, delay_seconds, self.lane)

    @property
    def control_queue(self) -> str | None:
        return control_queue(self.namespace, self.service) if self.control_event_types else None

    def exchanges(self) -> tuple[ExchangeSpec, ...]:
        return (
            ExchangeSpec(events_exchange(self.namespace), "topic"),
            ExchangeSpec(dead_letter_exchange(self.namespace), "direct"),
        )

    def _consumed_queue_arguments(self) -> dict[str, str | int]:
        return {
            "x-queue-type": "quorum",
            # A message that crashes its consumer every time ends in the DLQ, not in a loop.
            "x-delivery-limit": self.delivery_limit,
            **_lossless_dead_lettering(
                dead_letter_exchange(self.namespace), self.dead_letter_queue
            ),
        }

    def work_queue_spec(self) -> QueueSpec:
        args = self._consumed_queue_arguments()
        if self.max_length is not None:
            args["x-max-length"] = self.max_length
        return QueueSpec(self.queue, args)

    def control_queue_spec(self) -> QueueSpec | None:
        name = self.control_queue
        return None if name is None else QueueSpec(name, self._consumed_queue_arguments())

    def dead_letter_queue_spec(self) -> QueueSpec:
        return QueueSpec(self.dead_letter_queue, {"x-queue-type": "quorum"})

    def retry_queue_specs(self) -> tuple[QueueSpec, ...]:
        # One queue per tier, so every message in a tier has the same TTL and none waits behind
        # a longer one; on expiry the default exchange routes it straight back to the work queue.
        return tuple(
            QueueSpec(
                self.retry_queue(delay),
                {
                    "x-queue-type": "quorum",
                    "x-message-ttl": delay * 1000,
                    **_lossless_dead_lettering("", self.queue),
                },
            )
            for delay in self.retry_delays
        )

    def queues(self) -> tuple[QueueSpec, ...]:
        control = self.control_queue_spec()
        lanes = [self.for_lane(lane) for lane in self.lanes]
        return (
            self.work_queue_spec(),
            *((control,) if control else ()),
            self.dead_letter_queue_spec(),
            *self.retry_queue_specs(),
            *(q for lane in lanes for q in (lane.work_queue_spec(), *lane.retry_queue_specs())),
        )

    def bindings(self) -> tuple[BindingSpec, ...]:
        events = events_exchange(self.namespace)
        dlx = dead_letter_exchange(self.namespace)
        laned = self.laned_types
        return (
            *(BindingSpec(self.queue, events, t) for t in self.event_types if t not in laned),
            *(
                BindingSpec(self.for_lane(lane).queue, events, t)
                for lane in self.lanes
                for t in lane.event_types
            ),
            *(
                BindingSpec(self.control_queue, events, t)
                for t in self.control_event_types
                if self.control_queue
            ),
            BindingSpec(self.dead_letter_queue, dlx, self.dead_letter_queue),
        )

    def retired_bindings(self) -> tuple[BindingSpec, ...]:
        """Bindings earlier versions made that this one no longer uses."""
        events = events_exchange(self.namespace)
        return tuple(BindingSpec(self.queue, events, t) for t in self.retired_event_types)

    def moved_bindings(self) -> tuple[BindingSpec, ...]:
        """The work queue's bindings of the types now in a lane, which earlier versions made.
        While one is left, such an event reaches both queues: the service removes them as it
        starts consuming its lanes (`declare_topology(unbind_moved=True)`)."""
        events = events_exchange(self.namespace)
        return tuple(BindingSpec(self.queue, events, t) for t in self.laned_types)


def service_topology(
    namespace: str,
    service: str,
    *,
    retry_delays: tuple[int, ...] = DEFAULT_RETRY_DELAYS,
    delivery_limit: int = DEFAULT_DELIVERY_LIMIT,
    max_length: int | None = None,
) -> ServiceTopology:
    return ServiceTopology(
        namespace=namespace,
        service=service,
        event_types=SUBSCRIPTIONS[service],
        control_event_types=CONTROL_EVENT_TYPES if service in WORKERS else (),
        retired_event_types=RETIRED_BINDINGS.get(service, ()),
        retry_delays=retry_delays,
        delivery_limit=delivery_limit,
        max_length=max_length,
        lanes=LANES.get(service, ()),
    )
