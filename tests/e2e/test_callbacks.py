"""End to end with real processes: an event submitted with a `callback_url` gets its final status
posted there once, signed, through the notifier's webhook channel; one without gets nothing.

gateway → broker → processor / notifier → status reports → gateway settles the event →
`callback.requested` → notifier → a real webhook receiver on 127.0.0.1 in the test process.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from services.notifier.signing import verify
from tests.conftest import Namespace
from tests.support.polling import eventually_sync
from tests.support.processes import ServiceProcess, base_url, consumer, gateway
from tests.support.webhook_receiver import Received, Reply, WebhookReceiver

pytestmark = [pytest.mark.e2e, pytest.mark.broker]

SECRET = "e2e-callback-signing-secret-0123456789abcdef"
AUTH = {"Authorization": "Bearer e2e-test-ops-token"}  # COURIER_OPS_TOKENS of `gateway()`


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver().running() as webhook:
        yield webhook


@pytest.fixture
def services(namespace: Namespace, tmp_path: Path) -> Iterator[tuple[ServiceProcess, ...]]:
    """Gateway, processor and notifier; the notifier has a webhook channel (allowed to reach the
    receiver on loopback) and no email channel, so an email notification is dead-lettered."""
    env = namespace.env(
        COURIER_NOTIFY_LOG=str(tmp_path / "notifications.jsonl"),
        COURIER_WEBHOOK_SECRET=SECRET,
        COURIER_WEBHOOK_ALLOWED_HOSTS="127.0.0.1",
    )
    running = (
        gateway(env, tmp_path),
        consumer("processor", env, tmp_path),
        consumer("notifier", env, tmp_path),
    )
    try:
        for service in running:
            service.start()
        for service in running:
            service.wait_ready()
        yield running
    finally:
        for service in running:
            service.kill()


def submit(gateway_process: ServiceProcess, event: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{base_url(gateway_process)}/v1/events", json=event, timeout=10)


def accepted(gateway_process: ServiceProcess, event: dict[str, Any]) -> str:
    response = submit(gateway_process, event)
    assert response.status_code == 202, response.text
    event_id: str = response.json()["id"]
    return event_id


def status(gateway_process: ServiceProcess, event_id: str) -> dict[str, Any]:
    response = httpx.get(f"{base_url(gateway_process)}/v1/events/{event_id}", timeout=10)
    assert response.status_code == 200, response.text
    found: dict[str, Any] = response.json()
    return found


def states(gateway_process: ServiceProcess, event_id: str) -> dict[str, str]:
    services = status(gateway_process, event_id)["services"]
    return {service: info["state"] for service, info in services.items()}


def signed_callback(request: Received) -> dict[str, Any]:
    """The callback's body, after checking that it is a signed `callback.requested`."""
    assert request.method == "POST"
    assert verify(
        request.headers["courier-signature"], request.body, SECRET.encode(), now=time.time()
    )
    body: dict[str, Any] = orjson.loads(request.body)
    assert body["type"] == "callback.requested"
    assert request.headers["idempotency-key"] == body["id"]
    return body


def posted_by_path(receiver: WebhookReceiver, count: int) -> dict[str, Received]:
    """The receiver's requests by path, once at least `count` arrived."""

    def arrived() -> dict[str, Received]:
        requests = receiver.received
        assert len(requests) >= count, requests
        return {request.path: request for request in requests}

    return eventually_sync(arrived, timeout=30)


def test_the_final_status_is_posted_to_the_callback_url_once(
    services: tuple[ServiceProcess, ...], receiver: WebhookReceiver
) -> None:
    gateway_process = services[0]
    refused = submit(
        gateway_process,
        {
            "type": "dataset.submitted",
            "callback_url": "ftp://shop.example/hook",
            "data": {"records": [{"a": 1}]},
        },
    )
    assert refused.status_code == 422, refused.text

    dataset_id = accepted(
        gateway_process,
        {
            "type": "dataset.submitted",
            "callback_url": receiver.url("/callbacks/dataset"),
            "data": {"name": "prices", "records": [{"price": 10}, {"price": 30}]},
        },
    )
    doomed_id = accepted(
        gateway_process,
        {
            "type": "notification.requested",
            "callbackurl": receiver.url("/callbacks/doomed"),
            "data": {"channel": "email", "recipient": "ops@example.org", "subject": "Deployed"},
        },
    )
    quiet_id = accepted(
        gateway_process, {"type": "dataset.submitted", "data": {"records": [{"price": 1}]}}
    )

    by_path = posted_by_path(receiver, 2)
    assert set(by_path) == {"/callbacks/dataset", "/callbacks/doomed"}

    succeeded = signed_callback(by_path["/callbacks/dataset"])
    assert succeeded["subject"] == dataset_id
    data = succeeded["data"]
    assert (data["event_id"], data["event_type"], data["outcome"]) == (
        dataset_id,
        "dataset.submitted",
        "succeeded",
    )
    assert data["callback_url"] == receiver.url("/callbacks/dataset")
    assert {s: info["state"] for s, info in data["services"].items()} == {"processor": "succeeded"}

    dead = signed_callback(by_path["/callbacks/doomed"])["data"]
    assert (dead["event_id"], dead["outcome"]) == (doomed_id, "dead_lettered")
    notifier = dead["services"]["notifier"]
    assert (notifier["state"], notifier["reason"]) == ("dead_lettered", "permanent")
    assert "email" in notifier["detail"] and "not configured" in notifier["detail"]

    # Once: the callbacks themselves are delivered (the notifier reported them), the event
    # without a callback URL is done too, and still nothing else arrived.
    callback_ids = [signed_callback(request)["id"] for request in by_path.values()]

    def all_done() -> None:
        for callback in callback_ids:
            assert states(gateway_process, callback) == {"notifier": "succeeded"}
        assert states(gateway_process, quiet_id) == {"processor": "succeeded"}
        # And each event's own status tells its callback's delivery.
        for event_id, outcome in ((dataset_id, "succeeded"), (doomed_id, "dead_lettered")):
            told = status(gateway_process, event_id)["callback"]
            assert (told["outcome"], told["state"]) == (outcome, "succeeded"), told
            assert told["id"] in callback_ids
        assert status(gateway_process, quiet_id)["callback"] is None

    eventually_sync(all_done, timeout=20)
    assert [service.terminate() for service in services] == [0, 0, 0]
    assert sorted(request.path for request in receiver.received) == [
        "/callbacks/dataset",
        "/callbacks/doomed",
    ]


def upload(gateway_process: ServiceProcess, content: bytes, callback_url: str) -> str:
    response = httpx.post(
        f"{base_url(gateway_process)}/v1/files",
        files={"file": ("prices.csv", content, "text/csv")},
        data={"callback_url": callback_url},
        timeout=10,
    )
    assert response.status_code == 202, response.text
    file_id: str = response.json()["id"]
    return file_id


def test_an_uploads_analysis_outcome_is_posted_to_its_callback_url(
    services: tuple[ServiceProcess, ...], receiver: WebhookReceiver
) -> None:
    gateway_process = services[0]
    analysed = upload(gateway_process, b"sku,price\na,10\n", receiver.url("/files/good"))
    broken = upload(gateway_process, b"a,b\n1,\xff\xfe\n", receiver.url("/files/broken"))

    by_path = posted_by_path(receiver, 2)
    assert set(by_path) == {"/files/good", "/files/broken"}

    good = signed_callback(by_path["/files/good"])["data"]
    assert (good["event_id"], good["event_type"], good["outcome"]) == (
        analysed,
        "file.uploaded",
        "succeeded",
    )
    dead = signed_callback(by_path["/files/broken"])["data"]
    assert (dead["event_id"], dead["outcome"]) == (broken, "dead_lettered")
    processor = dead["services"]["processor"]
    assert (processor["state"], processor["reason"]) == ("dead_lettered", "permanent")
    assert "not valid UTF-8 on line 2" in processor["detail"]


def test_a_replayed_dead_letter_that_succeeds_posts_a_second_callback(
    services: tuple[ServiceProcess, ...], receiver: WebhookReceiver
) -> None:
    """A webhook notification whose target refuses it (400: permanent) is dead-lettered, and the
    client hears so; an operator replays it, the target takes it, and the client hears that."""
    gateway_process = services[0]
    with WebhookReceiver(replies=[Reply(400, body=b"not yet")]).running() as target:
        event_id = accepted(
            gateway_process,
            {
                "type": "notification.requested",
                "callback_url": receiver.url("/callbacks/order-9"),
                "data": {"channel": "webhook", "recipient": target.url(), "subject": "Shipped"},
            },
        )

        def posted(count: int) -> list[dict[str, Any]]:
            requests = receiver.received
            assert len(requests) == count, requests
            return [signed_callback(request)["data"] for request in requests]

        [dead] = eventually_sync(lambda: posted(1), timeout=30)
        assert (dead["event_id"], dead["outcome"]) == (event_id, "dead_lettered")
        assert "400" in dead["services"]["notifier"]["detail"]

        def letter() -> str:
            response = httpx.get(
                f"{base_url(gateway_process)}/v1/ops/dead-letters",
                params={"service": "notifier"},
                headers=AUTH,
                timeout=10,
            )
            ids: list[str] = [
                i["id"] for i in response.json()["items"] if i["event_id"] == event_id
            ]
            assert len(ids) == 1, response.text
            return ids[0]

        replay = httpx.post(
            f"{base_url(gateway_process)}/v1/ops/replays",
            json={"ids": [eventually_sync(letter, timeout=10)]},
            headers=AUTH,
            timeout=10,
        )
        assert replay.status_code == 200 and replay.json()["count"] == 1, replay.text

        dead_again, succeeded = eventually_sync(lambda: posted(2), timeout=30)
        assert dead_again == dead
        assert (succeeded["event_id"], succeeded["outcome"]) == (event_id, "succeeded")
        assert succeeded["services"]["notifier"]["state"] == "succeeded"
        assert [r.path for r in target.received] == ["/hook", "/hook"]  # refused, then taken
