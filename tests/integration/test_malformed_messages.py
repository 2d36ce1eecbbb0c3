"""Messages whose AMQP properties the client's codec used to refuse, against a real broker.

RabbitMQ passes any property value through: a timestamp sent in microseconds, a header whose
key or value is not UTF-8. The codec refusing one closed the consumer's whole connection, so
every delivery in flight came back and ran again, and the message did it again on its next
delivery. Here each is one message among others.
"""

from __future__ import annotations

import asyncio
import struct
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import aio_pika
import aiormq
import pytest
from aiormq.abc import ChannelFrame, FrameType
from pamqp import commands as spec
from pamqp.common import FieldTable
from pamqp.header import ContentHeader

from contracts.topology import dead_letter_queue
from services.messaging import failure as f
from services.messaging.dead_letters import DeadLetter
from services.messaging.errors import PermanentError
from services.messaging.inbox import Handled, Inbox
from services.messaging.publisher import event_body
from services.messaging.store import open_store, store_url
from services.ops.store import FailureStore, Filter
from tests.conftest import Namespace
from tests.integration.test_consumer import Recorder, notification, route, running
from tests.integration.test_ops_api import dead_letter_arrives, draining, storing
from tests.support.polling import eventually
from tests.support.queues import assert_empty, take

pytestmark = pytest.mark.broker

SENT_AT = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
SECONDS = struct.pack(">Q", int(SENT_AT.timestamp()))
MICROSECONDS = struct.pack(">Q", int(SENT_AT.timestamp()) * 1_000_000)  # a producer's unit bug
KEY = b"\x04note"  # the header key "note", as encoded
VALUE = b"S\x00\x00\x00\x02ok"  # a long string "ok"
NOT_UTF8 = b"\xff\xfe"


class Malformed(ContentHeader):
    """A content header whose timestamp is in microseconds and whose "note" header has a key
    and a value that are not UTF-8."""

    def marshal(self) -> bytes:
        raw = super().marshal()
        assert raw.count(SECONDS) == raw.count(KEY + VALUE) == 1
        return raw.replace(SECONDS, MICROSECONDS).replace(
            KEY + VALUE, b"\x04n" + NOT_UTF8 + b"eS\x00\x00\x00\x02" + NOT_UTF8
        )


CORRELATION_ID = "c" * 200  # a short string: 200 bytes, where 255 is the most
LONG_KEY = "k" * 100  # a header key, as long


class Expanding(ContentHeader):
    """A content header whose correlation id and a header key (`LONG_KEY`) are bytes that are not
    UTF-8, each longer once read with U+FFFD for every byte than a short string can be."""

    def marshal(self) -> bytes:
        raw = super().marshal()
        assert raw.count(CORRELATION_ID.encode()) == raw.count(LONG_KEY.encode()) == 1
        return raw.replace(CORRELATION_ID.encode(), b"\xfe" * len(CORRELATION_ID)).replace(
            LONG_KEY.encode(), b"\xff" * len(LONG_KEY)
        )


async def publish_malformed(
    url: str,
    queue: str,
    body: bytes,
    message_id: str,
    header: type[ContentHeader] = Malformed,
    headers: FieldTable | None = None,
) -> None:
    """Publish with confirm, through the raw channel: the codec would not write these bytes."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        underlay = await channel.get_underlay_channel()
        assert isinstance(underlay, aiormq.Channel)
        properties = spec.Basic.Properties(
            content_type="application/cloudevents+json",
            delivery_mode=2,
            message_id=message_id,
            timestamp=SENT_AT,
            correlation_id=CORRELATION_ID,
            headers=headers or {"note": "ok"},
        )
        frames: list[FrameType] = [
            spec.Basic.Publish(exchange="", routing_key=queue),
            header(properties=properties, body_size=len(body)),
            *underlay._split_body(body),
        ]
        confirmed = underlay.confirmations.setdefault(
            underlay.delivery_tag + 1, asyncio.get_running_loop().create_future()
        )
        underlay.delivery_tag += 1
        await underlay.write_queue.put(ChannelFrame.marshall(underlay.number, frames))
        await asyncio.wait_for(confirmed, 10)


async def test_a_message_with_unreadable_properties_is_handled_once_beside_the_others(
    namespace: Namespace,
) -> None:
    handler = Recorder()
    before, odd, after = notification("before"), notification("odd"), notification("after")
    async with running(
        namespace, "notifier", {"notification.requested": route(handler)}, delivery_limit=5
    ) as (pub, topo, consumer):
        await pub.publish_event(before, exchange=topo.events_exchange)
        await publish_malformed(namespace.amqp_url, topo.queue, event_body(odd), odd.id)
        await pub.publish_event(after, exchange=topo.events_exchange)
        await handler.called(before.id, odd.id, after.id)
        await asyncio.sleep(1)  # a connection closed by the codec would bring them back by now
        assert consumer.consuming
    assert handler.calls == [before.id, odd.id, after.id]
    await assert_empty(namespace.amqp_url, [topo.queue, topo.dead_letter_queue])


async def test_a_message_with_unreadable_properties_is_dead_lettered_with_its_reason(
    namespace: Namespace,
) -> None:
    # Its dead letter could not be encoded either: requeued until the delivery limit took it,
    # without Courier's reason or traceback.
    handler = Recorder(failures=[PermanentError("recipient refused")])
    odd = notification("odd")
    async with running(
        namespace, "notifier", {"notification.requested": route(handler)}, delivery_limit=5
    ) as (_, topo, _consumer):
        await publish_malformed(namespace.amqp_url, topo.queue, event_body(odd), odd.id)
        [dead] = await take(namespace.amqp_url, topo.dead_letter_queue, 1)
    assert handler.calls == [odd.id]
    assert dead.headers[f.REASON] == "permanent" and dead.message_id == odd.id
    assert dead.headers["n\ufffd\ufffde"] == bytearray(NOT_UTF8)  # the value kept as sent


async def test_a_message_whose_properties_grow_past_their_limit_when_read_is_dead_lettered(
    namespace: Namespace,
) -> None:
    # Read with U+FFFD for each byte, its correlation id no longer fit a short string: its
    # dead letter could not be written, and the broker's delivery limit took it without
    # Courier's reason. (pamqp cuts a header key over 128 bytes itself.)
    handler = Recorder(failures=[PermanentError("recipient refused")])
    odd, after = notification("odd"), notification("after")
    async with running(
        namespace, "notifier", {"notification.requested": route(handler)}, delivery_limit=5
    ) as (pub, topo, _consumer):
        await publish_malformed(
            namespace.amqp_url,
            topo.queue,
            event_body(odd),
            odd.id,
            header=Expanding,
            headers={LONG_KEY: "ok"},
        )
        await pub.publish_event(after, exchange=topo.events_exchange)
        [dead] = await take(namespace.amqp_url, topo.dead_letter_queue, 1)
        await handler.called(odd.id, after.id)
    assert handler.calls == [odd.id, after.id]
    assert dead.headers[f.REASON] == "permanent" and dead.message_id == odd.id
    assert dead.correlation_id is not None and set(dead.correlation_id) == {"\ufffd"}
    assert len(dead.correlation_id.encode()) <= 255
    [key] = [k for k in dead.headers if set(k) == {"\ufffd"}]
    assert len(key.encode()) <= 255 and dead.headers[key] == "ok"
    await assert_empty(namespace.amqp_url, [topo.queue])


async def test_a_dead_letter_with_unreadable_properties_is_drained_like_any_other(
    namespace: Namespace,
) -> None:
    # It closed the drain's connection on every delivery, for ever (a dead-letter queue has no
    # delivery limit); in the gateway that connection is the publisher's, so ingest stopped.
    kept: list[DeadLetter] = []

    async def keep(letter: DeadLetter) -> None:
        kept.append(letter)

    odd, after = notification("odd"), notification("after")
    queue = dead_letter_queue(namespace.name, "notifier")
    async with draining(namespace, keep) as (_, connection):
        await publish_malformed(namespace.amqp_url, queue, event_body(odd), odd.id)
        channel = await connection.channel()  # the drain's connection still works
        await channel.default_exchange.publish(
            aio_pika.Message(event_body(after), message_id=after.id), routing_key=queue
        )

        async def both_kept() -> None:
            assert [letter.event_id for letter in kept] == [odd.id, after.id]

        await eventually(both_kept, timeout=10)
    await assert_empty(namespace.amqp_url, [queue])


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
@pytest.mark.parametrize("header", ["x-amount", f.REPLAYS])
async def test_a_dead_letter_with_a_decimal_header_is_stored(
    namespace: Namespace, tmp_path: Path, request: pytest.FixtureRequest, database: str, header: str
) -> None:
    # A Java or .NET producer may send a decimal. JSON has none: the store refused the letter,
    # so the drain held it, returned it to its queue and drained it again, for ever, never
    # shown (as `courier-replays`, on the broker's path, its id could not even be computed).
    postgres = request.getfixturevalue("postgres_database") if database == "postgresql" else None
    engine = open_store(store_url(postgres, tmp_path, "gateway"))
    store = FailureStore(engine)
    await store.start()
    queue = dead_letter_queue(namespace.name, "notifier")
    try:
        async with draining(namespace, storing(store)):
            await dead_letter_arrives(
                namespace, "odd", body=b"{}", headers={header: Decimal("1.5")}
            )

            async def stored() -> None:
                # Asserted, not unpacked: `eventually` retries an AssertionError only, and an
                # empty page read before the drain's commit (`[listed] = items`, a ValueError)
                # failed the test at once, in a loaded suite, looking like a drain that stopped.
                items = (await store.page(Filter())).items
                assert len(items) == 1, items
                letter = await store.letter(items[0]["id"])
                assert letter is not None and letter.event_id == "odd"
                assert letter.headers[header] == "1.5"

            await eventually(stored)
        await assert_empty(namespace.amqp_url, [queue])
    finally:
        await engine.dispose()


async def test_an_attempt_count_no_store_column_holds_is_no_attempt_count(
    namespace: Namespace, postgres_database: str, tmp_path: Path
) -> None:
    # Anyone may publish to a work queue. An attempt of 2**40 in its header passed as the
    # attempt: on PostgreSQL (32-bit columns) the inbox could not record the handled event, nor
    # the gateway the status report it went out in, with up to 1000 other events' transitions.
    handler = Recorder()
    event = notification()
    engine = open_store(store_url(postgres_database, tmp_path, "notifier"))
    inbox = Inbox(engine, "notifier")
    await inbox.start()
    try:
        routes = {"notification.requested": route(handler)}
        async with running(namespace, "notifier", routes, inbox=inbox) as (pub, topo, _):
            message = aio_pika.Message(
                event_body(event),
                message_id=event.id,
                type=event.type,
                headers={f.ATTEMPT: 2**40},
            )
            await pub.publish(message, exchange=topo.events_exchange, routing_key=event.type)
            await handler.called(event.id)

            async def recorded() -> None:
                handled = await inbox.lookup(event.id)
                assert isinstance(handled, Handled) and handled.attempt == 1

            await eventually(recorded)
        await assert_empty(namespace.amqp_url, [topo.queue, topo.dead_letter_queue])
    finally:
        inbox.close()
        await engine.dispose()
