"""The publisher against a real broker: `publish_many` gives each message its own outcome, in
order; single publishes sent in the same turn of the loop go out together, each confirmed or
refused on its own."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aio_pika
import pytest
from aiormq import spec

from contracts.topology import events_exchange
from services.messaging import publisher as publisher_module
from services.messaging.errors import BrokerUnavailable, Unpublishable, Unroutable
from services.messaging.publisher import PERSISTENT, Outgoing, Publisher
from tests.conftest import Namespace
from tests.support.queues import take

pytestmark = pytest.mark.broker

BOUND = "bound"  # routing key of a queue that takes everything
FULL = "full"  # routing key of a queue that holds two messages and nacks the rest


def message(message_id: str, routing_key: str = BOUND) -> Outgoing:
    properties = spec.Basic.Properties(message_id=message_id, delivery_mode=PERSISTENT)
    return Outgoing(message_id.encode(), properties, routing_key)


@pytest.fixture
async def queues(namespace: Namespace) -> AsyncIterator[dict[str, str]]:
    """The namespace's events exchange with a queue bound for `BOUND` and one for `FULL`."""
    names = {BOUND: f"{namespace.name}.pub.bound", FULL: f"{namespace.name}.pub.full"}
    connection = await aio_pika.connect(namespace.amqp_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            events_exchange(namespace.name), aio_pika.ExchangeType.TOPIC, durable=True
        )
        bound = await channel.declare_queue(names[BOUND], durable=True)
        full = await channel.declare_queue(
            names[FULL],
            durable=True,
            arguments={"x-max-length": 2, "x-overflow": "reject-publish"},
        )
        await bound.bind(exchange, BOUND)
        await full.bind(exchange, FULL)
        yield names
        for name in names.values():
            await channel.queue_delete(name)


@pytest.fixture
async def publisher(namespace: Namespace) -> AsyncIterator[Publisher]:
    pub = Publisher(namespace.amqp_url, channels=1)
    await pub.connect()
    yield pub
    await pub.close()


async def test_a_confirmed_batch_lands_whole_and_in_order(
    publisher: Publisher, queues: dict[str, str], namespace: Namespace
) -> None:
    ids = [f"m{i}" for i in range(50)]
    outcomes = await publisher.publish_many(
        [message(i) for i in ids], exchange=events_exchange(namespace.name)
    )
    assert outcomes == [None] * 50
    landed = await take(namespace.amqp_url, queues[BOUND], 50)
    assert [m.message_id for m in landed] == ids
    assert all(m.delivery_mode == PERSISTENT for m in landed)


async def test_an_unroutable_message_fails_alone(
    publisher: Publisher, queues: dict[str, str], namespace: Namespace
) -> None:
    outcomes = await publisher.publish_many(
        [message("a"), message("lost", "nowhere"), message("b")],
        exchange=events_exchange(namespace.name),
    )
    first, lost, last = outcomes
    assert first is None and last is None
    assert isinstance(lost, Unroutable) and lost.routing_key == "nowhere"
    landed = await take(namespace.amqp_url, queues[BOUND], 2)
    assert [m.message_id for m in landed] == ["a", "b"]


def unframable(message_id: str) -> Outgoing:
    """A message pamqp cannot frame: a short-string property over 255 bytes."""
    sent = message(message_id)
    sent.properties.correlation_id = "c" * 256
    return sent


async def test_a_message_that_cannot_be_framed_fails_alone(
    publisher: Publisher, queues: dict[str, str], namespace: Namespace
) -> None:
    outcomes = await publisher.publish_many(
        [message("a"), unframable("odd"), message("b")], exchange=events_exchange(namespace.name)
    )
    first, odd, last = outcomes
    assert first is None and last is None
    assert isinstance(odd, Unpublishable) and isinstance(odd.__cause__, TypeError)
    landed = await take(namespace.amqp_url, queues[BOUND], 2)
    assert [m.message_id for m in landed] == ["a", "b"]


async def test_messages_sharing_an_id_each_get_their_own_outcome(
    publisher: Publisher, queues: dict[str, str], namespace: Namespace
) -> None:
    """A returned message is matched to its publish by message id: two in flight with one id
    (a client sending an event twice at once) must not get each other's outcome."""
    exchange = events_exchange(namespace.name)
    lost, kept = await publisher.publish_many(
        [message("same", "nowhere"), message("same")], exchange=exchange
    )
    assert isinstance(lost, Unroutable) and kept is None
    kept, lost = await publisher.publish_many(
        [message("again"), message("again", "nowhere")], exchange=exchange
    )
    assert kept is None and isinstance(lost, Unroutable)
    landed = await take(namespace.amqp_url, queues[BOUND], 2)
    assert [m.message_id for m in landed] == ["same", "again"]


async def test_concurrent_publishes_sharing_an_id_each_get_their_own_outcome(
    publisher: Publisher, queues: dict[str, str], namespace: Namespace
) -> None:
    exchange = events_exchange(namespace.name)
    lost, kept = await asyncio.gather(
        publisher.publish_many([message("twice", "nowhere")], exchange=exchange),
        publisher.publish_many([message("twice")], exchange=exchange),
    )
    assert isinstance(lost[0], Unroutable) and kept == [None]
    landed = await take(namespace.amqp_url, queues[BOUND], 1)
    assert [m.message_id for m in landed] == ["twice"]


async def test_messages_the_broker_nacks_fail_and_the_others_are_confirmed(
    publisher: Publisher, queues: dict[str, str], namespace: Namespace
) -> None:
    outcomes = await publisher.publish_many(
        [message("kept-1", FULL), message("kept-2", FULL), message("refused", FULL), message("a")],
        exchange=events_exchange(namespace.name),
    )
    kept_1, kept_2, refused, other = outcomes
    assert kept_1 is None and kept_2 is None and other is None
    assert isinstance(refused, BrokerUnavailable) and "nack" in str(refused)


async def test_the_publisher_still_publishes_after_a_nack(
    publisher: Publisher, queues: dict[str, str], namespace: Namespace
) -> None:
    exchange = events_exchange(namespace.name)
    overflow = [message(f"f{i}", FULL) for i in range(3)]
    assert isinstance((await publisher.publish_many(overflow, exchange=exchange))[-1], Exception)

    # On the nacked channel while its replacement opens, or on the fresh one: confirmed.
    for later in ("after", "later", "last"):
        assert await publisher.publish_many([message(later)], exchange=exchange) == [None]


async def test_publishes_in_flight_on_a_nacked_channel_are_not_failed_by_its_replacement(
    publisher: Publisher, queues: dict[str, str], namespace: Namespace
) -> None:
    exchange = events_exchange(namespace.name)
    overflow = [message(f"f{i}", FULL) for i in range(3)]
    assert isinstance((await publisher.publish_many(overflow, exchange=exchange))[-1], Exception)
    # Written at once, on the nacked channel: its replacement is still being opened.
    ids = [f"b{i}" for i in range(50)]
    outcomes = await publisher.publish_many([message(i) for i in ids], exchange=exchange)
    assert outcomes == [None] * len(ids)
    landed = await take(namespace.amqp_url, queues[BOUND], len(ids))
    assert [m.message_id for m in landed] == ids


async def test_a_write_that_fails_fails_every_message_never_confirms_one(
    publisher: Publisher,
    queues: dict[str, str],
    namespace: Namespace,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The connection breaks while a batch is written (injected at the write): no message of
    it, nor one waiting behind a duplicate id, may read as confirmed."""

    async def broken(*_: object) -> list[asyncio.Future[object]]:
        raise ConnectionResetError("the connection broke mid-write")

    monkeypatch.setattr(publisher_module, "_write_pipelined", broken)
    outcomes = await publisher.publish_many(
        [message("a"), message("b"), message("a")], exchange=events_exchange(namespace.name)
    )
    assert all(isinstance(o, BrokerUnavailable) for o in outcomes), outcomes


async def test_without_a_confirm_in_time_every_message_fails(
    namespace: Namespace, queues: dict[str, str]
) -> None:
    publisher = Publisher(namespace.amqp_url, channels=1, confirm_timeout=0)
    await publisher.connect()
    try:
        outcomes = await publisher.publish_many(
            [message("a"), message("b")], exchange=events_exchange(namespace.name)
        )
    finally:
        await publisher.close()
    assert all(isinstance(o, BrokerUnavailable) and "no confirm" in str(o) for o in outcomes)


async def test_a_message_not_written_before_the_deadline_is_not_written_after_it(
    namespace: Namespace, queues: dict[str, str]
) -> None:
    """Reported timed out, a message must not be in the queue: the caller's retry would
    publish it twice."""
    late = Publisher(namespace.amqp_url, channels=1, confirm_timeout=0)
    await late.connect()
    try:
        outcomes = await late.publish_many(
            [message("late"), message("late")], exchange=events_exchange(namespace.name)
        )
    finally:
        await late.close()
    assert all(isinstance(o, BrokerUnavailable) and "no confirm" in str(o) for o in outcomes)
    marker = Publisher(namespace.amqp_url, channels=1)
    await marker.connect()
    try:
        await publish_one(marker, namespace, message("marker"))
    finally:
        await marker.close()
    [first] = await take(namespace.amqp_url, queues[BOUND], 1)
    assert first.message_id == "marker"


async def test_without_a_connection_every_message_fails(namespace: Namespace) -> None:
    outcomes = await Publisher(namespace.amqp_url).publish_many(
        [message("a"), message("b")], exchange=events_exchange(namespace.name)
    )
    assert len(outcomes) == 2
    assert all(isinstance(o, BrokerUnavailable) for o in outcomes)


async def test_a_message_without_an_id_is_refused_before_anything_is_sent(
    publisher: Publisher, queues: dict[str, str], namespace: Namespace
) -> None:
    anonymous = Outgoing(b"x", spec.Basic.Properties(delivery_mode=PERSISTENT), BOUND)
    with pytest.raises(ValueError, match="message_id"):
        await publisher.publish_many(
            [message("a"), anonymous], exchange=events_exchange(namespace.name)
        )
    assert await publisher.publish_many(
        [message("b")], exchange=events_exchange(namespace.name)
    ) == [None]
    [landed] = await take(namespace.amqp_url, queues[BOUND], 1)
    assert landed.message_id == "b"


# --- single publishes sent together -------------------------------------------------------------


async def publish_one(publisher: Publisher, namespace: Namespace, outgoing: Outgoing) -> None:
    await publisher.publish_raw(
        outgoing.body,
        outgoing.properties,
        exchange=events_exchange(namespace.name),
        routing_key=outgoing.routing_key,
    )


async def test_concurrent_publishes_are_each_confirmed(
    publisher: Publisher, queues: dict[str, str], namespace: Namespace
) -> None:
    ids = [f"c{i}" for i in range(40)]
    await asyncio.gather(*(publish_one(publisher, namespace, message(i)) for i in ids))
    landed = await take(namespace.amqp_url, queues[BOUND], 40)
    assert sorted(m.message_id or "" for m in landed) == sorted(ids)


async def test_an_unroutable_publish_among_concurrent_ones_fails_alone(
    publisher: Publisher, queues: dict[str, str], namespace: Namespace
) -> None:
    sent = [message("a"), message("lost", routing_key="nobody"), message("b")]
    outcomes = await asyncio.gather(
        *(publish_one(publisher, namespace, m) for m in sent), return_exceptions=True
    )
    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], Unroutable)
    landed = await take(namespace.amqp_url, queues[BOUND], 2)
    assert sorted(m.message_id or "" for m in landed) == ["a", "b"]


async def test_a_publish_that_cannot_be_framed_among_concurrent_ones_fails_alone(
    publisher: Publisher, queues: dict[str, str], namespace: Namespace
) -> None:
    sent = [message("a"), unframable("odd"), message("b")]
    outcomes = await asyncio.gather(
        *(publish_one(publisher, namespace, m) for m in sent), return_exceptions=True
    )
    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], Unpublishable)
    landed = await take(namespace.amqp_url, queues[BOUND], 2)
    assert sorted(m.message_id or "" for m in landed) == ["a", "b"]


async def test_a_publish_without_an_id_is_published_too(
    publisher: Publisher, queues: dict[str, str], namespace: Namespace
) -> None:
    anonymous = Outgoing(b"x", spec.Basic.Properties(delivery_mode=PERSISTENT), BOUND)
    await asyncio.gather(
        publish_one(publisher, namespace, anonymous),
        publish_one(publisher, namespace, message("n")),
    )
    landed = await take(namespace.amqp_url, queues[BOUND], 2)
    assert sorted(m.body for m in landed) == [b"n", b"x"]


async def test_concurrent_publishes_without_a_connection_each_raise(namespace: Namespace) -> None:
    publisher = Publisher(namespace.amqp_url)  # never connected
    outcomes = await asyncio.gather(
        *(publish_one(publisher, namespace, message(f"d{i}")) for i in range(3)),
        return_exceptions=True,
    )
    assert all(isinstance(o, BrokerUnavailable) for o in outcomes)
    assert len({id(o) for o in outcomes}) == 3  # each its own exception, raised once


async def test_closing_ends_every_waiting_publish_and_leaves_no_work_behind(
    namespace: Namespace, queues: dict[str, str]
) -> None:
    publisher = Publisher(namespace.amqp_url, channels=2)
    await publisher.connect()
    sending = [
        asyncio.create_task(publish_one(publisher, namespace, message(f"z{i}"))) for i in range(300)
    ]
    await asyncio.sleep(0)  # they are coalesced and on their way
    await publisher.close()
    outcomes = await asyncio.gather(*sending, return_exceptions=True)
    assert all(o is None or isinstance(o, BrokerUnavailable) for o in outcomes), outcomes
    left = [
        task
        for task in asyncio.all_tasks()
        if not task.done() and getattr(task.get_coro(), "__qualname__", "").startswith("Publisher.")
    ]
    assert left == []
