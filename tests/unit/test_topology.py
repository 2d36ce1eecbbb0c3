"""Topology values: names derive from pure functions; arguments keep the promises."""

from __future__ import annotations

import pytest

from contracts.events import EVENT_MODELS, ResultsReportedData
from contracts.topology import (
    LANES,
    RESULT_TYPES,
    SUBSCRIPTIONS,
    WORKERS,
    Lane,
    ServiceTopology,
    dead_letter_queue,
    lane_queue,
    queue_for,
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
    assert lane_queue("courier", "processor", "files") == "courier.processor.files"
    assert retry_queue("courier", "processor", 30, "files") == "courier.processor.files.retry.30s"


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


def test_each_subscription_is_bound_to_one_queue_of_its_service() -> None:
    for service, types in SUBSCRIPTIONS.items():
        bindings = service_topology("ns", service).bindings()
        events = [b for b in bindings if b.exchange == "ns.events"]
        by_type = {t: [b.queue for b in events if b.routing_key == t] for t in types}
        assert by_type == {t: [queue_for("ns", service, t)] for t in types}


def test_files_wait_in_the_processors_files_lane_not_in_its_work_queue() -> None:
    topology = service_topology("ns", "processor")
    bound = {(b.queue, b.routing_key) for b in topology.bindings()}
    assert ("ns.processor.files", "file.uploaded") in bound
    assert ("ns.processor", "file.uploaded") not in bound
    assert ("ns.processor", "dataset.submitted") in bound


def test_a_lane_is_a_work_queue_of_its_own_with_its_own_delay_tiers() -> None:
    topology = service_topology("ns", "processor", retry_delays=(1, 7), delivery_limit=4)
    [files] = topology.lanes
    lane = topology.for_lane(files)
    specs = {spec.name: spec.arguments for spec in topology.queues()}
    # The same promises as the work queue: a delivery limit, lossless dead-lettering into
    # the service's one dead-letter queue.
    assert specs["ns.processor.files"] == {
        **topology.work_queue_spec().arguments,
        "x-dead-letter-routing-key": "ns.processor.dlq",
    }
    assert specs["ns.processor.files"]["x-delivery-limit"] == 4
    for delay in (1, 7):
        tier = specs[f"ns.processor.files.retry.{delay}s"]
        assert tier["x-message-ttl"] == delay * 1000
        assert tier["x-dead-letter-routing-key"] == "ns.processor.files"  # back to the lane
    assert (lane.queue, lane.retry_queue(7), lane.dead_letter_queue) == (
        "ns.processor.files",
        "ns.processor.files.retry.7s",
        "ns.processor.dlq",
    )
    assert lane.event_types == ("file.uploaded",)
    assert lane.control_queue is None  # cancellations come through the service's one


def test_a_queue_is_declared_once() -> None:
    for service in SUBSCRIPTIONS:
        names = [spec.name for spec in service_topology("ns", service).queues()]
        assert len(names) == len(set(names))


def test_unbinding_retired_or_moved_bindings_never_unbinds_a_current_one() -> None:
    # Else declaring with unbind_retired or unbind_moved would unbind what a service consumes.
    for service in SUBSCRIPTIONS:
        topology = service_topology("ns", service)
        stale = {*topology.retired_bindings(), *topology.moved_bindings()}
        assert not stale & set(topology.bindings())


def test_the_work_queues_binding_of_a_type_now_in_a_lane_is_moved() -> None:
    moved = service_topology("ns", "processor").moved_bindings()
    assert [(b.queue, b.routing_key) for b in moved] == [("ns.processor", "file.uploaded")]
    assert service_topology("ns", "notifier").moved_bindings() == ()


@pytest.mark.parametrize(
    ("event_type", "queue"),
    [
        ("dataset.submitted", "ns.processor"),
        ("file.uploaded", "ns.processor.files"),
        ("cancellation.requested", "ns.processor.control"),
    ],
)
def test_each_event_type_has_the_queue_its_service_takes_it_from(
    event_type: str, queue: str
) -> None:
    assert queue_for("ns", "processor", event_type) == queue


@pytest.mark.parametrize(
    "lanes",
    [
        (Lane("dlq", ("dataset.submitted",)),),
        (Lane("a", ("dataset.submitted",)), Lane("a", ("file.uploaded",))),
        (Lane("a", ("dataset.submitted",)), Lane("b", ("dataset.submitted",))),
        (Lane("a", ("notification.requested",)),),
    ],
)
def test_lanes_that_would_clash_are_refused(lanes: tuple[Lane, ...]) -> None:
    with pytest.raises(ValueError, match="lane"):
        ServiceTopology(
            namespace="ns",
            service="processor",
            event_types=("dataset.submitted", "file.uploaded"),
            lanes=lanes,
        )


def test_the_declared_lanes_hold_subscriptions_of_their_service() -> None:
    for service, lanes in LANES.items():  # a topology refuses any other
        assert service_topology("ns", service).lanes == lanes


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
    [
        "ns.processor",
        "ns.processor.dlq",
        "ns.processor.control",
        "ns.processor.retry.30s",
        "ns.processor.files",
        "ns.processor.files.retry.30s",
    ],
)
def test_every_queue_name_leads_back_to_its_service(queue: str) -> None:
    assert service_of_queue("ns", queue) == "processor"
