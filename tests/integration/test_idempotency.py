"""Idempotent ingest: `Idempotency-Key` on `POST /v1/events` and `POST /v1/events/batch`.

An in-process gateway on a real broker, its store on SQLite and on PostgreSQL; what was
published is counted in the work queue. Then `IdempotencyKeys` itself on both stores.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import aio_pika
import httpx
import orjson
import pytest
import pytest_asyncio
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

from contracts.events import EVENT_ADAPTER
from contracts.topology import work_queue
from services.gateway import idempotency
from services.gateway.idempotency import IdempotencyKeys, fingerprint
from services.messaging.store import open_store, store_url
from tests.conftest import Namespace
from tests.integration.conftest import gateway_client, gateway_settings
from tests.support.polling import eventually
from tests.support.queues import take
from tests.support.tcp_proxy import ProxyMode, TcpProxy

pytestmark = pytest.mark.asyncio(loop_scope="module")

NOTIFICATION: dict[str, Any] = {
    "type": "notification.requested",
    "data": {"recipient": "r@example.org", "subject": "hi"},
}
OTHER_NOTIFICATION: dict[str, Any] = {
    "type": "notification.requested",
    "data": {"recipient": "r@example.org", "subject": "another"},
}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str | None:
    """The gateway's store: None is the default SQLite file, else a PostgreSQL URL."""
    if request.param == "sqlite":
        return None
    url: str = request.getfixturevalue("module_database")
    return url


@asynccontextmanager
async def running_gateway(
    namespace: Namespace,
    data_dir: Path,
    database_url: str | None,
    *,
    wait_ready: bool = True,
    **overrides: Any,
) -> AsyncIterator[httpx.AsyncClient]:
    settings = gateway_settings(namespace, data_dir, database_url=database_url, **overrides)
    clients = cast(
        AsyncGenerator[httpx.AsyncClient, None], gateway_client(settings, wait_ready=wait_ready)
    )
    client = await anext(clients)
    try:
        yield client
    finally:
        await clients.aclose()


@pytest.fixture
def own_database_url(request: pytest.FixtureRequest, database_url: str | None) -> str | None:
    """A store of its own, as `database_url`'s kind, for a test's own gateway: a store serves
    one namespace, and the module's gateway has claimed the module's."""
    if database_url is None:
        return None
    url: str = request.getfixturevalue("postgres_database")
    return url


@dataclass
class Gateway:
    client: httpx.AsyncClient
    namespace: Namespace


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway(
    amqp_url: str, tmp_path_factory: pytest.TempPathFactory, database_url: str | None
) -> AsyncIterator[Gateway]:
    """One gateway per store for the tests that need nothing special (a gateway starts in about
    a second); each test drains what it published from the work queue (`queued`)."""
    namespace = Namespace(amqp_url)
    try:
        async with running_gateway(
            namespace, tmp_path_factory.mktemp("gateway"), database_url
        ) as client:
            yield Gateway(client, namespace)
    finally:
        await namespace.cleanup()


@pytest_asyncio.fixture(loop_scope="module")
async def client(gateway: Gateway) -> httpx.AsyncClient:
    await queued(gateway.namespace)  # whatever an earlier (failed) test left behind
    return gateway.client


@pytest.fixture
def shared_namespace(gateway: Gateway) -> Namespace:
    return gateway.namespace


def new_key() -> str:
    return f"key-{uuid.uuid4()}"


async def queued(namespace: Namespace, service: str = "notifier") -> list[str]:
    """The event ids waiting in the service's work queue (taken out, for counting)."""
    connection = await aio_pika.connect(namespace.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(work_queue(namespace.name, service), passive=True)
        count = queue.declaration_result.message_count or 0
    if not count:
        return []
    messages = await take(namespace.amqp_url, work_queue(namespace.name, service), count)
    return [EVENT_ADAPTER.validate_json(m.body).id for m in messages]


async def post(
    client: httpx.AsyncClient, body: Any, key: str | None, path: str = "/v1/events", **kw: Any
) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key is not None else {}
    return await client.post(path, json=body, headers={**headers, **kw.pop("headers", {})}, **kw)


# --- HTTP -----------------------------------------------------------------------------------


@pytest.mark.broker
async def test_the_same_key_and_body_returns_the_first_response_and_publishes_nothing(
    client: httpx.AsyncClient, shared_namespace: Namespace
) -> None:
    key = new_key()
    first = await post(client, NOTIFICATION, key)
    assert first.status_code == 202, first.text
    assert "idempotent-replayed" not in first.headers
    event_id = first.json()["id"]
    for _ in range(2):
        again = await post(client, NOTIFICATION, key)
        assert again.status_code == 202
        assert again.json() == first.json()
        assert again.headers["idempotent-replayed"] == "true"
        assert again.headers["location"] == first.headers["location"] == f"/v1/events/{event_id}"
    assert await queued(shared_namespace) == [event_id]


STORE_FAILURES = [
    pytest.param(
        OperationalError("idempotency_keys", {}, Exception("disk I/O error")), id="sqlalchemy"
    ),
    # asyncpg's own, which SQLAlchemy passes through unwrapped (PostgreSQL refused, reset)
    pytest.param(ConnectionResetError(104, "Connection reset by peer"), id="reset"),
    pytest.param(ConnectionRefusedError(111, "Connect call failed"), id="refused"),
]


@pytest.mark.parametrize("failure", STORE_FAILURES)
async def test_a_published_event_is_answered_202_when_its_key_cannot_be_recorded(
    client: httpx.AsyncClient,
    shared_namespace: Namespace,
    monkeypatch: pytest.MonkeyPatch,
    failure: Exception,
) -> None:
    """The broker has the event: a failing key store must not turn that into an error."""

    async def store_fails(*_: object) -> None:
        raise failure

    monkeypatch.setattr(IdempotencyKeys, "complete", store_fails)
    answered = await post(client, NOTIFICATION, new_key())
    assert answered.status_code == 202, answered.text
    assert await queued(shared_namespace) == [answered.json()["id"]]


@pytest.mark.parametrize("failure", STORE_FAILURES)
async def test_a_key_store_that_fails_before_the_publish_is_a_503_that_publishes_nothing(
    client: httpx.AsyncClient,
    shared_namespace: Namespace,
    monkeypatch: pytest.MonkeyPatch,
    failure: Exception,
) -> None:
    async def store_fails(*_: object) -> None:
        raise failure

    monkeypatch.setattr(IdempotencyKeys, "claim", store_fails)
    answered = await post(client, NOTIFICATION, new_key())
    assert answered.status_code == 503, answered.text
    assert answered.headers["retry-after"].isdigit()
    assert await queued(shared_namespace) == []


@pytest.mark.broker
async def test_a_batch_with_the_same_key_and_body_is_published_once(
    client: httpx.AsyncClient, shared_namespace: Namespace
) -> None:
    key = new_key()
    batch = [NOTIFICATION, OTHER_NOTIFICATION]
    first = await post(client, batch, key, "/v1/events/batch")
    assert first.status_code == 202, first.text
    ids = [event["id"] for event in first.json()["events"]]
    again = await post(client, batch, key, "/v1/events/batch")
    assert again.status_code == 202
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    assert sorted(await queued(shared_namespace)) == sorted(ids)


@pytest.mark.broker
async def test_the_same_key_with_another_body_is_a_conflict(
    client: httpx.AsyncClient, shared_namespace: Namespace
) -> None:
    key = new_key()
    first = await post(client, NOTIFICATION, key)
    assert first.status_code == 202
    conflict = await post(client, OTHER_NOTIFICATION, key)
    assert conflict.status_code == 409, conflict.text
    assert "different request" in conflict.json()["detail"]
    on_batch = await post(client, [NOTIFICATION], key, "/v1/events/batch")
    assert on_batch.status_code == 409, on_batch.text
    assert await queued(shared_namespace) == [first.json()["id"]]


@pytest.mark.broker
async def test_binary_mode_events_that_differ_only_in_headers_are_a_conflict(
    client: httpx.AsyncClient, shared_namespace: Namespace
) -> None:
    """In binary mode the event's attributes are headers: `ce-id` 'a' and `ce-id` 'b' with the
    same data are different events, so one key cannot stand for both."""
    key = new_key()
    data = orjson.dumps(NOTIFICATION["data"])

    async def send(event_id: str) -> httpx.Response:
        return await client.post(
            "/v1/events",
            content=data,
            headers={
                "content-type": "application/json",
                "ce-specversion": "1.0",
                "ce-type": "notification.requested",
                "ce-source": "urn:test",
                "ce-id": event_id,
                "Idempotency-Key": key,
            },
        )

    first_id, second_id = f"a-{uuid.uuid4()}", f"b-{uuid.uuid4()}"
    assert (await send(first_id)).status_code == 202
    assert (await send(first_id)).headers.get("idempotent-replayed") == "true"
    second = await send(second_id)
    assert second.status_code == 409, (second.status_code, second.text)
    assert await queued(shared_namespace) == [first_id]


@pytest.mark.broker
async def test_concurrent_requests_with_one_key_publish_once(
    client: httpx.AsyncClient, shared_namespace: Namespace
) -> None:
    key = new_key()
    responses = await asyncio.gather(*(post(client, NOTIFICATION, key) for _ in range(20)))
    assert [r.status_code for r in responses] == [202] * 20, [r.text for r in responses]
    ids = {r.json()["id"] for r in responses}
    assert len(ids) == 1
    replayed = [r for r in responses if r.headers.get("idempotent-replayed") == "true"]
    assert len(replayed) == 19
    assert await queued(shared_namespace) == list(ids)


@pytest.mark.broker
async def test_a_request_refused_for_a_bad_event_does_not_use_up_the_key(
    client: httpx.AsyncClient, shared_namespace: Namespace
) -> None:
    key = new_key()
    bad = await post(client, {"type": "notification.requested", "data": {}}, key)
    assert bad.status_code == 422
    good = await post(client, NOTIFICATION, key)
    assert good.status_code == 202 and "idempotent-replayed" not in good.headers
    assert await queued(shared_namespace) == [good.json()["id"]]


@pytest.mark.broker
async def test_a_key_longer_than_allowed_is_refused(
    client: httpx.AsyncClient, shared_namespace: Namespace
) -> None:
    response = await post(client, NOTIFICATION, "k" * (idempotency.MAX_KEY_LENGTH + 1))
    assert response.status_code == 400
    assert await queued(shared_namespace) == []


@pytest.mark.broker
async def test_different_keys_are_different_requests(
    client: httpx.AsyncClient, shared_namespace: Namespace
) -> None:
    first = await post(client, NOTIFICATION, new_key())
    second = await post(client, NOTIFICATION, new_key())
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] != second.json()["id"]
    assert sorted(await queued(shared_namespace)) == sorted(
        [first.json()["id"], second.json()["id"]]
    )


async def stored_event_ids(data_dir: Path, database_url: str | None, key: str) -> list[str]:
    engine = open_store(store_url(database_url, data_dir, "gateway"))
    try:
        async with engine.connect() as conn:
            ids = await conn.scalar(
                select(idempotency.keys.c.event_ids).where(idempotency.keys.c.key == key)
            )
    finally:
        await engine.dispose()
    assert isinstance(ids, list), ids
    return [str(i) for i in ids]


@pytest.mark.broker
@pytest.mark.parametrize("failure", STORE_FAILURES)
async def test_a_partial_failure_reaches_the_client_when_its_key_cannot_be_released(
    namespace: Namespace,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    failure: Exception,
) -> None:
    """The broker refuses the batch: 503 listing what failed. Freeing the key failing too must
    not turn that answer into a bare 500 (the key's lease frees it)."""

    async def store_fails(*_: object) -> None:
        raise failure

    monkeypatch.setattr(IdempotencyKeys, "release", store_fails)
    async with TcpProxy("127.0.0.1", 5672) as proxy:
        proxy.set_mode(ProxyMode.REFUSE)
        url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
        async with running_gateway(namespace, tmp_path, None, wait_ready=False, amqp_url=url) as gw:
            refused = await post(
                gw, [NOTIFICATION, OTHER_NOTIFICATION], new_key(), "/v1/events/batch"
            )
            # Let the broker back before the gateway closes, as the next test does: closed
            # while refused, its robust connection's close was left pending, and the test
            # loop's teardown waited on it (2 runs in 6).
            proxy.set_mode(ProxyMode.PASS)

            async def ready() -> None:
                assert (await gw.get("/readyz")).status_code == 200

            await eventually(ready, timeout=20)
    assert refused.status_code == 503, refused.text
    assert refused.headers["retry-after"].isdigit()
    assert len(refused.json()["failed"]) == 2


@pytest.mark.broker
async def test_a_retry_after_a_503_publishes_under_the_same_event_ids(
    namespace: Namespace, tmp_path: Path, own_database_url: str | None
) -> None:
    """The broker is unreachable: 503. The client retries with the same key once the broker is
    back: the events go out under the ids chosen for the first try (so, had the first publish
    landed after all, the consumers' inboxes would drop the second), each exactly once."""
    host, port = "127.0.0.1", 5672
    async with TcpProxy(host, port) as proxy:
        proxy.set_mode(ProxyMode.REFUSE)
        url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
        single, batch = new_key(), new_key()
        async with running_gateway(
            namespace, tmp_path, own_database_url, wait_ready=False, amqp_url=url
        ) as gw:
            refused = await post(gw, NOTIFICATION, single)
            assert refused.status_code == 503, refused.text
            assert refused.headers["retry-after"].isdigit()
            [first_id] = await stored_event_ids(tmp_path, own_database_url, single)
            refused_batch = await post(
                gw, [NOTIFICATION, OTHER_NOTIFICATION], batch, "/v1/events/batch"
            )
            assert refused_batch.status_code == 503, refused_batch.text
            batch_ids = refused_batch.json()["failed"]
            assert len(batch_ids) == 2 and refused_batch.json()["published"] == []

            proxy.set_mode(ProxyMode.PASS)

            async def ready() -> None:
                assert (await gw.get("/readyz")).status_code == 200

            await eventually(ready, timeout=20)
            retried = await post(gw, NOTIFICATION, single)
            assert retried.status_code == 202, retried.text
            assert "idempotent-replayed" not in retried.headers
            assert retried.json()["id"] == first_id
            retried_batch = await post(
                gw, [NOTIFICATION, OTHER_NOTIFICATION], batch, "/v1/events/batch"
            )
            assert retried_batch.status_code == 202, retried_batch.text
            assert [e["id"] for e in retried_batch.json()["events"]] == batch_ids
            # And from now on the key replays.
            assert (await post(gw, NOTIFICATION, single)).headers["idempotent-replayed"] == "true"
            assert sorted(await queued(namespace)) == sorted([first_id, *batch_ids])


async def test_an_event_written_but_never_confirmed_is_answered_as_possibly_accepted(
    namespace: Namespace, tmp_path: Path, own_database_url: str | None
) -> None:
    """The broker may have an event whose confirm never came: the 503 says so and names the id
    to retry with (a batch lists them as `unconfirmed`), and the key is free for that retry."""
    async with TcpProxy("127.0.0.1", 5672) as proxy:
        url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
        key, batch_key = new_key(), new_key()
        async with running_gateway(
            namespace, tmp_path, own_database_url, amqp_url=url, publish_timeout=0.5
        ) as gw:
            proxy.set_mode(ProxyMode.BLACKHOLE)  # written, never answered
            unconfirmed = await post(gw, NOTIFICATION, key)
            assert unconfirmed.status_code == 503, unconfirmed.text
            [event_id] = await stored_event_ids(tmp_path, own_database_url, key)
            detail = unconfirmed.json()["detail"]
            assert event_id in detail and "may have been accepted" in detail
            assert unconfirmed.headers["retry-after"].isdigit()
            batch = await post(
                gw, [NOTIFICATION, OTHER_NOTIFICATION], batch_key, "/v1/events/batch"
            )
            assert batch.status_code == 503, batch.text
            assert batch.json()["unconfirmed"] == batch.json()["failed"]
            assert len(batch.json()["failed"]) == 2
            assert (await post(gw, NOTIFICATION, key)).status_code == 503  # not busy: released
            proxy.set_mode(ProxyMode.REFUSE)
            proxy.reset_all()  # gone, not hanging: the gateway stops without waiting on it


@pytest.mark.broker
async def test_a_key_expires_after_its_ttl(
    namespace: Namespace, tmp_path: Path, own_database_url: str | None
) -> None:
    # COURIER_IDEMPOTENCY_TTL_HOURS: 0.3 s.
    async with running_gateway(
        namespace, tmp_path, own_database_url, idempotency_ttl_hours=0.3 / 3600
    ) as gw:
        key = new_key()
        first = await post(gw, NOTIFICATION, key)
        assert first.status_code == 202
        assert (await post(gw, NOTIFICATION, key)).headers["idempotent-replayed"] == "true"

        async def forgotten() -> httpx.Response:
            again = await post(gw, NOTIFICATION, key)
            assert again.status_code == 202
            assert "idempotent-replayed" not in again.headers
            return again

        again = await eventually(forgotten, timeout=10)
        assert again.json()["id"] != first.json()["id"]
        # An expired key is free for another request too.
        other = await post(gw, OTHER_NOTIFICATION, new_key())
        assert other.status_code == 202
        assert sorted(await queued(namespace)) == sorted(
            [first.json()["id"], again.json()["id"], other.json()["id"]]
        )


# --- IdempotencyKeys, store level -----------------------------------------------------------


@pytest_asyncio.fixture(loop_scope="module")
async def engine(tmp_path: Path, database_url: str | None) -> AsyncIterator[AsyncEngine]:
    store = open_store(store_url(database_url, tmp_path, "gateway"))
    yield store
    await store.dispose()


LEASE = timedelta(seconds=15)


@pytest_asyncio.fixture(loop_scope="module")
async def keys(engine: AsyncEngine) -> IdempotencyKeys:
    store = IdempotencyKeys(engine, ttl=timedelta(hours=1), lease=LEASE)
    await store.start()
    return store


@pytest.fixture
def k() -> str:
    """An idempotency key no other test uses (the PostgreSQL database is shared)."""
    return f"key-{uuid.uuid4()}"


REQUEST = fingerprint("POST", "/v1/events", "application/json", b'{"a": 1}')
OTHER = fingerprint("POST", "/v1/events", "application/json", b'{"a": 2}')
RESPONSE = {"body": {"id": "e1"}, "location": "/v1/events/e1"}


async def test_a_new_key_is_claimed_for_publishing(keys: IdempotencyKeys, k: str) -> None:
    claim = await keys.claim(k, REQUEST, ["e1"])
    assert (claim.kind, claim.event_ids) == ("publish", ["e1"])


async def test_a_repeat_gets_the_stored_response(keys: IdempotencyKeys, k: str) -> None:
    claim = await keys.claim(k, REQUEST, ["e1"])
    await keys.complete(k, claim, 202, RESPONSE)
    claim = await keys.claim(k, REQUEST, ["e2"])
    assert (claim.kind, claim.event_ids, claim.status_code, claim.response) == (
        "done",
        ["e1"],
        202,
        RESPONSE,
    )


async def test_the_same_key_with_another_request_is_a_conflict(
    keys: IdempotencyKeys, k: str
) -> None:
    claim = await keys.claim(k, REQUEST, ["e1"])
    assert (await keys.claim(k, OTHER, ["e2"])).kind == "conflict"
    await keys.complete(k, claim, 202, RESPONSE)
    assert (await keys.claim(k, OTHER, ["e2"])).kind == "conflict"


async def test_a_key_in_progress_is_busy_and_waiters_get_its_response(
    keys: IdempotencyKeys, k: str
) -> None:
    claim = await keys.claim(k, REQUEST, ["e1"])
    assert (await keys.claim(k, REQUEST, ["e2"])).kind == "busy"
    waiter = asyncio.ensure_future(keys.wait(k, REQUEST))
    await keys.complete(k, claim, 202, RESPONSE)
    async with asyncio.timeout(5):
        waited = await waiter
    assert waited is not None
    assert (waited.kind, waited.event_ids, waited.response) == ("done", ["e1"], RESPONSE)


async def test_a_released_key_is_published_again_under_the_same_event_ids(
    keys: IdempotencyKeys, k: str
) -> None:
    claim = await keys.claim(k, REQUEST, ["e1", "e2"])
    waiter = asyncio.ensure_future(keys.wait(k, REQUEST))
    await keys.release(k, claim)  # the broker did not take the events
    async with asyncio.timeout(5):
        assert await waiter is None  # the waiter tries for itself
    claim = await keys.claim(k, REQUEST, ["new-1", "new-2"])
    assert (claim.kind, claim.event_ids) == ("publish", ["e1", "e2"])
    assert (await keys.claim(k, REQUEST, ["new-3", "new-4"])).kind == "busy"


async def test_a_stale_claim_is_taken_over_after_the_lease(engine: AsyncEngine, k: str) -> None:
    """A gateway that died while publishing: after the lease, the key publishes again."""
    store = IdempotencyKeys(engine, ttl=timedelta(hours=1), lease=timedelta(milliseconds=100))
    await store.start()
    await store.claim(k, REQUEST, ["e1"])

    async def taken_over() -> None:
        claim = await store.claim(k, REQUEST, ["e2"])
        assert (claim.kind, claim.event_ids) == ("publish", ["e1"])

    await eventually(taken_over, timeout=5)


async def test_a_request_whose_key_was_taken_over_cannot_settle_it(
    engine: AsyncEngine, k: str
) -> None:
    """A slow request, not dead after all, finishes after another took its key over: its
    release or response must not undo the new holder's."""
    store = IdempotencyKeys(engine, ttl=timedelta(hours=1), lease=timedelta(milliseconds=100))
    await store.start()
    slow = await store.claim(k, REQUEST, ["e1"])
    taken: list[idempotency.Claim] = []

    async def taken_over() -> None:
        taken.append(await store.claim(k, REQUEST, ["e2"]))
        assert taken[-1].kind == "publish"

    await eventually(taken_over, timeout=5)
    assert not await store.release(k, slow)
    assert (await store.claim(k, REQUEST, ["e3"])).kind == "busy"  # still the new holder's
    assert await store.complete(k, taken[-1], 202, RESPONSE)
    assert not await store.complete(k, slow, 500, {"body": {}, "location": None})
    repeat = await store.claim(k, REQUEST, ["e4"])
    assert (repeat.kind, repeat.status_code, repeat.response) == ("done", 202, RESPONSE)


async def test_keys_expire_after_the_ttl_and_are_purged(engine: AsyncEngine, k: str) -> None:
    store = IdempotencyKeys(engine, ttl=timedelta(milliseconds=200), lease=LEASE)
    await store.start()
    claim = await store.claim(k, REQUEST, ["e1"])
    await store.complete(k, claim, 202, RESPONSE)
    assert (await store.claim(k, REQUEST, ["e2"])).kind == "done"

    async def expired() -> None:
        claim = await store.claim(k, OTHER, ["e3"])  # another request is no conflict any more
        assert (claim.kind, claim.event_ids) == ("publish", ["e3"])

    await eventually(expired, timeout=5)
    gone = k + "-gone"
    await store.release(gone, await store.claim(gone, REQUEST, ["e4"]))  # its request failed

    async def purged() -> None:
        assert await store.purge() >= 1
        assert (await store.claim(gone, OTHER, ["e5"])).kind == "publish"

    await eventually(purged, timeout=5)


async def test_an_expired_key_a_request_holds_is_neither_taken_over_nor_purged(
    engine: AsyncEngine, k: str
) -> None:
    """A retry took the key back just before it expired: another request with it must wait
    (taken over, the events would go out twice under two sets of ids), and the purge must
    leave it."""
    store = IdempotencyKeys(engine, ttl=timedelta(milliseconds=300), lease=LEASE)
    await store.start()
    first = await store.claim(k, REQUEST, ["e1"])
    await store.release(k, first)  # the broker refused it
    retry = await store.claim(k, REQUEST, ["e2"])
    assert (retry.kind, retry.event_ids) == ("publish", ["e1"])  # the retry holds it again
    await asyncio.sleep(0.4)  # expired while the retry publishes
    for request in (REQUEST, OTHER):
        assert (await store.claim(k, request, ["e3"])).kind == "busy"
    await store.purge()
    assert await store.complete(k, retry, 202, RESPONSE)  # still its own, never taken over


async def test_a_waiter_with_another_request_does_not_get_the_holders_response(
    engine: AsyncEngine, k: str
) -> None:
    """An expired key reused with another body while a request holds it: the holder's 202
    would answer a request whose events were never published."""
    store = IdempotencyKeys(engine, ttl=timedelta(milliseconds=300), lease=LEASE)
    await store.start()
    holder = await store.claim(k, REQUEST, ["e1"])
    await asyncio.sleep(0.4)  # expired while it publishes
    assert (await store.claim(k, OTHER, ["e2"])).kind == "busy"
    waiter = asyncio.ensure_future(store.wait(k, OTHER))
    assert await store.complete(k, holder, 202, RESPONSE)
    async with asyncio.timeout(5):
        assert await waiter is None  # it claims for itself: the key has expired
    claim = await store.claim(k, OTHER, ["e2"])
    assert (claim.kind, claim.event_ids) == ("publish", ["e2"])


async def test_a_key_taken_back_for_a_retry_keeps_the_retrys_response_for_a_whole_ttl(
    engine: AsyncEngine, k: str
) -> None:
    """The TTL counts from the retry that published, not from the first, failed attempt: a
    repeat soon after the retry's 202 must get it, not publish again under new ids."""
    ttl = 2.0
    store = IdempotencyKeys(engine, ttl=timedelta(seconds=ttl), lease=LEASE)
    await store.start()
    start = time.monotonic()
    await store.release(k, await store.claim(k, REQUEST, ["e1"]))  # the broker refused it
    await asyncio.sleep(0.7 * ttl)
    retry = await store.claim(k, REQUEST, ["e2"])
    retried_at = time.monotonic()
    assert (retry.kind, retry.event_ids) == ("publish", ["e1"])
    assert await store.complete(k, retry, 202, RESPONSE)
    await asyncio.sleep(max(0.0, start + 1.1 * ttl - time.monotonic()))  # past the first TTL
    repeat = await store.claim(k, REQUEST, ["e3"])
    assert time.monotonic() - retried_at < ttl, "too slow a host to tell"
    assert (repeat.kind, repeat.event_ids, repeat.response) == ("done", ["e1"], RESPONSE)


async def test_concurrent_claims_of_one_key_publish_once(keys: IdempotencyKeys, k: str) -> None:
    claims = await asyncio.gather(*(keys.claim(k, REQUEST, [f"e{i}"]) for i in range(20)))
    kinds = sorted(claim.kind for claim in claims)
    assert kinds == ["busy"] * 19 + ["publish"]
    [winner] = [claim for claim in claims if claim.kind == "publish"]
    assert all(claim.event_ids == winner.event_ids for claim in claims)


async def test_concurrent_claims_of_an_expired_key_publish_once(
    engine: AsyncEngine, k: str
) -> None:
    """Expired but not yet purged, the key is free again, for one of the requests reusing it."""
    store = IdempotencyKeys(engine, ttl=timedelta(milliseconds=200), lease=LEASE)
    await store.start()
    first = await store.claim(k, REQUEST, ["first"])
    await store.complete(k, first, 202, RESPONSE)
    await asyncio.sleep(0.3)  # expired
    claims = await asyncio.gather(*(store.claim(k, REQUEST, [f"e{i}"]) for i in range(10)))
    assert sorted(claim.kind for claim in claims) == ["busy"] * 9 + ["publish"]
    [winner] = [claim for claim in claims if claim.kind == "publish"]
    assert all(claim.event_ids == winner.event_ids for claim in claims)


async def test_keys_are_independent(keys: IdempotencyKeys, k: str) -> None:
    assert (await keys.claim(k + "a", REQUEST, ["e1"])).kind == "publish"
    assert (await keys.claim(k + "b", REQUEST, ["e2"])).kind == "publish"
