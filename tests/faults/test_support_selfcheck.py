"""Self-check of the fault-injection support: the private RabbitMQ node and the TCP proxy.

One private node serves the whole module. The tests run in file order and the last one tears the
node down (the fixture's own teardown is then a no-op).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection
from pamqp.common import FieldTable

from tests.support.polling import eventually, eventually_sync
from tests.support.rabbit_node import PrivateRabbitNode
from tests.support.tcp_proxy import ProxyMode, TcpProxy, ThreadedTcpProxy

pytestmark = pytest.mark.faults

log = logging.getLogger(__name__)

QUORUM: FieldTable = {"x-queue-type": "quorum"}
# RABBITMQ-NOTES.md, 3.10.8 defect: a quorum queue killed within about a second of its declaration
# can come back without a leader. Nothing observable tells when it is safe, so wait this long.
SETTLE_SECONDS = 2.0
AMQP_0_9_1_HEADER = b"AMQP\x00\x00\x09\x01"


@pytest.fixture(scope="module")
def node() -> Iterator[PrivateRabbitNode]:
    with PrivateRabbitNode(name_prefix="courier-selfcheck") as rabbit:
        log.info("private node %s booted in %.1fs", rabbit.node_name, rabbit.timings["boot"])
        yield rabbit


@pytest.fixture
async def proxy(node: PrivateRabbitNode) -> AsyncIterator[TcpProxy]:
    async with TcpProxy("127.0.0.1", node.amqp_port) as tcp_proxy:
        yield tcp_proxy


async def publish_confirmed(url: str, queue: str, body: bytes) -> None:
    """Declare a durable quorum queue and publish one persistent message, confirmed."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(on_return_raises=True)
        await channel.declare_queue(queue, durable=True, arguments=QUORUM)
        message = aio_pika.Message(
            body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, message_id=uuid.uuid4().hex
        )
        await channel.default_exchange.publish(message, routing_key=queue, mandatory=True)


async def take_one(url: str, queue: str, timeout: float = 10.0) -> bytes:
    """Get and ack one message from ``queue`` (polling with a deadline: counts can lag)."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, durable=True, arguments=QUORUM)

        async def one() -> bytes:
            message = await declared.get(fail=False)
            assert message is not None, f"no message in {queue} yet"
            await message.ack()
            return message.body

        return await eventually(one, timeout=timeout)


def closed_future(connection: AbstractConnection) -> asyncio.Future[BaseException | None]:
    """A future resolved with the close reason once ``connection`` closes."""
    future: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()

    def on_close(_: object, exc: BaseException | None = None) -> None:
        if not future.done():
            future.set_result(exc)

    connection.close_callbacks.add(on_close)
    return future


async def test_node_serves_a_quorum_queue(node: PrivateRabbitNode) -> None:
    assert node.is_running
    assert node.registered_in_epmd()
    await publish_confirmed(node.amqp_url, "selfcheck.basic", b"hello")

    assert await take_one(node.amqp_url, "selfcheck.basic") == b"hello"
    assert "selfcheck.basic" in await asyncio.to_thread(node.list_queues)
    assert await asyncio.to_thread(node.quorum_leaders_ok, ["selfcheck.basic"])


async def test_graceful_restart_keeps_a_persistent_message(node: PrivateRabbitNode) -> None:
    await publish_confirmed(node.amqp_url, "selfcheck.graceful", b"survives stop_app")

    await asyncio.to_thread(node.stop_app)
    await asyncio.to_thread(node.start_app)
    await asyncio.to_thread(node.wait_for_leaders, ["selfcheck.graceful"], 30.0)

    log.info("stop_app %.1fs, start_app %.1fs", node.timings["stop_app"], node.timings["start_app"])
    assert await take_one(node.amqp_url, "selfcheck.graceful") == b"survives stop_app"


async def test_kill_and_restart_keep_a_confirmed_message(node: PrivateRabbitNode) -> None:
    declared_at = time.monotonic()
    await publish_confirmed(node.amqp_url, "selfcheck.killed", b"survives kill -9")
    await asyncio.sleep(max(0.0, declared_at + SETTLE_SECONDS - time.monotonic()))

    await asyncio.to_thread(node.kill)
    assert not node.is_running
    await asyncio.to_thread(node.restart_after_kill)
    await asyncio.to_thread(node.wait_for_leaders, ["selfcheck.killed"], 30.0)

    log.info("restart after kill -9: %.1fs", node.timings["restart_after_kill"])
    assert await take_one(node.amqp_url, "selfcheck.killed") == b"survives kill -9"


async def test_proxy_passes_broker_traffic(node: PrivateRabbitNode, proxy: TcpProxy) -> None:
    url = node.amqp_url_via(proxy.port)
    await publish_confirmed(url, "selfcheck.proxied", b"through the proxy")

    assert await take_one(url, "selfcheck.proxied") == b"through the proxy"
    assert proxy.accepted == 2


async def test_proxy_reset_all_is_noticed_by_aio_pika(
    node: PrivateRabbitNode, proxy: TcpProxy
) -> None:
    connection = await aio_pika.connect(node.amqp_url_via(proxy.port))
    closed = closed_future(connection)

    assert proxy.reset_all() == 1
    async with asyncio.timeout(5):
        reason = await closed

    # A plain aio-pika connection whose socket died is not `is_closed` (only close() sets that):
    # the close callbacks and the `connected` event are what tell.
    assert reason is not None
    assert not connection.connected.is_set()
    await connection.close()


async def test_robust_connection_comes_back_after_reset(
    node: PrivateRabbitNode, proxy: TcpProxy
) -> None:
    connection = await aio_pika.connect_robust(
        node.amqp_url_via(proxy.port), reconnect_interval=0.2
    )
    async with connection:
        reconnected = asyncio.get_running_loop().create_future()
        connection.reconnect_callbacks.add(lambda *_: reconnected.set_result(None))

        proxy.reset_all()
        async with asyncio.timeout(10):
            await reconnected
        channel = await connection.channel()
        await channel.declare_queue("selfcheck.reconnected", durable=True, arguments=QUORUM)
    assert proxy.accepted == 2


async def test_proxy_refuse_mode_refuses_new_connections(
    node: PrivateRabbitNode, proxy: TcpProxy
) -> None:
    proxy.set_mode(ProxyMode.REFUSE)
    with pytest.raises(aio_pika.exceptions.AMQPConnectionError):
        await aio_pika.connect(node.amqp_url_via(proxy.port), timeout=5)

    proxy.set_mode(ProxyMode.PASS)
    connection = await aio_pika.connect(node.amqp_url_via(proxy.port), timeout=5)
    await connection.close()


async def test_proxy_blackhole_drops_bytes_both_ways_and_reset_sends_rst() -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1024):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    echo_port = server.sockets[0].getsockname()[1]
    async with server, TcpProxy("127.0.0.1", echo_port) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"ping")
        async with asyncio.timeout(5):
            assert await reader.readexactly(4) == b"ping"

        proxy.set_mode(ProxyMode.BLACKHOLE)
        writer.write(b"lost")
        late_reader, late_writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        late_writer.write(b"also lost")
        for stream in (reader, late_reader):
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):
                    await stream.read(1)
        assert proxy.open_connections == 2

        assert proxy.reset_all() == 2
        for stream in (reader, late_reader):
            with pytest.raises(ConnectionResetError):
                async with asyncio.timeout(5):
                    await stream.read(1)
        for stream_writer in (writer, late_writer):
            stream_writer.close()
            with pytest.raises(ConnectionResetError):
                await stream_writer.wait_closed()


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "connection closed early"
        data += chunk
    return data


def test_threaded_proxy_serves_sync_code(node: PrivateRabbitNode) -> None:
    with ThreadedTcpProxy("127.0.0.1", node.amqp_port) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
            sock.sendall(AMQP_0_9_1_HEADER)
            frame_type, _, size = struct.unpack(">BHI", recv_exactly(sock, 7))
            assert frame_type == 1  # a method frame: Connection.Start
            recv_exactly(sock, size + 1)  # payload and frame-end octet
            assert proxy.reset_all() == 1
            with pytest.raises(ConnectionResetError):
                sock.recv(1024)

        proxy.set_mode("refuse")
        # The RST can come before connect() has returned (it then raises) or just after it.
        with (
            pytest.raises(ConnectionResetError),
            socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock,
        ):
            sock.recv(1024)


def test_teardown_stops_the_node_and_removes_its_directory(node: PrivateRabbitNode) -> None:
    # Last in the module on purpose: it ends the module's node.
    node.teardown()

    log.info("teardown %.1fs", node.timings["teardown"])
    assert not node.is_running
    assert not node.base_dir.exists()

    def name_gone() -> None:
        assert not node.registered_in_epmd()

    eventually_sync(name_gone, timeout=5)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", node.amqp_port), timeout=2).close()
