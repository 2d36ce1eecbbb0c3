"""Which messages of a pipelined batch may be written now: one publish per message id in
flight on a channel, since aiormq matches a returned message to its publish by id."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, cast

import aiormq
import aiormq.base
from aiormq import spec
from aiormq.channel import Returning

from services.messaging.errors import BrokerUnavailable
from services.messaging.publisher import PERSISTENT, Outgoing, Publisher, _one_per_message_id


def message(message_id: str) -> Outgoing:
    return Outgoing(
        b"", spec.Basic.Properties(message_id=message_id, delivery_mode=PERSISTENT), "k"
    )


def channel_with(in_flight: dict[str, asyncio.Future[Any]]) -> aiormq.Channel:
    """A stand-in holding only the two maps aiormq keeps per confirming channel."""
    tags = {message_id: tag for tag, message_id in enumerate(in_flight, 1)}
    confirmations = {tags[message_id]: f for message_id, f in in_flight.items()}
    return cast(
        aiormq.Channel,
        SimpleNamespace(confirmations=confirmations, message_id_delivery_tag=tags),
    )


async def test_a_repeated_id_waits_for_the_first_of_the_batch() -> None:
    batch = [message("a"), message("b"), message("a")]
    now, later, busy = _one_per_message_id(channel_with({}), batch, [0, 1, 2])
    assert (now, later, busy) == ([0, 1], [2], set())


async def test_an_id_in_flight_on_the_channel_waits_for_that_publish() -> None:
    in_flight: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    now, later, busy = _one_per_message_id(
        channel_with({"a": in_flight}), [message("a"), message("b")], [0, 1]
    )
    assert (now, later, busy) == ([1], [0], {in_flight})


async def test_a_returned_publish_awaiting_its_confirm_does_not_hold_its_id() -> None:
    """aiormq leaves a `Returning` placeholder, never completed, for a returned message's
    confirm: waiting on it would hold the id until the deadline."""
    now, later, busy = _one_per_message_id(channel_with({"a": Returning()}), [message("a")], [0])
    assert (now, later, busy) == ([0], [], set())


async def test_a_confirm_failed_by_a_channel_closing_without_reason_is_unavailable() -> None:
    # aiormq fails the futures it still holds with a bare `Exception` when a channel closes
    # without a reason (seen while the publisher closed under load): a 503, not a crash.
    store = aiormq.base.FutureStore(asyncio.get_running_loop())
    confirmation = store.create_future()
    await store.reject_all(None)
    outcome = Publisher("amqp://unused")._outcome(confirmation, "events", "k")
    assert isinstance(outcome, BrokerUnavailable) and outcome.maybe_published
