"""Topology values: names derive from pure functions; arguments keep the promises."""

from __future__ import annotations

import pytest

from contracts.events import EVENT_MODELS, ResultsReportedData
from contracts.topology import (
    RESULT_TYPES,
    RETIRED_BINDINGS,
    SUBSCRIPTIONS,
    WORKERS,
    ServiceTopology,
    dead_letter_queue,
    retry_queue,
    service_of_queue,
    service_topology,
    work_queue,
    workers_of,
)


def test_names_derive_from_namespace_and_service() -> None:
    assert work_queue("courier", "processor") == "courier.processor"
    assert dead_letter_queue("courier", "processor") == "courier.processor.dlq"
    assert retry_queue("courier", "processor", 30) == "courier.processor.retry.30s"


def test_work_queue_is_quorum_with_a_delivery_limit_and_lossless_dead_lettering() -> None:
    spec = service_topology("ns", "processor", delivery_limit=4).work_queue_spec()
    assert spec.durable
    assert spec.arguments == {
        "x-queue-type": "quorum",
        "x-delivery-limit": 4,
        "x-dead-letter-exchange": "ns.dlx",
        "x-dead-letter-routing-key": "ns.processor.dlq",
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",  # without it the broker silently falls back to at-most-once
    }


def test_each_delay_tier_expires_back_into_the_work_queue() -> None:
    topology = service_topology("ns", "notifier", retry_delays=(1, 7))
    tiers = {spec.name: spec.arguments for spec in topology.retry_queue_specs()}
    assert set(tiers) == {"ns.notifier.retry.1s", "ns.notifier.retry.7s"}
    for delay, args in zip((1, 7), tiers.values(), strict=True):
        assert args["x-message-ttl"] == delay * 1000
        assert args["x-dead-letter-exchange"] == ""
        assert args["x-dead-letter-routing-key"] == "ns.notifier"
        assert args["x-dead-letter-strategy"] == "at-least-once"


def test_work_queues_are_bound_to_their_subscriptions_only() -> None:
    for service, types in SUBSCRIPTIONS.items():
        bindings = service_topology("ns", service).bindings()
        bound = {b.routing_key for b in bindings if b.queue == f"ns.{service}"}
        assert bound == set(types)


def test_no_retired_binding_is_a_subscription_again() -> None:
    # Else declaring with unbind_retired would unbind what the service consumes.
    for service, retired in RETIRED_BINDINGS.items():
        assert not set(retired) & set(SUBSCRIPTIONS[service])


def test_a_results_report_can_hold_every_result_type() -> None:
    held = ResultsReportedData.model_fields["results"].annotation
    assert {EVENT_MODELS[t] for t in RESULT_TYPES} == {held.__args__[0]}  # type: ignore[union-attr]


def test_workers_get_cancellations_on_a_control_queue_ahead_of_their_backlog() -> None:
    for service in WORKERS:
        topology = service_topology("ns", service)
        assert topology.control_queue == f"ns.{service}.control"
        control = [b for b in topology.bindings() if b.queue == topology.control_queue]
        assert [(b.exchange, b.routing_key) for b in control] == [
            ("ns.events", "cancellation.requested")
        ]
        spec = topology.control_queue_spec()
        assert spec is not None
        assert spec.arguments["x-delivery-limit"] == topology.delivery_limit
    assert service_topology("ns", "gateway").control_queue is None


def test_status_is_tracked_for_the_workers_of_a_type() -> None:
    assert workers_of("dataset.processed") == ("notifier",)
    assert workers_of("file.processed") == ("notifier",)  # it announces files to their targets
    assert workers_of("status.reported") == ()


def test_dead_letter_queue_is_a_durable_quorum_queue() -> None:
    spec = service_topology("ns", "processor").dead_letter_queue_spec()
    assert spec.durable and spec.arguments["x-queue-type"] == "quorum"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"retry_delays": (30, 5)},
        {"retry_delays": (5, 5)},
        {"retry_delays": (0,)},
        {"delivery_limit": 0},
        {"event_types": ("order.placed",)},
    ],
)
def test_nonsense_topologies_are_refused(kwargs: dict[str, object]) -> None:
    base: dict[str, object] = {
        "namespace": "ns",
        "service": "x",
        "event_types": ("dataset.submitted",),
    }
    with pytest.raises(ValueError, match=r"retry|delivery|unknown"):
        ServiceTopology(**{**base, **kwargs})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "queue",
    ["ns.processor", "ns.processor.dlq", "ns.processor.control", "ns.processor.retry.30s"],
)
def test_every_queue_name_leads_back_to_its_service(queue: str) -> None:
    assert service_of_queue("ns", queue) == "processor"
