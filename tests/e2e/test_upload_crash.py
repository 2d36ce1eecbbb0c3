"""A gateway killed between an upload's record and the broker's confirm (real processes).

The broker never got the announcement (a proxy swallows it), the client never got an answer,
and the process that knew is gone. The file is recorded with its announcement; the next gateway
on the same store publishes it, under the file's id, and the processor's lane has it.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import httpx
import pytest

from contracts.events import EVENT_ADAPTER
from contracts.files import FileUploaded
from contracts.topology import queue_for
from tests.conftest import Namespace
from tests.support.polling import eventually
from tests.support.processes import ServiceProcess, base_url, gateway
from tests.support.queues import assert_empty, take
from tests.support.tcp_proxy import ProxyMode, TcpProxy

pytestmark = [pytest.mark.e2e, pytest.mark.broker]

CSV = b"sku,price\na,10\nb,30\n"


def recorded_file(workdir: Path) -> str:
    """The id of the one file the gateway's store records."""
    with sqlite3.connect(workdir / "gateway-data" / "gateway.sqlite3", timeout=5) as store:
        rows = store.execute("SELECT file_id FROM files").fetchall()
    assert len(rows) == 1, rows
    file_id: str = rows[0][0]
    return file_id


async def started(process: ServiceProcess) -> ServiceProcess:
    process.start()
    return await asyncio.to_thread(process.wait_ready)


async def test_an_upload_a_killed_gateway_never_saw_confirmed_is_announced_by_the_next(
    namespace: Namespace, tmp_path: Path
) -> None:
    env = {"COURIER_BLOB_DIR": str(tmp_path / "blobs"), "COURIER_LOG_LEVEL": "INFO"}
    async with TcpProxy("127.0.0.1", 5672) as proxy:
        proxy_url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
        first = gateway(
            namespace.env(**env, AMQP_URL=proxy_url, COURIER_PUBLISH_TIMEOUT="5"), tmp_path
        )
        await started(first)
        try:
            proxy.set_mode(ProxyMode.BLACKHOLE)  # the announcement is written, never confirmed
            async with httpx.AsyncClient(base_url=base_url(first), timeout=30) as client:
                upload = asyncio.create_task(
                    client.post("/v1/files", files={"file": ("p.csv", CSV, "text/csv")})
                )
                file_id = await eventually(lambda: asyncio.to_thread(recorded_file, tmp_path))
                first.kill()  # while the publish waits for its confirm
                with pytest.raises(httpx.TransportError):
                    await upload  # no answer: the client cannot know the file's id
        finally:
            first.kill()
            proxy.set_mode(ProxyMode.REFUSE)
            proxy.reset_all()

    lane = queue_for(namespace.name, "processor", "file.uploaded")
    await assert_empty(namespace.amqp_url, [lane])  # the broker never had it
    second = gateway(namespace.env(**env, COURIER_PUBLISH_TIMEOUT="1"), tmp_path)
    await started(second)
    try:
        [announced] = await take(namespace.amqp_url, lane, 1, timeout=30)
        event = EVENT_ADAPTER.validate_json(announced.body)
        assert isinstance(event, FileUploaded)
        assert announced.message_id == event.data.file_id == file_id

        async def settled() -> None:
            async with httpx.AsyncClient(base_url=base_url(second), timeout=5) as client:
                status = (await client.get(f"/v1/files/{file_id}")).json()
            assert status["status"] == "pending" and "detail" not in status, status

        await eventually(settled)
    finally:
        second.kill()
