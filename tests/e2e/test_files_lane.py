"""The processor's files lane, with a real processor process: a file in analysis holds back
only the files behind it, which wait in their queue, not in a prefetch window."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage

from contracts.envelope import Envelope, derived_event_id
from contracts.events import EVENT_ADAPTER, DatasetSubmitted, DatasetSubmittedData
from contracts.files import FileUploaded, FileUploadedData
from contracts.topology import dead_letter_queue, events_exchange, queue_for, work_queue
from services.blobs import LocalBlobStore
from services.messaging.declare import declare_topology
from services.messaging.publisher import Publisher
from tests.conftest import Namespace
from tests.support.held_blob import HeldBlob
from tests.support.polling import eventually
from tests.support.processes import ServiceProcess, consumer
from tests.support.queues import assert_empty, ready_messages, take

pytestmark = [pytest.mark.e2e, pytest.mark.broker]

CSV = b"sku,price\na,10\nb,30\n"


def file_uploaded(blob: str, content: bytes) -> FileUploaded:
    return FileUploaded(
        data=FileUploadedData(
            file_id=str(uuid.uuid4()),
            blob=blob,
            name=f"{blob}.csv",
            content_type="text/csv",
            size=len(content),
            sha256=hashlib.sha256(content).hexdigest(),
        )
    )


def large_dataset() -> DatasetSubmitted:
    # More values than the processor summarises on its loop: it needs a CPU worker.
    records: list[dict[str, int | str]] = [{"n": i, "label": f"r{i}"} for i in range(400)]
    return DatasetSubmitted(data=DatasetSubmittedData.model_validate({"records": records}))


@contextmanager
def running_processor(namespace: Namespace, tmp_path: Path) -> Iterator[ServiceProcess]:
    """A processor with two CPU workers and the default files prefetch (one less: 1)."""
    env = namespace.env(
        COURIER_BLOB_DIR=str(tmp_path / "blobs"),
        COURIER_CPU_WORKERS="2",
        COURIER_LOG_LEVEL="INFO",
    )
    service = consumer("processor", env, tmp_path).start()
    try:
        yield service.wait_ready()
    finally:
        service.terminate()


@pytest.fixture
def processor(namespace: Namespace, tmp_path: Path) -> Iterator[ServiceProcess]:
    with running_processor(namespace, tmp_path) as service:
        yield service


@asynccontextmanager
async def held(path: Path, content: bytes) -> AsyncIterator[HeldBlob]:
    blob = HeldBlob(path, content)
    try:
        yield blob
    finally:
        blob.close()


Publish = Callable[[Envelope], Awaitable[None]]


@asynccontextmanager
async def publishing(namespace: Namespace) -> AsyncIterator[Publish]:
    """Confirmed publishes into the namespace's exchange, with every service's topology
    declared first (what the gateway and notifier would), so nothing the processor publishes
    is unroutable."""
    connection = await aio_pika.connect(namespace.amqp_url)
    async with connection:
        await declare_topology(connection, namespace.settings().all_topologies())
    publisher = Publisher(namespace.amqp_url)
    await publisher.connect()
    try:
        yield lambda event: publisher.publish_event(event, exchange=events_exchange(namespace.name))
    finally:
        await publisher.close()


def subjects(messages: Sequence[AbstractIncomingMessage]) -> set[str | None]:
    return {EVENT_ADAPTER.validate_json(m.body).subject for m in messages}


async def test_files_wait_in_their_lane_while_datasets_pass(
    namespace: Namespace, tmp_path: Path, processor: ServiceProcess
) -> None:
    blobs = LocalBlobStore(tmp_path / "blobs")
    blobs.root.mkdir(parents=True, exist_ok=True)
    blobs.path("queued").write_bytes(CSV)
    lane = queue_for(namespace.name, "processor", "file.uploaded")
    announced = work_queue(namespace.name, "notifier")  # where the analyses and results go
    first, second = file_uploaded("held", CSV), file_uploaded("queued", CSV)
    dataset = large_dataset()
    async with publishing(namespace) as publish, held(blobs.path("held"), CSV) as blob:
        await publish(first)

        async def in_analysis() -> None:
            assert blob.taken()

        await eventually(in_analysis)
        await publish(second)
        await publish(dataset)
        # The dataset is summarised in the other worker while the first file is analysed ...
        assert subjects(await take(namespace.amqp_url, announced, 1)) == {dataset.id}
        # ... and the second file was not delivered: it waits in the lane's queue.
        assert await ready_messages(namespace.amqp_url, lane) == 1
        blob.release()
        assert subjects(await take(namespace.amqp_url, announced, 2)) == {first.id, second.id}
    await assert_empty(namespace.amqp_url, [lane, work_queue(namespace.name, "processor")])


async def bind_files_to_the_work_queue(namespace: Namespace) -> None:
    """What processors before the lane did, at every start and reconnect."""
    connection = await aio_pika.connect(namespace.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(work_queue(namespace.name, "processor"))
        await queue.bind(events_exchange(namespace.name), routing_key="file.uploaded")


async def test_a_starting_processor_takes_the_earlier_versions_files_binding_away(
    namespace: Namespace, tmp_path: Path
) -> None:
    async with publishing(namespace) as publish:
        await bind_files_to_the_work_queue(namespace)
        with running_processor(namespace, tmp_path):
            # The blob is missing: the analysis fails at once, and the file is dead-lettered
            # once, from the lane; a second copy in the work queue would be a second letter.
            await publish(file_uploaded("missing", CSV))
            dead = await take(namespace.amqp_url, dead_letter_queue(namespace.name, "processor"), 1)
    assert dict(dead[0].headers)["courier-queue"] == queue_for(
        namespace.name, "processor", "file.uploaded"
    )
    await assert_empty(
        namespace.amqp_url,
        [work_queue(namespace.name, "processor"), dead_letter_queue(namespace.name, "processor")],
    )


async def test_a_file_still_routed_to_the_work_queue_too_is_analysed_once(
    namespace: Namespace, tmp_path: Path, processor: ServiceProcess
) -> None:
    # An earlier version's processor binds the work queue to files again when it (re)starts
    # beside upgraded ones: the copy that comes second waits for the first, then finds it in
    # the inbox (and sends its recorded analysis again, under the same id).
    blobs = LocalBlobStore(tmp_path / "blobs")
    work = work_queue(namespace.name, "processor")
    lane = queue_for(namespace.name, "processor", "file.uploaded")
    uploaded = file_uploaded("held", CSV)
    async with publishing(namespace) as publish, held(blobs.path("held"), CSV) as blob:
        await bind_files_to_the_work_queue(namespace)
        await publish(uploaded)

        async def both_copies_taken() -> None:
            assert blob.taken()
            assert await ready_messages(namespace.amqp_url, work) == 0
            assert await ready_messages(namespace.amqp_url, lane) == 0

        await eventually(both_copies_taken)
        blob.release()
        copies = await take(namespace.amqp_url, work_queue(namespace.name, "notifier"), 2)
    events = [EVENT_ADAPTER.validate_json(m.body) for m in copies]
    assert {e.id for e in events} == {derived_event_id(uploaded.id, "file.processed")}
    assert events[0] == events[1]

    # The second copy's analysis is confirmed before that copy is acked and logged.
    async def skipped_once() -> None:
        assert processor.log_path.read_text().count('"skipped duplicate"') == 1

    await eventually(skipped_once)
