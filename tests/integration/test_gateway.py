"""The gateway against a real broker: 202 only once the broker has the event."""

from __future__ import annotations

import gc
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import orjson
import pytest
from sqlalchemy import select

from contracts.envelope import Envelope
from contracts.events import EVENT_ADAPTER, DatasetSubmitted
from contracts.topology import work_queue
from services.gateway import broker as broker_module
from services.gateway import routes as routes_module
from services.gateway.tracking import events
from services.messaging import publisher as publisher_module
from services.messaging.logs import Throttle
from tests.conftest import Namespace
from tests.integration.conftest import gateway_client, gateway_settings
from tests.support.polling import eventually
from tests.support.queues import assert_empty, take, unbind_everyone
from tests.support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.broker

NOTIFICATION: dict[str, Any] = {
    "type": "notification.requested",
    "data": {"recipient": "r@example.org", "subject": "hi"},
}
DATASET = {"type": "dataset.submitted", "data": {"records": [{"a": 1}, {"a": 2}]}}


async def test_an_accepted_event_is_already_in_its_queue(
    client: httpx.AsyncClient, namespace: Namespace
) -> None:
    response = await client.post("/v1/events", json=DATASET)
    assert response.status_code == 202
    body = response.json()
    assert response.headers["location"] == body["status_url"] == f"/v1/events/{body['id']}"
    assert body["type"] == "dataset.submitted"
    [message] = await take(
        namespace.amqp_url, work_queue(namespace.name, "processor"), 1, timeout=2
    )
    event = EVENT_ADAPTER.validate_json(message.body)
    assert isinstance(event, DatasetSubmitted) and event.id == body["id"]
    assert message.delivery_mode == 2  # persistent
    assert message.message_id == body["id"] and message.type == "dataset.submitted"


async def test_each_consuming_service_gets_its_own_copy(
    client: httpx.AsyncClient, namespace: Namespace
) -> None:
    response = await client.post("/v1/events", json=NOTIFICATION)
    assert response.status_code == 202
    await take(namespace.amqp_url, work_queue(namespace.name, "notifier"), 1, timeout=2)
    await assert_empty(namespace.amqp_url, [work_queue(namespace.name, "processor")])


async def test_structured_mode_cloudevent_is_accepted(
    client: httpx.AsyncClient, namespace: Namespace
) -> None:
    event = {"specversion": "1.0", "id": "ce-1", "source": "urn:test", **NOTIFICATION}
    response = await client.post(
        "/v1/events",
        content=orjson.dumps(event),
        headers={"content-type": "application/cloudevents+json"},
    )
    assert response.status_code == 202 and response.json()["id"] == "ce-1"
    [message] = await take(namespace.amqp_url, work_queue(namespace.name, "notifier"), 1, timeout=2)
    assert orjson.loads(message.body)["source"] == "urn:test"


async def test_binary_mode_cloudevent_is_accepted(
    client: httpx.AsyncClient, namespace: Namespace
) -> None:
    headers = {
        "content-type": "application/json",
        "ce-specversion": "1.0",
        "ce-type": "notification.requested",
        "ce-id": "bin-1",
        "ce-source": "urn:test",
    }
    response = await client.post(
        "/v1/events", content=orjson.dumps(NOTIFICATION["data"]), headers=headers
    )
    assert response.status_code == 202 and response.json()["id"] == "bin-1"
    await take(namespace.amqp_url, work_queue(namespace.name, "notifier"), 1, timeout=2)


async def test_what_the_configured_channels_cannot_deliver_is_a_422_and_nothing_is_published(
    namespace: Namespace, tmp_path: Path
) -> None:
    # COURIER_NOTIFY_CHANNELS=log: an email notification, or a callback (a webhook), would
    # be taken and then dead-lettered by a notifier that has neither channel configured.
    email = {
        "type": "notification.requested",
        "data": {"channel": "email", "recipient": "ops@example.org", "subject": "s"},
    }
    called_back = {**DATASET, "callbackurl": "https://shop.example/hooks/courier"}
    settings = gateway_settings(namespace, tmp_path, notify_channels=("log",))
    async for client in gateway_client(settings):
        refused = await client.post("/v1/events", json=email)
        assert refused.status_code == 422, refused.text
        [problem] = refused.json()["detail"]
        assert problem["loc"] == ["notification.requested", "data", "channel"]
        assert "does not deliver on the 'email' channel" in problem["msg"]
        refused = await client.post("/v1/events/batch", json=[NOTIFICATION, called_back])
        assert refused.status_code == 422, refused.text
        assert refused.json()["detail"][0]["loc"] == [1, "dataset.submitted", "callbackurl"]
        accepted = await client.post("/v1/events", json=NOTIFICATION)  # on the log channel
        assert accepted.status_code == 202, accepted.text
    [taken] = await take(namespace.amqp_url, work_queue(namespace.name, "notifier"), 1, timeout=2)
    assert taken.message_id == accepted.json()["id"]
    await assert_empty(
        namespace.amqp_url,
        [work_queue(namespace.name, "notifier"), work_queue(namespace.name, "processor")],
    )


@pytest.mark.parametrize(
    ("sent", "read"),
    [
        (b"Z%C3%BCrich", "Zürich"),
        ("Zürich".encode(), "Zürich"),
        (b"caf\xe9", "café"),  # not percent-encoded, not UTF-8: read as Latin-1, as before
    ],
    ids=["percent-encoded", "raw UTF-8", "raw Latin-1"],
)
async def test_binary_mode_attributes_are_read_as_the_http_binding_encodes_them(
    client: httpx.AsyncClient, namespace: Namespace, sent: bytes, read: str
) -> None:
    # The binding percent-encodes what is not printable ASCII: it was published as sent.
    headers = {
        b"content-type": b"application/json",
        b"ce-specversion": b"1.0",
        b"ce-type": b"notification.requested",
        b"ce-source": b"urn:test",
        b"ce-subject": sent,
    }
    response = await client.post(
        "/v1/events", content=orjson.dumps(NOTIFICATION["data"]), headers=headers
    )
    assert response.status_code == 202, response.text
    [message] = await take(namespace.amqp_url, work_queue(namespace.name, "notifier"), 1)
    assert orjson.loads(message.body)["subject"] == read


async def test_a_binary_mode_attribute_that_is_not_utf8_is_a_400(
    client: httpx.AsyncClient,
) -> None:
    headers = {
        "content-type": "application/json",
        "ce-specversion": "1.0",
        "ce-type": "notification.requested",
        "ce-source": "urn:test",
        "ce-subject": "caf%E9",  # Latin-1, percent-encoded
    }
    response = await client.post(
        "/v1/events", content=orjson.dumps(NOTIFICATION["data"]), headers=headers
    )
    assert response.status_code == 400 and "ce-subject" in response.text


async def test_a_long_non_ascii_correlation_header_is_cut_to_what_an_id_holds(
    client: httpx.AsyncClient, namespace: Namespace
) -> None:
    # 128 characters of two bytes each: an ASCII one was cut, this one refused (422).
    response = await client.post(
        "/v1/events", json=NOTIFICATION, headers={b"x-correlation-id": b"\xe9" * 200}
    )
    assert response.status_code == 202, response.text
    [message] = await take(namespace.amqp_url, work_queue(namespace.name, "notifier"), 1)
    assert message.correlation_id == "é" * 127


async def test_a_batch_is_published_whole(client: httpx.AsyncClient, namespace: Namespace) -> None:
    response = await client.post("/v1/events/batch", json=[NOTIFICATION, DATASET, NOTIFICATION])
    assert response.status_code == 202
    ids = [e["id"] for e in response.json()["events"]]
    assert len(set(ids)) == 3
    notified = await take(namespace.amqp_url, work_queue(namespace.name, "notifier"), 2, timeout=2)
    assert {m.message_id for m in notified} == {ids[0], ids[2]}


async def test_a_batch_with_one_bad_event_publishes_nothing(
    client: httpx.AsyncClient, namespace: Namespace
) -> None:
    bad = {"type": "notification.requested", "data": {"recipient": "r"}}
    response = await client.post("/v1/events/batch", json=[NOTIFICATION, bad])
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"][0] == 1
    await assert_empty(namespace.amqp_url, [work_queue(namespace.name, "notifier")])


@pytest.mark.parametrize(
    ("content", "content_type", "status"),
    [
        (b"{oops", "application/json", 400),
        (b'{"type": "invoice.paid", "data": {}}', "application/json", 422),
        (b'{"data": {"recipient": "r", "subject": "s"}}', "application/json", 422),
        (b'{"type": "notification.requested", "data": {"subject": "s"}}', "application/json", 422),
        (
            b'{"type": "notification.requested", "data": {"recipient": ["r"], "subject": "s"}}',
            "application/json",
            422,
        ),
        (orjson.dumps(NOTIFICATION), "text/plain", 415),
        (
            orjson.dumps({**NOTIFICATION, "data": {**NOTIFICATION["data"], "body": "x" * 5000}}),
            "application/json",
            413,
        ),
    ],
    ids=[
        "malformed",
        "unknown-type",
        "missing-type",
        "missing-field",
        "wrong-type",
        "content-type",
        "too-large",
    ],
)
async def test_bad_input_gets_a_clear_4xx_and_publishes_nothing(
    client: httpx.AsyncClient, namespace: Namespace, content: bytes, content_type: str, status: int
) -> None:
    response = await client.post(
        "/v1/events", content=content, headers={"content-type": content_type}
    )
    assert response.status_code == status
    assert response.json()["detail"]
    await assert_empty(
        namespace.amqp_url, [work_queue(namespace.name, s) for s in ("notifier", "processor")]
    )


async def test_a_chunked_body_over_the_limit_is_refused(client: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b" " * 1000

    response = await client.post(
        "/v1/events", content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413


async def test_a_batch_over_the_configured_size_is_refused(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/events/batch", json=[NOTIFICATION] * 6)
    assert response.status_code == 413


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_broker_unreachable_is_503_with_retry_after(
    namespace: Namespace, tmp_path: Path
) -> None:
    settings = gateway_settings(
        namespace, tmp_path, amqp_url=f"amqp://guest:guest@127.0.0.1:{_closed_port()}/"
    )
    async for client in gateway_client(settings, wait_ready=False):
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/readyz")).status_code == 503
        response = await client.post("/v1/events", json=NOTIFICATION)
        assert response.status_code == 503
        assert response.headers["retry-after"] == str(settings.retry_after_seconds)
        batch = await client.post("/v1/events/batch", json=[NOTIFICATION])
        assert batch.status_code == 503


async def test_a_steady_broker_outage_is_not_a_log_line_per_refused_event(
    namespace: Namespace,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each client has its 503; at hundreds of events a second, a WARNING each buried the
    rest of the log for as long as the outage lasted. One line, then one per stretch."""
    monkeypatch.setattr(routes_module, "_refusals_logged", Throttle(), raising=False)
    settings = gateway_settings(
        namespace, tmp_path, amqp_url=f"amqp://guest:guest@127.0.0.1:{_closed_port()}/"
    )
    async for client in gateway_client(settings, wait_ready=False):
        for _ in range(30):
            assert (await client.post("/v1/events", json=NOTIFICATION)).status_code == 503
    lines = [r for r in caplog.records if r.getMessage() == "broker did not take the event"]
    assert len(lines) == 1


async def test_a_letter_the_broker_dead_lettered_is_logged_naming_its_event(
    client: httpx.AsyncClient, namespace: Namespace, caplog: pytest.LogCaptureFixture
) -> None:
    """A consumer logs each dead letter it makes; one the broker made (a message that kept
    killing its consumer until the delivery limit, a reject) was stored and shown in its status
    without a line in any service's log."""
    response = await client.post(
        "/v1/events", json=DATASET, headers={"X-Correlation-ID": "corr-poison"}
    )
    dataset_id = response.json()["id"]
    connection = await aio_pika.connect(namespace.amqp_url)
    async with connection:  # the broker dead-letters it, no Courier consumer
        channel = await connection.channel()
        queue = await channel.get_queue(work_queue(namespace.name, "processor"))
        message = await queue.get(timeout=5)
        await message.reject(requeue=False)

    async def said() -> None:
        lines = [r for r in caplog.records if getattr(r, "event_id", None) == dataset_id]
        assert len(lines) == 1, lines
        [line] = lines
        assert line.levelno >= logging.WARNING
        assert (line.correlation_id, line.reason) == ("corr-poison", "rejected")  # type: ignore[attr-defined]
        assert "dead-lettered" in line.getMessage()

    await eventually(said, timeout=15)


async def test_an_unroutable_event_is_a_500_naming_its_type(
    client: httpx.AsyncClient, namespace: Namespace
) -> None:
    await unbind_everyone(namespace.amqp_url, namespace.settings(), "dataset.submitted")
    response = await client.post("/v1/events", json=DATASET)
    assert response.status_code == 500
    assert "dataset.submitted" in response.json()["detail"]


async def test_a_batch_with_an_event_amqp_cannot_carry_is_a_500_publishing_the_others(
    client: httpx.AsyncClient, namespace: Namespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The contract is meant to admit only what AMQP carries; where it would not (a bug),
    # that event fails alone and the gateway says which.
    def properties(event: Envelope, headers: Any = None) -> Any:
        built = event_properties(event, headers)
        if event.id == "d-1":
            built.correlation_id = "c" * 256  # over a short string's 255 bytes
        return built

    event_properties = publisher_module.event_properties
    monkeypatch.setattr(publisher_module, "event_properties", properties)
    batch = [{**NOTIFICATION, "id": "n-1"}, {**DATASET, "id": "d-1"}, {**NOTIFICATION, "id": "n-2"}]
    response = await client.post("/v1/events/batch", json=batch)
    assert response.status_code == 500
    body = response.json()
    assert body["published"] == ["n-1", "n-2"] and body["failed"] == ["d-1"]
    assert body["unconfirmed"] == [] and "d-1" in body["detail"]
    notified = await take(namespace.amqp_url, work_queue(namespace.name, "notifier"), 2, timeout=2)
    assert [m.message_id for m in notified] == ["n-1", "n-2"]


async def test_a_batch_with_an_unroutable_event_says_which_events_were_published(
    client: httpx.AsyncClient, namespace: Namespace
) -> None:
    await unbind_everyone(namespace.amqp_url, namespace.settings(), "dataset.submitted")
    batch = [{**NOTIFICATION, "id": "n-1"}, {**DATASET, "id": "d-1"}, {**NOTIFICATION, "id": "n-2"}]
    response = await client.post("/v1/events/batch", json=batch)
    assert response.status_code == 500
    body = response.json()
    assert body["published"] == ["n-1", "n-2"] and body["failed"] == ["d-1"]
    assert body["unconfirmed"] == []  # returned: the broker does not have it
    assert "dataset.submitted" in body["detail"]
    notified = await take(namespace.amqp_url, work_queue(namespace.name, "notifier"), 2, timeout=2)
    assert [m.message_id for m in notified] == ["n-1", "n-2"]

    async def published_ones_accepted() -> None:
        for event_id in ("n-1", "n-2"):
            status = await client.get(f"/v1/events/{event_id}")
            assert status.status_code == 200 and status.json()["accepted_at"], status.text

    await eventually(published_ones_accepted, timeout=5)


async def test_a_running_gateway_keeps_its_start_up_heap_out_of_the_collectors_way(
    namespace: Namespace, tmp_path: Path
) -> None:
    async for client in gateway_client(gateway_settings(namespace, tmp_path)):
        assert (await client.get("/readyz")).status_code == 200
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0  # handed back to the collector at shutdown


async def test_openapi_shows_every_event_schema(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    components = schema["components"]["schemas"]
    for model in ("NotificationRequested", "DatasetSubmitted", "DatasetProcessed", "IngestEvent"):
        assert model in components
    body = schema["paths"]["/v1/events"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "application/cloudevents+json"}


async def test_openapi_documents_the_503_of_every_read_the_store_answers(
    client: httpx.AsyncClient,
) -> None:
    # A read while the store is away is a 503 with Retry-After, which clients generated from
    # the document did not expect.
    paths = (await client.get("/openapi.json")).json()["paths"]
    for path in (
        "/v1/events/{event_id}",
        "/v1/datasets/{dataset_id}",
        "/v1/files/{file_id}",
        "/v1/files/{file_id}/content",
    ):
        assert "503" in paths[path]["get"]["responses"], path


# --- readiness says what is true ----------------------------------------------------------------


async def replace_with_a_classic_queue(namespace: Namespace, name: str) -> None:
    """The queue, declared anew with other arguments than Courier's (an operator's mistake)."""
    connection = await aio_pika.connect(namespace.amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(name)
        await channel.declare_queue(name, durable=True)


async def delete_queue(namespace: Namespace, name: str) -> None:
    connection = await aio_pika.connect(namespace.amqp_url)
    async with connection:
        await (await connection.channel()).queue_delete(name)


async def test_a_topology_mismatch_at_start_up_is_ready_once_the_queue_is_fixed(
    namespace: Namespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(broker_module, "RELINK_SECONDS", 0.2)
    settings = gateway_settings(namespace, tmp_path)
    notifier = work_queue(namespace.name, "notifier")
    await replace_with_a_classic_queue(namespace, notifier)
    async for client in gateway_client(settings, wait_ready=False):

        async def mismatch_reported(client: httpx.AsyncClient = client) -> None:
            answer = await client.get("/readyz")
            assert answer.status_code == 503, answer.text
            assert notifier in answer.json().get("topology_error", ""), answer.text

        await eventually(mismatch_reported, timeout=10)
        await delete_queue(namespace, notifier)  # the operator fixes it

        async def ready(client: httpx.AsyncClient = client) -> None:
            answer = await client.get("/readyz")
            assert answer.status_code == 200 and "topology_error" not in answer.json()

        await eventually(ready, timeout=10)


async def test_after_a_reconnect_the_gateway_is_not_ready_until_its_topology_is_declared(
    namespace: Namespace, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = work_queue(namespace.name, "notifier")
    async with TcpProxy("127.0.0.1", 5672) as proxy:
        settings = gateway_settings(
            namespace, tmp_path, amqp_url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
        )
        async for client in gateway_client(settings):
            await replace_with_a_classic_queue(namespace, notifier)
            proxy.reset_all()  # the gateway reconnects and declares again: a mismatch

            async def redeclare_refused() -> None:
                assert any("after a reconnect failed" in r.message for r in caplog.records)

            await eventually(redeclare_refused, timeout=15)
            assert (await client.get("/readyz")).status_code == 503  # connected, yet not ready
            await delete_queue(namespace, notifier)  # fixed: the next try declares it

            async def ready(client: httpx.AsyncClient = client) -> None:
                assert (await client.get("/readyz")).status_code == 200

            await eventually(ready, timeout=15)


@pytest.mark.parametrize("event_id", ["заказ-1", "order?id=1", "a/b", "50%", "x#1", "a b"])
async def test_the_status_url_of_an_accepted_event_leads_to_its_status(
    client: httpx.AsyncClient, event_id: str
) -> None:
    # Ids are any text but control characters: pasted into the URL unescaped, a non-Latin-1
    # one failed the `Location` header after the broker had the event (a 500), and `?`, `#`
    # or `/` led to another event's status or to none.
    await client.post("/v1/events", json={**DATASET, "id": "order"})  # another event
    response = await client.post("/v1/events", json={**DATASET, "id": event_id})
    assert response.status_code == 202, response.text
    location = response.headers["location"]
    assert location == response.json()["status_url"] and location.isascii()
    found = await client.get(location)
    assert found.status_code == 200 and found.json()["id"] == event_id
    result = await client.get(found.json()["result_url"])
    assert result.status_code == 202 and result.json()["id"] == event_id  # not processed yet


async def test_a_dead_lettered_dataset_has_no_summary_to_wait_for(
    client: httpx.AsyncClient, namespace: Namespace
) -> None:
    # Answered 202 "not processed yet" for ever: a client polling while it gets 202 never
    # learnt that its dataset had failed.
    response = await client.post("/v1/events", json=DATASET)
    dataset_id = response.json()["id"]
    connection = await aio_pika.connect(namespace.amqp_url)
    async with connection:  # the processor refuses it: the broker dead-letters it
        channel = await connection.channel()
        queue = await channel.get_queue(work_queue(namespace.name, "processor"))
        message = await queue.get(timeout=5)
        await message.reject(requeue=False)

    async def ended() -> httpx.Response:
        result = await client.get(f"/v1/datasets/{dataset_id}")
        assert result.status_code != 202, result.text
        return result

    result = await eventually(ended)
    assert result.status_code == 409
    assert result.json()["services"]["processor"]["state"] == "dead_lettered"
    # The event's status as `GET /v1/events/{id}` shows it (times ended `+00:00` here, `Z` there).
    status = (await client.get(f"/v1/events/{dataset_id}")).json()
    assert result.json() == {key: value for key, value in status.items() if key != "result_url"}


async def test_an_event_whose_id_holds_a_slash_can_be_cancelled(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post("/v1/events", json={**DATASET, "id": "orders/7"})
    cancelled = await client.post(f"{response.headers['location']}:cancel")
    assert cancelled.status_code == 202 and cancelled.json()["id"] == "orders/7"


@pytest.mark.parametrize(
    "path", ["/v1/events/a%00b", "/v1/datasets/a%00b", "/v1/files/a%00b", "/v1/files/a%00b/content"]
)
async def test_a_path_that_cannot_hold_an_id_is_a_404_on_either_store(
    namespace: Namespace, tmp_path: Path, postgres_database: str, path: str
) -> None:
    # PostgreSQL refuses a NUL in text: the query failed, a 500.
    for database_url in (None, postgres_database):
        settings = gateway_settings(namespace, tmp_path, database_url=database_url)
        async for client in gateway_client(settings):
            assert (await client.get(path)).status_code == 404
            if path.startswith("/v1/events/"):
                assert (await client.delete(path)).status_code == 404


async def test_an_event_dated_before_1970_is_published_without_an_amqp_timestamp(
    client: httpx.AsyncClient, namespace: Namespace
) -> None:
    # AMQP's timestamp is unsigned seconds since 1970: framing it failed the publish (a 500).
    response = await client.post("/v1/events", json={**DATASET, "time": "1969-07-20T20:17:40Z"})
    assert response.status_code == 202, response.text
    [message] = await take(namespace.amqp_url, work_queue(namespace.name, "processor"), 1)
    assert message.timestamp is None
    assert orjson.loads(message.body)["time"].startswith("1969-07-20T20:17:40")


WITH_CALLBACK = {**DATASET, "callback_url": "https://a.example/hook"}


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
async def test_an_event_refused_with_a_callback_url_stays_unknown(
    namespace: Namespace, tmp_path: Path, request: pytest.FixtureRequest, database: str
) -> None:
    # Its callback URL is noted before the publish; the refused event looked known until
    # retention: its status a 200, its dataset "not processed yet", a cancel published. The
    # note stays: an earlier attempt with the same id may be in the broker (a 503 "may have
    # been accepted"), and its callback needs the URL.
    settings = gateway_settings(
        namespace,
        tmp_path,
        amqp_url=f"amqp://guest:guest@127.0.0.1:{_closed_port()}/",
        database_url=request.getfixturevalue("postgres_database") if database != "sqlite" else None,
    )
    apps: list[Any] = []
    async for client in gateway_client(settings, wait_ready=False, started=apps.append):
        refused = await client.post("/v1/events", json={**WITH_CALLBACK, "id": "never"})
        assert refused.status_code == 503
        async with apps[0].state.tracking._engine.connect() as conn:
            query = select(events.c.callback_url).where(events.c.event_id == "never")
            assert (await conn.execute(query)).scalar_one() == WITH_CALLBACK["callback_url"]
        assert (await client.get("/v1/events/never")).status_code == 404
        assert (await client.get("/v1/datasets/never")).status_code == 404
        assert (await client.delete("/v1/events/never")).status_code == 404


async def stored_callback_url(client: httpx.AsyncClient, app_tracking: Any, event_id: str) -> Any:
    assert (await client.get(f"/v1/events/{event_id}")).status_code == 200  # flushes accepts
    async with app_tracking._engine.connect() as conn:
        return (
            await conn.execute(select(events.c.callback_url).where(events.c.event_id == event_id))
        ).scalar_one()


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
@pytest.mark.parametrize("resent_with", ["https://b.example/hook", None])
async def test_the_accepted_attempts_callback_url_is_the_one_kept(
    namespace: Namespace,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    database: str,
    resent_with: str | None,
) -> None:
    # A URL noted for an attempt that was never confirmed (the gateway died before the
    # publish) won on SQLite over the URL of the attempt accepted later.
    postgres = request.getfixturevalue("postgres_database") if database != "sqlite" else None
    settings = gateway_settings(namespace, tmp_path, database_url=postgres)
    apps: list[Any] = []
    async for client in gateway_client(settings, started=apps.append):
        tracking = apps[0].state.tracking
        noted = EVENT_ADAPTER.validate_python({**WITH_CALLBACK, "id": "again"})
        await tracking.note_callbacks([noted])  # its publish then never happened
        resent = {**DATASET, "id": "again"} | ({"callback_url": resent_with} if resent_with else {})
        assert (await client.post("/v1/events", json=resent)).status_code == 202
        assert await stored_callback_url(client, tracking, "again") == resent_with


@pytest.mark.parametrize(
    ("method", "path", "to"),
    [
        ("POST", "/v1/events/", "/v1/events"),
        ("POST", "/v1/events/batch/", "/v1/events/batch"),
        ("GET", "/v1/events/abc/", "/v1/events/abc"),
        ("DELETE", "/v1/events/abc/", "/v1/events/abc"),
        ("GET", "/v1/datasets/abc/", "/v1/datasets/abc"),
    ],
)
async def test_a_trailing_slash_redirects(
    client: httpx.AsyncClient, method: str, path: str, to: str
) -> None:
    # Id routes that took the rest of the path took "" and "abc/" too: 405s and 404s.
    response = await client.request(method, path)
    assert response.status_code == 307 and response.headers["location"].endswith(to)
