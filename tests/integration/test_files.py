"""File uploads against a real broker: streamed to blob storage, announced, served back."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import BinaryIO

import aio_pika
import httpx
import pytest
from fastapi import FastAPI
from starlette.types import Message, Scope

from contracts.envelope import derived_event_id
from contracts.events import EVENT_ADAPTER
from contracts.files import FileAnalysis, FileProcessed, FileProcessedData, FileUploaded
from contracts.topology import events_exchange, queue_for
from services.blobs import LocalBlobStore
from services.blobs.local import LocalUpload
from services.gateway.uploads import FRAMING_ALLOWANCE, MAX_PARTS
from services.messaging.declare import declare_topology
from services.messaging.publisher import Publisher
from tests.conftest import Namespace
from tests.integration.conftest import gateway_client, gateway_settings
from tests.support.polling import eventually
from tests.support.queues import assert_empty, take, unbind_everyone
from tests.support.tcp_proxy import ProxyMode, TcpProxy

pytestmark = pytest.mark.broker

LIMIT = 256 * 1024
CSV = b"sku,price\na,10\nb,30\n"
BOUNDARY = "courier-test-boundary"


@pytest.fixture
def blob_dir(tmp_path: Path) -> Path:
    return tmp_path / "blobs"


@pytest.fixture
async def client(
    namespace: Namespace, tmp_path: Path, blob_dir: Path
) -> AsyncIterator[httpx.AsyncClient]:
    settings = gateway_settings(
        namespace,
        tmp_path,
        blob_dir=blob_dir,
        max_upload_bytes=LIMIT,
        upload_types=("text/csv", "text/plain", "image/*"),
    )
    async for c in gateway_client(settings):
        yield c


@asynccontextmanager
async def behind_a_proxy(
    namespace: Namespace,
    tmp_path: Path,
    blob_dir: Path,
    started: Callable[[FastAPI], None] | None = None,
) -> AsyncIterator[tuple[TcpProxy, httpx.AsyncClient]]:
    """A gateway that reaches the broker through a proxy the test controls."""
    async with TcpProxy("127.0.0.1", 5672) as proxy:
        settings = gateway_settings(
            namespace,
            tmp_path,
            blob_dir=blob_dir,
            amqp_url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/",
            publish_timeout=0.5,
        )
        async for client in gateway_client(settings, started=started):
            yield proxy, client


class UndeletableBlobs(LocalBlobStore):
    """Blob storage that stores and reads, but whose deletes fail (a disk gone read-only)."""

    def _delete(self, key: str) -> None:
        raise OSError(errno.EROFS, "Read-only file system", key)


class FullBlobs(LocalBlobStore):
    """Blob storage on a full disk: an upload's first write fails."""

    def _create(self, key: str) -> LocalUpload:
        return FullUpload(*vars(super()._create(key)).values())


class FullUpload(LocalUpload):
    @staticmethod
    def _write(file: BinaryIO, chunk: bytes | bytearray) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture
async def undeletable(
    namespace: Namespace, tmp_path: Path, blob_dir: Path
) -> AsyncIterator[httpx.AsyncClient]:
    """A client of a gateway whose blob storage cannot delete."""

    def undeletable_blobs(app: FastAPI) -> None:
        app.state.blobs = UndeletableBlobs(blob_dir)

    settings = gateway_settings(namespace, tmp_path, blob_dir=blob_dir)
    async for c in gateway_client(settings, started=undeletable_blobs):
        yield c


def files_lane(namespace: Namespace) -> str:
    """Where the processor takes the announced files from."""
    return queue_for(namespace.name, "processor", "file.uploaded")


async def declare_topology_of(namespace: Namespace) -> None:
    connection = await aio_pika.connect(namespace.amqp_url)
    async with connection:
        await declare_topology(connection, namespace.settings().all_topologies())


def stored_files(blob_dir: Path) -> list[Path]:
    """Everything in the blob directory, temporary files included."""
    return sorted(p for p in blob_dir.rglob("*") if p.is_file()) if blob_dir.exists() else []


async def streamed(size: int, content_type: str = "text/csv") -> AsyncIterator[bytes]:
    """A multipart body whose file part is `size` bytes, sent in 64 KiB chunks (no length)."""
    yield (
        f"--{BOUNDARY}\r\n"
        f'Content-Disposition: form-data; name="file"; filename="big.csv"\r\n'
        f"Content-Type: {content_type}\r\n\r\n"
    ).encode()
    line = b"0123456789abcdef,fedcba9876543210\n"
    chunk = line * (65_536 // len(line))
    sent = 0
    while sent < size:
        part = chunk[: size - sent]
        sent += len(part)
        yield part
    yield f"\r\n--{BOUNDARY}--\r\n".encode()


MULTIPART = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}


async def test_an_upload_is_stored_announced_and_served_back(
    client: httpx.AsyncClient, namespace: Namespace, blob_dir: Path
) -> None:
    response = await client.post(
        "/v1/files",
        files={"file": ("prices.csv", CSV, "text/csv")},
        data={"comment": "ignored"},
        headers={"x-correlation-id": "order-7"},
    )
    assert response.status_code == 202, response.text
    body = response.json()
    file_id = body["id"]
    assert body == {
        "id": file_id,
        "type": "file.uploaded",
        "status_url": f"/v1/events/{file_id}",
        "file_url": f"/v1/files/{file_id}",
    }
    assert response.headers["location"] == body["file_url"]

    # The blob is committed under its key, with no temporary file left beside it.
    assert stored_files(blob_dir) == [blob_dir / file_id]
    assert (blob_dir / file_id).read_bytes() == CSV

    [message] = await take(namespace.amqp_url, files_lane(namespace), 1)
    event = EVENT_ADAPTER.validate_json(message.body)
    assert isinstance(event, FileUploaded)
    assert event.id == file_id and event.correlationid == "order-7"
    assert event.data.model_dump() == {
        "file_id": file_id,
        "blob": file_id,
        "name": "prices.csv",
        "content_type": "text/csv",
        "size": len(CSV),
        "sha256": hashlib.sha256(CSV).hexdigest(),
    }
    assert message.delivery_mode == 2

    status = (await client.get(body["file_url"])).json()
    assert status["status"] == "pending" and status["analysis"] is None
    assert (status["name"], status["size"], status["content_type"]) == (
        "prices.csv",
        len(CSV),
        "text/csv",
    )
    assert status["sha256"] == hashlib.sha256(CSV).hexdigest()
    tracked = (await client.get(body["status_url"])).json()
    assert tracked["type"] == "file.uploaded"
    assert tracked["services"]["processor"]["state"] == "pending"

    download = await client.get(status["content_url"])
    assert download.status_code == 200
    assert download.content == CSV
    assert download.headers["content-type"] == "text/csv"  # as declared, no charset added
    assert download.headers["content-length"] == str(len(CSV))
    assert download.headers["content-disposition"] == (
        "attachment; filename=\"prices.csv\"; filename*=UTF-8''prices.csv"
    )


async def test_a_streamed_upload_is_hashed_as_it_arrives(
    client: httpx.AsyncClient, namespace: Namespace, blob_dir: Path
) -> None:
    size = LIMIT - 10
    response = await client.post("/v1/files", content=streamed(size), headers=MULTIPART)
    assert response.status_code == 202, response.text
    file_id = response.json()["id"]
    stored = (blob_dir / file_id).read_bytes()
    assert len(stored) == size
    [message] = await take(namespace.amqp_url, files_lane(namespace), 1)
    event = EVENT_ADAPTER.validate_json(message.body)
    assert isinstance(event, FileUploaded)
    assert (event.data.size, event.data.sha256) == (size, hashlib.sha256(stored).hexdigest())


async def test_a_file_over_the_limit_is_refused_and_removed(
    client: httpx.AsyncClient, namespace: Namespace, blob_dir: Path
) -> None:
    # Streamed without a Content-Length: the limit is enforced on the bytes as they arrive.
    response = await client.post("/v1/files", content=streamed(LIMIT + 1), headers=MULTIPART)
    assert response.status_code == 413, response.text
    assert str(LIMIT) in response.json()["detail"]
    assert stored_files(blob_dir) == []
    # With a Content-Length beyond the limit, before a byte is read.
    declared = await client.post(
        "/v1/files", files={"file": ("big.csv", b"x" * (2 * LIMIT), "text/csv")}
    )
    assert declared.status_code == 413
    assert stored_files(blob_dir) == []
    await assert_empty(namespace.amqp_url, [files_lane(namespace)])


async def test_a_declared_length_over_both_allowances_is_refused_naming_both(
    client: httpx.AsyncClient, blob_dir: Path
) -> None:
    # A small file, with form fields past their allowance: the file is not what is too large.
    response = await client.post(
        "/v1/files",
        files={"file": ("small.csv", b"a,b\n", "text/csv")},
        data={"junk": "x" * (LIMIT + FRAMING_ALLOWANCE)},
    )
    assert response.status_code == 413
    detail = response.json()["detail"]
    assert f"{LIMIT} bytes of file and {FRAMING_ALLOWANCE} bytes of form fields" in detail
    assert stored_files(blob_dir) == []


@pytest.mark.parametrize(
    ("files", "content", "headers", "status"),
    [
        ({"file": ("app.exe", b"MZ\x90\x00", "application/x-msdownload")}, None, None, 415),
        (None, b'{"a": 1}', {"content-type": "application/json"}, 415),
        ({"other": ("a.csv", CSV, "text/csv")}, None, None, 400),
        (None, b"--x\r\nnot a multipart body", {"content-type": "multipart/form-data"}, 400),
    ],
    ids=["type-not-allowed", "not-multipart", "no-file-part", "no-boundary"],
)
async def test_unacceptable_uploads_store_and_publish_nothing(
    client: httpx.AsyncClient,
    namespace: Namespace,
    blob_dir: Path,
    files: dict[str, tuple[str, bytes, str]] | None,
    content: bytes | None,
    headers: dict[str, str] | None,
    status: int,
) -> None:
    response = await client.post("/v1/files", files=files, content=content, headers=headers)
    assert response.status_code == status, response.text
    assert stored_files(blob_dir) == []
    await assert_empty(namespace.amqp_url, [files_lane(namespace)])


async def test_a_wildcard_type_is_allowed_and_the_name_is_made_safe(
    client: httpx.AsyncClient, blob_dir: Path
) -> None:
    response = await client.post(
        "/v1/files", files={"file": ("../../etc/pic\u00e9.png", b"\x89PNG\r\n\x1a\n", "image/png")}
    )
    assert response.status_code == 202
    status = (await client.get(response.json()["file_url"])).json()
    assert status["name"] == "pic\u00e9.png"
    download = await client.get(status["content_url"])
    assert download.headers["content-disposition"] == (
        "attachment; filename=\"pic_.png\"; filename*=UTF-8''pic%C3%A9.png"
    )


async def test_unknown_files_are_404(client: httpx.AsyncClient) -> None:
    assert (await client.get("/v1/files/nope")).status_code == 404
    assert (await client.get("/v1/files/nope/content")).status_code == 404


async def test_the_gateway_stores_the_analysis_it_is_sent(
    client: httpx.AsyncClient, namespace: Namespace
) -> None:
    response = await client.post("/v1/files", files={"file": ("p.csv", CSV, "text/csv")})
    file_id = response.json()["id"]
    analysis = FileAnalysis(detected_type="text/csv", format="csv", record_count=2)
    processed = FileProcessed(
        id=derived_event_id(file_id, "file.processed"),
        data=FileProcessedData(
            file_id=file_id,
            name="p.csv",
            declared_type="text/csv",
            size=len(CSV),
            sha256=hashlib.sha256(CSV).hexdigest(),
            analysis=analysis,
        ),
    )
    publisher = Publisher(namespace.amqp_url)
    await publisher.connect()
    try:
        await publisher.publish_event(processed, exchange=events_exchange(namespace.name))
    finally:
        await publisher.close()

    async def analysed() -> dict[str, object]:
        status: dict[str, object] = (await client.get(f"/v1/files/{file_id}")).json()
        assert status["analysis"] is not None, status
        return status

    status = await eventually(analysed)
    assert status["status"] == "succeeded"
    assert status["analysis"] == analysis.model_dump(mode="json")


async def test_without_a_broker_an_upload_is_refused_before_it_is_read(
    namespace: Namespace, tmp_path: Path, blob_dir: Path
) -> None:
    settings = gateway_settings(
        namespace, tmp_path, blob_dir=blob_dir, amqp_url="amqp://guest:guest@127.0.0.1:1/"
    )
    async for client in gateway_client(settings, wait_ready=False):
        response = await client.post("/v1/files", files={"file": ("p.csv", CSV, "text/csv")})
        assert response.status_code == 503
        assert response.headers["retry-after"] == str(settings.retry_after_seconds)
    assert stored_files(blob_dir) == []


async def test_an_upload_the_broker_may_have_announced_keeps_its_file(
    namespace: Namespace, tmp_path: Path, blob_dir: Path
) -> None:
    """Written but never confirmed, the announcement may be in the processor's queue: the
    file must still be there when the processor comes to read it."""
    async with behind_a_proxy(namespace, tmp_path, blob_dir) as (proxy, client):
        proxy.set_mode(ProxyMode.BLACKHOLE)  # written, never answered
        response = await client.post("/v1/files", files={"file": ("p.csv", CSV, "text/csv")})
        assert response.status_code == 503, response.text
        assert "may have been accepted" in response.json()["detail"]
        # Not "retry with the same id": an upload cannot choose its id, and a second upload
        # without the first one's Idempotency-Key is a second file. Where to look instead:
        location = response.headers["location"]
        assert location.startswith("/v1/files/") and location in response.json()["detail"]
        assert "Idempotency-Key" not in response.json()["detail"]  # it sent none
        [kept] = stored_files(blob_dir)
        assert kept.read_bytes() == CSV
        proxy.set_mode(ProxyMode.REFUSE)
        proxy.reset_all()  # gone, not hanging: the gateway stops without waiting on it


async def test_an_upload_repeated_with_its_idempotency_key_is_one_file_announced_once(
    client: httpx.AsyncClient, namespace: Namespace, blob_dir: Path
) -> None:
    def upload(*targets: str) -> Awaitable[httpx.Response]:
        return client.post(
            "/v1/files",
            files={"file": ("p.csv", CSV, "text/csv")},
            data={"notify": list(targets)},
            headers={"idempotency-key": "upload-7"},
        )

    first = await upload("log:ops", "email:ops@example.org")
    again = await upload("email:ops@example.org", "log:ops")  # the same targets
    assert first.status_code == again.status_code == 202, again.text
    assert again.json() == first.json() and again.headers["location"] == first.headers["location"]
    assert again.headers["idempotent-replayed"] == "true"
    file_id = first.json()["id"]
    assert stored_files(blob_dir) == [blob_dir / file_id]  # the repeat's copy is not kept
    [announced] = await take(namespace.amqp_url, files_lane(namespace), 1)
    assert announced.message_id == file_id
    await assert_empty(namespace.amqp_url, [files_lane(namespace)])


async def test_an_idempotency_key_reused_for_another_file_is_a_conflict_that_keeps_nothing(
    client: httpx.AsyncClient, namespace: Namespace, blob_dir: Path
) -> None:
    key = {"idempotency-key": "upload-8"}
    first = await client.post("/v1/files", files={"file": ("p.csv", CSV, "text/csv")}, headers=key)
    assert first.status_code == 202, first.text
    other = await client.post(
        "/v1/files", files={"file": ("p.csv", CSV + b"c,5\n", "text/csv")}, headers=key
    )
    assert other.status_code == 409, other.text
    assert stored_files(blob_dir) == [blob_dir / first.json()["id"]]
    await take(namespace.amqp_url, files_lane(namespace), 1)
    await assert_empty(namespace.amqp_url, [files_lane(namespace)])


async def test_after_a_failed_upload_its_key_takes_the_repeat_and_replays_it_after(
    client: httpx.AsyncClient, tmp_path: Path, blob_dir: Path, namespace: Namespace
) -> None:
    key = {"idempotency-key": "upload-9"}
    with sqlite3.connect(tmp_path / "gateway.sqlite3") as store:  # the files' table fails
        store.execute("ALTER TABLE files RENAME TO files_away")
    failed = await client.post("/v1/files", files={"file": ("p.csv", CSV, "text/csv")}, headers=key)
    assert failed.status_code == 503, failed.text
    with sqlite3.connect(tmp_path / "gateway.sqlite3") as store:
        store.execute("ALTER TABLE files_away RENAME TO files")
    again = await client.post("/v1/files", files={"file": ("p.csv", CSV, "text/csv")}, headers=key)
    assert again.status_code == 202, again.text
    later = await client.post("/v1/files", files={"file": ("p.csv", CSV, "text/csv")}, headers=key)
    assert later.json() == again.json() and later.headers["idempotent-replayed"] == "true"
    file_id = again.json()["id"]
    [announced] = await take(namespace.amqp_url, files_lane(namespace), 1)
    event = EVENT_ADAPTER.validate_json(announced.body)
    assert isinstance(event, FileUploaded) and event.data.file_id == announced.message_id == file_id
    # The id is the first attempt's (the key held it); the bytes are the repeat's copy.
    assert event.data.blob != file_id
    [stored] = stored_files(blob_dir)
    assert stored.name == event.data.blob and stored.read_bytes() == CSV
    assert (await client.get(f"/v1/files/{file_id}/content")).content == CSV
    await assert_empty(namespace.amqp_url, [files_lane(namespace)])


async def upload_until_accepted(
    client: httpx.AsyncClient, headers: dict[str, str]
) -> httpx.Response:
    """As a client does: the same upload, with the same key, again while the answer is a 503."""
    answers: list[httpx.Response] = []

    async def upload() -> None:
        files = {"file": ("p.csv", CSV, "text/csv")}
        answers.append(await client.post("/v1/files", files=files, headers=headers))
        assert answers[-1].status_code == 202, answers[-1].text

    await eventually(upload, timeout=20)
    return answers[-1]


async def test_a_repeat_after_a_maybe_announced_upload_announces_the_kept_file_again(
    namespace: Namespace, tmp_path: Path, blob_dir: Path
) -> None:
    key = {"idempotency-key": "upload-10"}
    async with behind_a_proxy(namespace, tmp_path, blob_dir) as (proxy, client):
        proxy.set_mode(ProxyMode.BLACKHOLE)  # written, never answered
        first = await client.post(
            "/v1/files", files={"file": ("p.csv", CSV, "text/csv")}, headers=key
        )
        assert first.status_code == 503 and "may have been accepted" in first.text
        assert "same Idempotency-Key" in first.text
        file_id = first.headers["location"].removeprefix("/v1/files/")
        proxy.set_mode(ProxyMode.PASS)
        proxy.reset_all()  # the gateway connects again
        again = await upload_until_accepted(client, key)
        assert again.json()["id"] == file_id
        # One file: the copy kept for the first announcement; the repeat's is not kept.
        assert stored_files(blob_dir) == [blob_dir / file_id]
        announced = await take(namespace.amqp_url, files_lane(namespace), 1)
        assert {m.message_id for m in announced} == {file_id}


async def refused_once(
    client: httpx.AsyncClient, namespace: Namespace, key: dict[str, str]
) -> None:
    """Upload with `key` while no queue takes `file.uploaded` (a routing fault: refused,
    certainly not announced), then put the route back."""
    settings = namespace.settings()
    await unbind_everyone(namespace.amqp_url, settings, "file.uploaded")
    refused = await client.post(
        "/v1/files", files={"file": ("p.csv", CSV, "text/csv")}, headers=key
    )
    assert refused.status_code >= 500, refused.text
    await declare_topology_of(namespace)


async def test_a_keyed_upload_that_failed_keeps_its_copy_for_the_repeat(
    client: httpx.AsyncClient, namespace: Namespace, blob_dir: Path
) -> None:
    """Kept, not deleted: a request that took the key over (the failing one looked dead)
    may be announcing it."""
    key = {"idempotency-key": "upload-11"}
    await refused_once(client, namespace, key)
    [kept] = stored_files(blob_dir)
    again = await client.post("/v1/files", files={"file": ("p.csv", CSV, "text/csv")}, headers=key)
    assert again.status_code == 202, again.text
    assert again.json()["id"] == kept.name  # the first attempt's id and copy
    assert stored_files(blob_dir) == [kept]  # the repeat's copy is not kept
    [announced] = await take(namespace.amqp_url, files_lane(namespace), 1)
    event = EVENT_ADAPTER.validate_json(announced.body)
    assert isinstance(event, FileUploaded) and event.data.blob == kept.name


async def test_a_repeat_whose_kept_copy_went_missing_brings_its_own(
    client: httpx.AsyncClient, namespace: Namespace, blob_dir: Path
) -> None:
    key = {"idempotency-key": "upload-12"}
    await refused_once(client, namespace, key)
    [kept] = stored_files(blob_dir)
    kept.unlink()  # as retention would
    again = await client.post("/v1/files", files={"file": ("p.csv", CSV, "text/csv")}, headers=key)
    assert again.status_code == 202, again.text
    file_id = again.json()["id"]
    [announced] = await take(namespace.amqp_url, files_lane(namespace), 1)
    event = EVENT_ADAPTER.validate_json(announced.body)
    assert isinstance(event, FileUploaded) and event.data.file_id == file_id == kept.name
    assert stored_files(blob_dir) == [blob_dir / event.data.blob]
    assert (await client.get(f"/v1/files/{file_id}/content")).content == CSV


async def test_an_upload_the_store_cannot_record_is_a_503_that_leaves_nothing(
    client: httpx.AsyncClient, tmp_path: Path, blob_dir: Path, namespace: Namespace
) -> None:
    # A client that retries on 503 gave up on the 500 this was (after sending up to 1 GiB).
    with sqlite3.connect(tmp_path / "gateway.sqlite3") as store:  # the store fails
        store.execute("ALTER TABLE files RENAME TO files_away")
    response = await client.post("/v1/files", files={"file": ("p.csv", CSV, "text/csv")})
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"]
    assert stored_files(blob_dir) == []
    await assert_empty(namespace.amqp_url, [files_lane(namespace)])


async def test_an_upload_whose_callback_url_cannot_be_stored_is_a_503_that_leaves_nothing(
    client: httpx.AsyncClient, tmp_path: Path, blob_dir: Path, namespace: Namespace
) -> None:
    # Noted before the file is recorded: a recorded file is announced by the sweep, and it
    # would go without the URL the client was not told was lost.
    with sqlite3.connect(tmp_path / "gateway.sqlite3") as store:
        store.execute("ALTER TABLE status_events RENAME TO status_events_away")
    response = await client.post(
        "/v1/files",
        files={"file": ("p.csv", CSV, "text/csv")},
        data={"callback_url": "https://shop.example/hooks/files"},
    )
    assert response.status_code == 503, response.text
    assert "store the callback URL" in response.json()["detail"]
    assert stored_files(blob_dir) == []
    with sqlite3.connect(tmp_path / "gateway.sqlite3") as store:
        assert store.execute("SELECT count(*) FROM files").fetchone() == (0,)
    await assert_empty(namespace.amqp_url, [files_lane(namespace)])


async def test_a_store_failure_is_a_503_even_when_the_copy_cannot_be_deleted_either(
    undeletable: httpx.AsyncClient,
    tmp_path: Path,
    blob_dir: Path,
    namespace: Namespace,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The failed delete was a 500 without Retry-After, hiding the 503 the client retries on.
    with sqlite3.connect(tmp_path / "gateway.sqlite3") as store:
        store.execute("ALTER TABLE files RENAME TO files_away")
    with caplog.at_level(logging.ERROR, logger="courier"):
        response = await undeletable.post("/v1/files", files={"file": ("p.csv", CSV, "text/csv")})
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"]
    [left] = stored_files(blob_dir)  # for the retention sweep: no record points to it
    assert any(
        "could not delete an unused copy" in r.getMessage() and left.name in (r.exc_text or "")
        for r in caplog.records
    )
    await assert_empty(namespace.amqp_url, [files_lane(namespace)])


async def test_a_repeat_gets_the_first_answer_even_when_its_copy_cannot_be_deleted(
    undeletable: httpx.AsyncClient, namespace: Namespace, blob_dir: Path
) -> None:
    key = {"idempotency-key": "upload-13"}
    first = await undeletable.post(
        "/v1/files", files={"file": ("p.csv", CSV, "text/csv")}, headers=key
    )
    again = await undeletable.post(
        "/v1/files", files={"file": ("p.csv", CSV, "text/csv")}, headers=key
    )
    assert first.status_code == again.status_code == 202, again.text
    assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
    assert len(stored_files(blob_dir)) == 2  # the repeat's copy, left for the sweep
    [announced] = await take(namespace.amqp_url, files_lane(namespace), 1)
    assert announced.message_id == first.json()["id"]
    await assert_empty(namespace.amqp_url, [files_lane(namespace)])


def form(*parts: tuple[str, str | tuple[str, bytes, str]]) -> bytes:
    """A multipart body with the parts in exactly this order (httpx puts fields first)."""
    body = b""
    for name, value in parts:
        if isinstance(value, str):
            head = f'Content-Disposition: form-data; name="{name}"\r\n\r\n'
            data = value.encode()
        else:
            filename, data, content_type = value
            head = (
                f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                f"Content-Type: {content_type}\r\n\r\n"
            )
        body += f"--{BOUNDARY}\r\n{head}".encode() + data + b"\r\n"
    return body + f"--{BOUNDARY}--\r\n".encode()


async def test_notify_targets_before_and_after_the_file_travel_with_it(
    client: httpx.AsyncClient, namespace: Namespace
) -> None:
    body = form(
        ("notify", "webhook:https://hooks.example.com/files"),
        ("comment", "ignored"),
        ("file", ("prices.csv", CSV, "text/csv")),
        ("notify", "email:ops@example.com"),
        ("notify", "webhook:https://hooks.example.com/files"),  # named twice: kept once
        ("notify", "log:ops"),
    )
    response = await client.post("/v1/files", content=body, headers=MULTIPART)
    assert response.status_code == 202, response.text

    [message] = await take(namespace.amqp_url, files_lane(namespace), 1)
    event = EVENT_ADAPTER.validate_json(message.body)
    assert isinstance(event, FileUploaded)
    assert [(t.channel, t.recipient) for t in event.data.notify] == [
        ("webhook", "https://hooks.example.com/files"),
        ("email", "ops@example.com"),
        ("log", "ops"),
    ]
    assert event.data.size == len(CSV)


async def test_notify_fields_sent_by_a_form_client_are_read(
    client: httpx.AsyncClient, namespace: Namespace
) -> None:
    response = await client.post(
        "/v1/files",
        files={"file": ("prices.csv", CSV, "text/csv")},
        data={"notify": ["email:a@example.com", "email:b@example.com"]},
    )
    assert response.status_code == 202, response.text
    [message] = await take(namespace.amqp_url, files_lane(namespace), 1)
    event = EVENT_ADAPTER.validate_json(message.body)
    assert isinstance(event, FileUploaded)
    assert [t.recipient for t in event.data.notify] == ["a@example.com", "b@example.com"]


@pytest.mark.parametrize("file_first", [True, False], ids=["after-the-file", "before-the-file"])
@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("sms:+4412345", "unknown channel 'sms'"),
        ("webhook:file:///etc/passwd", "must be http or https"),
        ("email:nobody", "not a valid recipient address"),
        ("ops@example.com", "expected <channel>:<recipient>"),
    ],
)
async def test_a_bad_notify_target_is_a_422_that_stores_and_publishes_nothing(
    client: httpx.AsyncClient,
    namespace: Namespace,
    blob_dir: Path,
    file_first: bool,
    value: str,
    says: str,
) -> None:
    file_part = ("file", ("prices.csv", CSV, "text/csv"))
    notify = ("notify", value)
    body = form(file_part, notify) if file_first else form(notify, file_part)
    response = await client.post("/v1/files", content=body, headers=MULTIPART)
    assert response.status_code == 422, response.text
    assert says in response.json()["detail"]
    assert stored_files(blob_dir) == []
    await assert_empty(namespace.amqp_url, [files_lane(namespace)])


async def test_a_callback_url_travels_with_the_file(
    client: httpx.AsyncClient, namespace: Namespace
) -> None:
    response = await client.post(
        "/v1/files",
        files={"file": ("prices.csv", CSV, "text/csv")},
        data={"callback_url": "https://shop.example/hooks/files"},
    )
    assert response.status_code == 202, response.text
    [message] = await take(namespace.amqp_url, files_lane(namespace), 1)
    event = EVENT_ADAPTER.validate_json(message.body)
    assert isinstance(event, FileUploaded)
    assert event.callbackurl == "https://shop.example/hooks/files"


async def test_a_blank_callback_url_is_no_callback_url(
    client: httpx.AsyncClient, namespace: Namespace
) -> None:
    # An HTML form sends an input left blank as an empty field.
    response = await client.post(
        "/v1/files",
        files={"file": ("prices.csv", CSV, "text/csv")},
        data={"callback_url": " "},
    )
    assert response.status_code == 202, response.text
    [message] = await take(namespace.amqp_url, files_lane(namespace), 1)
    event = EVENT_ADAPTER.validate_json(message.body)
    assert isinstance(event, FileUploaded) and event.callbackurl is None


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ([("callback_url", "ftp://shop.example/hook")], "must be http or https, not 'ftp'"),
        ([("callbackurl", "https://user:pw@shop.example/")], "must not carry credentials"),
        ([("callback_url", "https://shop.example/" + "a" * 2048)], "at most 2048 characters"),
        ([("callback_url", "https://shop.example:0/hook")], "has port 0"),
        ([("callback_url", "https://" + "a" * 64 + ".example/")], "not a valid DNS name"),
        (
            [("callback_url", "https://a.example/"), ("callback_url", "https://b.example/")],
            "one callback_url per upload",
        ),
    ],
    ids=["not-http", "credentials", "too-long", "port-0", "no-dns-name", "twice"],
)
async def test_a_bad_callback_url_is_a_422_that_stores_and_publishes_nothing(
    client: httpx.AsyncClient,
    namespace: Namespace,
    blob_dir: Path,
    fields: list[tuple[str, str]],
    says: str,
) -> None:
    body = form(("file", ("prices.csv", CSV, "text/csv")), *fields)
    response = await client.post("/v1/files", content=body, headers=MULTIPART)
    assert response.status_code == 422, response.text
    assert says in response.json()["detail"]
    assert stored_files(blob_dir) == []
    await assert_empty(namespace.amqp_url, [files_lane(namespace)])


@pytest.mark.parametrize(
    ("field", "says"),
    [
        (("notify", "email:ops@example.com"), "does not deliver on the 'email' channel"),
        (("callback_url", "https://shop.example/hooks"), "callbacks are posted as webhooks"),
    ],
    ids=["target", "callback"],
)
async def test_what_the_configured_channels_cannot_deliver_is_a_422_that_stores_nothing(
    namespace: Namespace,
    tmp_path: Path,
    blob_dir: Path,
    field: tuple[str, str],
    says: str,
) -> None:
    settings = gateway_settings(namespace, tmp_path, blob_dir=blob_dir, notify_channels=("log",))
    async for client in gateway_client(settings):
        body = form(("file", ("prices.csv", CSV, "text/csv")), field)
        response = await client.post("/v1/files", content=body, headers=MULTIPART)
        assert response.status_code == 422, response.text
        assert says in response.json()["detail"]
        assert stored_files(blob_dir) == []
    await assert_empty(namespace.amqp_url, [files_lane(namespace)])


async def test_a_keyed_repeat_with_another_callback_url_is_a_conflict(
    client: httpx.AsyncClient, namespace: Namespace
) -> None:
    def upload(url: str) -> Awaitable[httpx.Response]:
        return client.post(
            "/v1/files",
            files={"file": ("prices.csv", CSV, "text/csv")},
            data={"callback_url": url},
            headers={"Idempotency-Key": "upload-with-callback"},
        )

    first = await upload("https://shop.example/hooks/a")
    assert first.status_code == 202, first.text
    assert (await upload("https://shop.example/hooks/a")).json() == first.json()
    assert (await upload("https://shop.example/hooks/b")).status_code == 409
    await take(namespace.amqp_url, files_lane(namespace), 1)
    await assert_empty(namespace.amqp_url, [files_lane(namespace)])


async def test_more_than_ten_notify_targets_are_refused(
    client: httpx.AsyncClient, namespace: Namespace, blob_dir: Path
) -> None:
    targets = [("notify", f"log:team-{n}") for n in range(11)]
    body = form(*targets, ("file", ("prices.csv", CSV, "text/csv")))
    response = await client.post("/v1/files", content=body, headers=MULTIPART)
    assert response.status_code == 422, response.text
    assert "at most 10 notify targets" in response.json()["detail"]
    assert stored_files(blob_dir) == []
    await assert_empty(namespace.amqp_url, [files_lane(namespace)])


@pytest.mark.parametrize("charset", ["utf-16", "ISO-8859-1"])
async def test_a_file_declared_in_a_charset_other_than_utf8_is_refused_at_upload(
    client: httpx.AsyncClient, namespace: Namespace, blob_dir: Path, charset: str
) -> None:
    # It was taken (202), then dead-lettered by the analysis as "not valid UTF-8".
    body = form(("file", ("prices.csv", CSV, f"text/csv; charset={charset}")))
    response = await client.post("/v1/files", content=body, headers=MULTIPART)
    assert response.status_code == 415, response.text
    assert "read as UTF-8" in response.json()["detail"]
    assert stored_files(blob_dir) == []
    await assert_empty(namespace.amqp_url, [files_lane(namespace)])


async def test_a_file_declared_utf8_is_taken(client: httpx.AsyncClient) -> None:
    body = form(("file", ("prices.csv", CSV, "text/csv; charset=UTF-8")))
    response = await client.post("/v1/files", content=body, headers=MULTIPART)
    assert response.status_code == 202, response.text


@pytest.mark.parametrize(
    ("fields", "status", "says"),
    [
        # 80 MB of tiny fields kept the gateway's loop busy for half a minute (a few MB/s).
        ([("o", "x" * 32_768)] * 34, 413, "bytes besides the file"),  # 1.06 MiB
        ([("o", "x")] * (MAX_PARTS + 1), 400, f"more than {MAX_PARTS} parts"),
    ],
    ids=["form-fields-too-large", "too-many-parts"],
)
async def test_what_is_not_the_file_is_bounded(
    client: httpx.AsyncClient,
    namespace: Namespace,
    blob_dir: Path,
    fields: list[tuple[str, str]],
    status: int,
    says: str,
) -> None:
    body = form(("file", ("prices.csv", CSV, "text/csv")), *fields)
    response = await client.post("/v1/files", content=body, headers=MULTIPART)
    assert response.status_code == status, response.text
    assert says in response.json()["detail"]
    assert stored_files(blob_dir) == []
    await assert_empty(namespace.amqp_url, [files_lane(namespace)])


async def test_an_upload_with_a_correlation_header_that_is_no_id_is_refused_and_leaves_nothing(
    client: httpx.AsyncClient, namespace: Namespace, blob_dir: Path
) -> None:
    """It becomes the announcement's correlation id: unchecked, the announcement failed to
    build after the file was stored (a 500, and a record and a copy left behind)."""
    response = await client.post(
        "/v1/files",
        files={"file": ("prices.csv", CSV, "text/csv")},
        headers={"x-correlation-id": "tab\tin-it"},
    )
    assert response.status_code == 422, response.text
    assert "X-Correlation-ID" in response.text
    assert stored_files(blob_dir) == []
    await assert_empty(namespace.amqp_url, [files_lane(namespace)])


async def test_a_client_gone_mid_upload_is_a_400_that_leaves_nothing(
    namespace: Namespace, tmp_path: Path, blob_dir: Path
) -> None:
    # Uvicorn turns a dropped connection into `http.disconnect`; the upload raised
    # ClientDisconnect out of the app, a 500 with a traceback as if the gateway had failed.
    part = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.csv"\r\n'
        "Content-Type: text/csv\r\n\r\n"
    ).encode() + b"x" * 300_000
    received: list[Message] = [
        {"type": "http.request", "body": part, "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[Message] = []

    async def receive() -> Message:
        return received.pop(0) if received else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/files",
        "raw_path": b"/v1/files",
        "query_string": b"",
        "root_path": "",
        "server": ("gateway", 80),
        "client": ("client", 1),
        "headers": [(b"content-type", MULTIPART["content-type"].encode())],
        "state": {},
    }
    apps: list[FastAPI] = []
    settings = gateway_settings(namespace, tmp_path, blob_dir=blob_dir)
    async for _ in gateway_client(settings, started=apps.append):
        await apps[0](scope, receive, send)
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [400]
    assert stored_files(blob_dir) == []
    await assert_empty(namespace.amqp_url, [files_lane(namespace)])


async def test_a_slow_upload_still_sending_is_not_swept_as_abandoned(
    monkeypatch: pytest.MonkeyPatch, namespace: Namespace, tmp_path: Path, blob_dir: Path
) -> None:
    """The hourly sweep removes a partial upload nobody wrote to for an hour (its writer died).
    A live upload kept its file's bytes in a 1 MiB block until the block was full: a client
    within the minimum body rate (240 bytes a second fills a block in 73 minutes) left the
    partial file untouched for over an hour, the sweep removed it under the upload, and the
    commit after all that sending failed (a 503). Here the hour is a second."""
    monkeypatch.setattr("services.gateway.uploads.WRITE_THROUGH_SECONDS", 0.2)
    apps: list[FastAPI] = []

    async def trickled() -> AsyncIterator[bytes]:
        yield (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; '
            'filename="slow.csv"\r\nContent-Type: text/csv\r\n\r\nsku,price\n'
        ).encode()
        for n in range(15):  # 1.5 s of a live client, far below a block
            yield f"s{n},{n}\n".encode()
            await asyncio.sleep(0.1)
        app = apps[0]
        await app.state.files.sweep(app.state.blobs, timedelta(seconds=1))
        yield f"\r\n--{BOUNDARY}--\r\n".encode()

    settings = gateway_settings(namespace, tmp_path, blob_dir=blob_dir)
    async for client in gateway_client(settings, started=apps.append):
        response = await client.post("/v1/files", content=trickled(), headers=MULTIPART)
        assert response.status_code == 202, response.text
        file_id = response.json()["id"]
        expected = b"sku,price\n" + b"".join(f"s{n},{n}\n".encode() for n in range(15))
        assert (blob_dir / file_id).read_bytes() == expected
        [message] = await take(namespace.amqp_url, files_lane(namespace), 1)
        assert message.message_id == file_id


async def test_an_upload_that_finds_blob_storage_full_is_a_503_that_says_so(
    namespace: Namespace, tmp_path: Path, blob_dir: Path
) -> None:
    # It said "the gateway could not reach its store", sending operators to the database.
    def full(app: FastAPI) -> None:
        app.state.blobs = FullBlobs(blob_dir)

    settings = gateway_settings(namespace, tmp_path, blob_dir=blob_dir)
    async for client in gateway_client(settings, started=full):
        response = await client.post(
            "/v1/files", files={"file": ("a.csv", b"a,b\n1,2\n", "text/csv")}
        )
        assert response.status_code == 503, response.text
        assert response.json()["detail"] == (
            "the gateway could not store the file (No space left on device); retry later"
        )
        assert response.headers["retry-after"]
        assert stored_files(blob_dir) == []
