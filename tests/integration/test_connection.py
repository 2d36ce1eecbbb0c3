"""Opening a connection to a real broker: a connect cut short leaves nothing running, and one
the broker never answers ends, a reconnect too."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import orjson
import pytest
from aio_pika.abc import AbstractIncomingMessage

from services.messaging.connection import NEXT_NODE_AFTER, FailoverConnection, open_connection
from services.messaging.logs import configure_logging
from tests.conftest import Namespace
from tests.support.polling import eventually
from tests.support.processes import free_port
from tests.support.tcp_proxy import ProxyMode, TcpProxy

pytestmark = pytest.mark.broker


def _others() -> set[asyncio.Task[object]]:
    return asyncio.all_tasks() - {asyncio.current_task()}


@contextlib.asynccontextmanager
async def silent_broker() -> AsyncIterator[tuple[int, list[asyncio.StreamWriter]]]:
    """A broker that takes TCP connections and never starts the handshake (RabbitMQ out of file
    handles, say): its port, and the connections it holds."""
    held: list[asyncio.StreamWriter] = []

    async def silent(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], held
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_a_connect_cancelled_at_any_point_leaves_no_task_behind(amqp_url: str) -> None:
    # A service stopping while it connects cancels the connect; a reconnecting task left
    # behind would keep the process from ever ending. Cancelled after 0, 2, 4, … turns of the
    # loop until the connect gets through: every stage of the handshake is cut once.
    cut = 0
    for turns in range(0, 1000, 2):
        connecting = asyncio.create_task(open_connection(amqp_url, heartbeat=30, name="cut"))
        for _ in range(turns):
            await asyncio.sleep(0)
        if connecting.done():
            await connecting.result().close()
            break
        connecting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await connecting
        await asyncio.sleep(0.05)  # what a reconnecting task would take to show itself
        assert not _others(), f"cancelled after {turns} turns"
        cut += 1
    assert cut > 5  # the connect was cut at several stages, not only before it began


async def test_a_broker_that_takes_the_connection_but_never_answers_is_a_failed_connect() -> None:
    """As RabbitMQ out of file handles does: it accepts TCP and starts no handshake."""
    async with silent_broker() as (port, held):
        with pytest.raises(ConnectionError, match=r"did not answer within 0\.5 s"):
            await open_connection(
                f"amqp://guest:guest@127.0.0.1:{port}/",
                heartbeat=30,
                name="silent",
                answer_within=0.5,
            )
        assert held  # it did connect
        await asyncio.sleep(0.05)
        assert not _others()  # and left nothing running


async def test_a_reconnect_to_a_broker_that_never_answers_is_cut_and_tried_again(
    amqp_url: str,
) -> None:
    """After the broker went, the first reconnect met one that took the connection and never
    answered (out of file handles, a load balancer holding it): it waited for ever, the
    service unready though the broker came back."""
    broker = urlsplit(amqp_url)
    async with TcpProxy(broker.hostname or "127.0.0.1", broker.port or 5672) as proxy:
        connection = await open_connection(
            f"amqp://guest:guest@127.0.0.1:{proxy.port}/?reconnect_interval=0.5",
            heartbeat=30,
            name="reconnecting",
            answer_within=3,  # 1 s was too short for a handshake on a loaded 2-core host
        )
        try:
            proxy.set_mode(ProxyMode.BLACKHOLE)
            proxy.reset_all()  # the broker goes; new connections are taken, never answered
            before = proxy.accepted

            async def tried_again() -> None:
                assert proxy.accepted >= before + 2  # the first attempt was cut

            await eventually(tried_again, timeout=20)
            proxy.set_mode(ProxyMode.PASS)
            await asyncio.wait_for(connection.connected.wait(), 10)
        finally:
            await connection.close()


async def test_a_cluster_node_that_refuses_is_passed_over_for_the_next(amqp_url: str) -> None:
    """`AMQP_URL` lists a cluster's nodes: the first is down, the connection is made to the
    next that answers."""
    down = f"amqp://guest:guest@127.0.0.1:{free_port()}/"  # nothing listens there
    connection = await open_connection(f"{down},{amqp_url}", heartbeat=30, name="failover")
    try:
        assert isinstance(connection, FailoverConnection)
        assert connection.url.port == (urlsplit(amqp_url).port or 5672)
        channel = await connection.channel()
        await channel.close()
    finally:
        await connection.close()


async def test_connection_options_are_read_from_the_first_listed_url_whichever_node_answers(
    amqp_url: str,
) -> None:
    """aio-pika reads its own options (`reconnect_interval`, `fail_fast`) once, from the URL a
    connection is made with: they were the first node's when it answered and the defaults
    when it did not."""
    down = f"amqp://guest:guest@127.0.0.1:{free_port()}/?reconnect_interval=0.2"
    connection = await open_connection(f"{down},{amqp_url}", heartbeat=30, name="failover")
    try:
        assert isinstance(connection, FailoverConnection)
        assert connection.url.port == (urlsplit(amqp_url).port or 5672)
        assert connection.reconnect_interval == 0.2
    finally:
        await connection.close()


async def test_a_cluster_node_that_takes_the_connection_but_never_answers_is_passed_over_soon(
    amqp_url: str,
) -> None:
    """A node whose host is down often drops the connect rather than refusing it: with other
    nodes left to try, it is not waited for the whole `answer_within` (a service, which opens
    two connections, was unready for 62 s with the first of two nodes so)."""
    broker = urlsplit(amqp_url)
    async with TcpProxy(broker.hostname or "127.0.0.1", broker.port or 5672) as silent:
        silent.set_mode(ProxyMode.BLACKHOLE)
        loop = asyncio.get_running_loop()
        started = loop.time()
        connection = await open_connection(
            f"amqp://guest:guest@127.0.0.1:{silent.port}/,{amqp_url}",
            heartbeat=30,
            name="failover",
        )
        try:
            assert loop.time() - started < NEXT_NODE_AFTER + 2
            assert isinstance(connection, FailoverConnection)
            assert connection.url.port == (broker.port or 5672)
        finally:
            await connection.close()


async def test_a_reconnect_waits_the_whole_connect_timeout_for_a_silent_node(
    amqp_url: str,
) -> None:
    """`NEXT_NODE_AFTER` cuts only a first connect short: a reconnect, which may have no node
    left but a slow one, waits `answer_within` for it, though the connection was first made
    under the shorter timeout (to a node with others after it)."""
    loop = asyncio.get_running_loop()
    held: list[float] = []  # how long each connection to the silent node was held open

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted = loop.time()
        await reader.read()  # until the client gives up and closes
        held.append(loop.time() - accepted)
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    node_2 = f"amqp://guest:guest@127.0.0.1:{server.sockets[0].getsockname()[1]}/"
    broker = urlsplit(amqp_url)
    try:
        async with TcpProxy(broker.hostname or "127.0.0.1", broker.port or 5672) as node_1:
            connection = await open_connection(
                f"amqp://guest:guest@127.0.0.1:{node_1.port}/,{node_2}",
                heartbeat=30,
                name="reconnecting",
                answer_within=NEXT_NODE_AFTER + 7,
            )
            try:
                node_1.set_mode(ProxyMode.REFUSE)
                node_1.reset_all()  # the reconnect goes to node 2, which never answers

                async def reconnect_gave_up_on_node_2() -> None:
                    assert held, "the reconnect is still waiting for node 2"

                await eventually(reconnect_gave_up_on_node_2, timeout=30)
                assert held[0] > NEXT_NODE_AFTER + 5
            finally:
                await connection.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_a_silent_cluster_node_costs_a_process_one_connect_timeout_not_one_each(
    amqp_url: str,
) -> None:
    """Node 1 takes connections and never answers (its host out of file handles, say): the
    first connection waits for it, then reaches node 2; the next one starts at node 2."""
    async with silent_broker() as (port, held):
        nodes = f"amqp://guest:guest@127.0.0.1:{port}/,{amqp_url}"
        for name in ("consumer", "publisher"):
            connection = await open_connection(nodes, heartbeat=30, name=name, answer_within=1)
            await connection.close()
        assert len(held) == 1


async def test_a_lost_cluster_node_is_reconnected_through_the_next_and_consuming_resumes(
    amqp_url: str, namespace: Namespace
) -> None:
    """The node a robust connection was on goes (and stays) away: it reconnects to the next
    node of `AMQP_URL` that answers (past one that is down too), not to the lost one for
    ever, and its consumer is restored there."""
    broker = urlsplit(amqp_url)
    queue_name = f"{namespace.name}.failover"
    received: asyncio.Queue[bytes] = asyncio.Queue()
    async with TcpProxy(broker.hostname or "127.0.0.1", broker.port or 5672) as node_1:
        node_2 = f"amqp://guest:guest@127.0.0.1:{free_port()}/"  # down as well
        connection = await open_connection(
            f"amqp://guest:guest@127.0.0.1:{node_1.port}/?reconnect_interval=0.2,{node_2},"
            f"{amqp_url}",
            heartbeat=30,
            name="failover",
        )
        try:
            channel = await connection.channel()
            queue = await channel.declare_queue(queue_name, durable=True)

            async def on_message(message: AbstractIncomingMessage) -> None:
                await message.ack()
                await received.put(message.body)

            await queue.consume(on_message)
            node_1.set_mode(ProxyMode.REFUSE)
            node_1.reset_all()  # node 1 crashed and does not come back

            async with await aio_pika.connect(amqp_url) as direct:
                sending = await direct.channel()
                await sending.default_exchange.publish(
                    aio_pika.Message(b"after the node was lost"), routing_key=queue_name
                )
            assert await asyncio.wait_for(received.get(), 15) == b"after the node was lost"
            assert isinstance(connection, FailoverConnection)
            assert connection.url.port == (broker.port or 5672)
        finally:
            await connection.close()
            async with await aio_pika.connect(amqp_url) as direct:
                await (await direct.channel()).queue_delete(queue_name)


async def test_a_lost_connection_is_one_warning_naming_the_node_and_its_return_one_line(
    amqp_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection cut under a service (its channels open, a consumer on one) and restored: the
    service says so in two lines of its own, where and why it was lost, and when it was back.
    The AMQP client said it as a traceback per connection and an `ERROR` per channel that its
    reconnect restores anyway: an alarm on `ERROR` lines went off at every reconnect."""
    broker = urlsplit(amqp_url)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # configure_logging's, undone after
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    lines: list[dict[str, Any]] = []
    try:
        configure_logging("INFO", "processor")  # its handler writes to the captured stderr
        async with TcpProxy(broker.hostname or "127.0.0.1", broker.port or 5672) as node:
            where = f"127.0.0.1:{node.port}"
            connection = await open_connection(
                f"amqp://guest:guest@{where}/?reconnect_interval=0.2",
                heartbeat=30,
                name="lost",
            )
            try:
                channels = [await connection.channel() for _ in range(3)]
                queue = await channels[0].declare_queue(exclusive=True)

                async def on_message(message: AbstractIncomingMessage) -> None:
                    await message.ack()

                await queue.consume(on_message)
                node.reset_all()

                async def said_back() -> None:
                    err = capsys.readouterr().err
                    lines.extend(orjson.loads(line) for line in err.splitlines())
                    assert "broker connection restored" in [line["message"] for line in lines]

                await eventually(said_back, timeout=15)
            finally:
                await connection.close()
    finally:
        root.handlers[:], root.level = handlers, level
        logging.captureWarnings(False)
    assert [line for line in lines if line["level"] in ("ERROR", "CRITICAL")] == []
    [lost] = [line for line in lines if line["level"] == "WARNING"]
    assert (lost["logger"], lost["message"]) == ("courier.connection", "broker connection lost")
    assert (lost["connection"], lost["node"]) == ("lost", where)
    assert "ConnectionResetError" in lost["reason"]
    [back] = [line for line in lines if line["message"] == "broker connection restored"]
    assert (back["connection"], back["node"]) == ("lost", where)
    assert 0 < back["after_seconds"] < 15
