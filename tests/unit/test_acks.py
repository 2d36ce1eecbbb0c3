"""Coalesced acknowledgements, against a channel that records what it is sent."""

from __future__ import annotations

from typing import Any, cast

import pytest
from aiormq.abc import AbstractChannel
from aiormq.exceptions import ChannelInvalidStateError

from services.messaging import acks as acks_module
from services.messaging.acks import Acks
from tests.support.polling import eventually


class RecordingChannel:
    def __init__(self, *, closed: bool = False) -> None:
        self.sent: list[tuple[int, bool]] = []
        self.closed = closed

    async def basic_ack(self, tag: int, multiple: bool = False, wait: bool = True) -> None:
        if self.closed:
            raise ChannelInvalidStateError("closed")
        self.sent.append((tag, multiple))


def channel_of(recording: RecordingChannel) -> AbstractChannel:
    return cast(AbstractChannel, recording)


def delivered(acks: Acks, channel: AbstractChannel, *tags: int) -> None:
    for tag in tags:
        acks.delivered(channel, tag)


async def test_a_run_of_settled_deliveries_is_acked_with_one_multiple_ack() -> None:
    recording = RecordingChannel()
    channel, acks = channel_of(recording), Acks()
    delivered(acks, channel, 1, 2, 3)
    for tag in (2, 1, 3):
        acks.settle(channel, tag)
    await acks.flush()
    assert recording.sent == [(3, True)]


async def test_a_slow_delivery_holds_back_no_ack_after_it() -> None:
    recording = RecordingChannel()
    channel, acks = channel_of(recording), Acks()
    delivered(acks, channel, 1, 2, 3, 4)
    for tag in (1, 3, 4):
        acks.settle(channel, tag)
    await acks.flush()
    assert recording.sent == [(1, True), (3, False), (4, False)]
    assert not acks.is_settled(channel, 2)
    acks.settle(channel, 2)
    await acks.flush()
    assert recording.sent[-1] == (2, True)  # nothing unacked is left below it


async def test_an_unsettled_delivery_is_never_acked() -> None:
    recording = RecordingChannel()
    channel, acks = channel_of(recording), Acks()
    delivered(acks, channel, 1, 2)
    acks.settle(channel, 2)
    await acks.flush()
    assert recording.sent == [(2, False)]


async def test_a_requeued_delivery_no_longer_holds_back_the_run() -> None:
    recording = RecordingChannel()
    channel, acks = channel_of(recording), Acks()
    delivered(acks, channel, 1, 2, 3)
    acks.forget(channel, 1)  # nacked back to the queue by the consumer
    acks.settle(channel, 2)
    acks.settle(channel, 3)
    await acks.flush()
    assert recording.sent == [(3, True)]


async def test_a_closed_channel_drops_its_acks_and_the_next_channel_starts_afresh() -> None:
    closed, fresh = RecordingChannel(closed=True), RecordingChannel()
    acks = Acks()
    delivered(acks, channel_of(closed), 1)
    acks.settle(channel_of(closed), 1)
    await acks.flush()  # the broker redelivers what the closed channel held
    assert not acks.is_settled(channel_of(closed), 1)
    delivered(acks, channel_of(fresh), 1)
    acks.settle(channel_of(fresh), 1)
    await acks.flush()
    assert (closed.sent, fresh.sent) == ([], [(1, True)])


async def test_the_sender_survives_an_unexpected_error(caplog: pytest.LogCaptureFixture) -> None:
    recording = RecordingChannel()
    channel, acks = channel_of(recording), Acks()

    async def failing(tag: int, multiple: bool = False, wait: bool = True) -> Any:
        raise Exception("futures rejected on close")  # what aiormq does  # noqa: TRY002

    recording.basic_ack = failing  # type: ignore[method-assign]
    delivered(acks, channel, 1)
    acks.settle(channel, 1)
    await acks.flush()
    assert "acks not written" in caplog.text


class FlakyChannel(RecordingChannel):
    """Fails the writes it is told to, with an error that is not the channel closing."""

    def __init__(self, failing: int) -> None:
        super().__init__()
        self.failing = failing

    async def basic_ack(self, tag: int, multiple: bool = False, wait: bool = True) -> None:
        if self.failing:
            self.failing -= 1
            raise RuntimeError("the write failed")
        await super().basic_ack(tag, multiple, wait)


async def test_acks_that_could_not_be_written_are_sent_again_each_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(acks_module, "RETRY_SECONDS", 0.01)
    recording = FlakyChannel(failing=1)
    channel, acks = channel_of(recording), Acks()
    delivered(acks, channel, 1, 2, 3, 4)
    for tag in (1, 2, 4):
        acks.settle(channel, tag)
    await acks.flush()  # the multiple ack of 1-2 fails: nothing goes, then all of it does

    async def sent_again() -> None:
        assert recording.sent == [(2, True), (4, False)]

    await eventually(sent_again, timeout=2)
    assert not acks.is_settled(channel, 3)
