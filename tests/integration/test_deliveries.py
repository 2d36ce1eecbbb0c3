"""The deliveries record: every attempt counted, a delivered notification never sent twice."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from contracts.events import NotificationRequested, NotificationRequestedData
from services.messaging.errors import StoreUnavailable
from services.messaging.store import open_store, store_url
from services.notifier.channels import Channels, LogChannel, Notification, Unconfigured
from services.notifier.deliveries import TABLE, Deliveries
from services.notifier.targets import TargetPolicy
from services.notifier.webhook import (
    WebhookChannel,
    WebhookRejected,
    WebhookSecrets,
    WebhookUnavailable,
    webhook_client,
)
from tests.support.polling import eventually
from tests.support.webhook_receiver import Reply, WebhookReceiver

SECRET = b"integration-webhook-secret-0123456789"


def notification(url: str) -> Notification:
    event = NotificationRequested(
        data=NotificationRequestedData(channel="webhook", recipient=url, subject="Deployed")
    )
    return Notification(
        event_id=event.id,
        correlation_id=event.correlation(),
        channel="webhook",
        recipient=url,
        subject="Deployed",
        body="",
        event=event,
    )


@pytest.fixture(params=["sqlite", "postgresql"])
async def deliveries(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Deliveries]:
    database = None if request.param == "sqlite" else request.getfixturevalue("postgres_database")
    engine = open_store(store_url(database, tmp_path, "notifier"))
    record = Deliveries(engine)
    await record.start()
    await record.start()  # idempotent
    yield record
    record.close()
    await engine.dispose()


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver([Reply(503), Reply(400, body=b"no such hook")]).running() as running:
        yield running


@pytest.fixture
async def channels(deliveries: Deliveries, tmp_path: Path) -> AsyncIterator[Channels]:
    policy = TargetPolicy.from_entries(["127.0.0.1"])
    async with webhook_client(policy, timeout=5, connect_timeout=2, max_connections=2) as client:
        yield Channels(
            {
                "log": LogChannel(tmp_path / "log.jsonl"),
                "webhook": WebhookChannel(client, WebhookSecrets(SECRET, {}), timeout=5),
                "email": Unconfigured("email"),
            },
            deliveries,
        )


async def test_attempts_and_outcomes_are_recorded(
    channels: Channels, deliveries: Deliveries, receiver: WebhookReceiver
) -> None:
    n = notification(receiver.url())
    with pytest.raises(WebhookUnavailable):
        await channels.deliver(n)
    first = await deliveries.get(n.event_id)
    assert first is not None
    assert (first.channel, first.target, first.outcome, first.attempts) == (
        "webhook",
        n.recipient,
        "failed",
        1,
    )
    assert first.last_error is not None and "webhook answered 503" in first.last_error

    with pytest.raises(WebhookRejected):
        await channels.deliver(n)
    second = await deliveries.get(n.event_id)
    assert second is not None and (second.outcome, second.attempts) == ("rejected", 2)
    assert second.last_error is not None and "400: no such hook" in second.last_error

    await channels.deliver(n)
    third = await deliveries.get(n.event_id)
    assert third is not None and (third.outcome, third.attempts) == ("delivered", 3)
    assert third.delivered_at is not None and third.first_attempt_at <= third.last_attempt_at
    assert third.last_error == second.last_error  # the last error seen stays for the record


async def test_a_delivered_notification_is_not_sent_again(
    channels: Channels, deliveries: Deliveries
) -> None:
    with WebhookReceiver().running() as receiver:
        n = notification(receiver.url())
        await channels.deliver(n)
        await channels.deliver(n)  # e.g. redelivered: the first run died before its inbox commit
        assert len(receiver.received) == 1
    record = await deliveries.get(n.event_id)
    assert record is not None and (record.outcome, record.attempts) == ("delivered", 1)


async def test_a_store_blip_after_sending_does_not_lose_the_delivered_mark(
    channels: Channels, deliveries: Deliveries, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = deliveries.delivered
    calls = 0

    async def blip_once(notification: Notification) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError("the store went away for a moment")
        await record(notification)

    monkeypatch.setattr(deliveries, "delivered", blip_once)
    with WebhookReceiver().running() as receiver:
        n = notification(receiver.url())
        await channels.deliver(n)
    stored = await deliveries.get(n.event_id)
    assert calls == 2
    assert stored is not None and stored.outcome == "delivered"


async def test_an_outcome_recorded_after_the_delivery_changes_nothing(
    deliveries: Deliveries,
) -> None:
    n = notification("http://127.0.0.1:9/hook")
    await deliveries.delivered(n)
    await deliveries.failed(n, "a late failure of another attempt", permanent=False)
    record = await deliveries.get(n.event_id)
    assert record is not None and (record.outcome, record.attempts) == ("delivered", 1)
    assert record.last_error is None
    assert await deliveries.delivered_already(n.event_id)


async def test_an_outcome_the_store_refuses_fails_only_its_own_notification(
    deliveries: Deliveries,
) -> None:
    """PostgreSQL refuses a value over its column's length: recorded in one statement with
    others, such an outcome failed them all, and each innocent handler's retry would send its
    notification again. Its batch is now tried row by row (SQLite takes it: all are recorded)."""
    innocent, refused, other = (
        notification("http://a.test/"),
        replace(notification("http://b.test/"), event_id="x" * 129),  # over the column's 128
        notification("http://c.test/"),
    )
    outcomes = await asyncio.gather(
        *(deliveries.delivered(n) for n in (innocent, refused, other)), return_exceptions=True
    )
    assert outcomes[0] is None and outcomes[2] is None
    assert await deliveries.delivered_already(innocent.event_id)
    assert await deliveries.delivered_already(other.event_id)


async def test_an_outcome_holding_a_nul_is_recorded_with_it_escaped(
    deliveries: Deliveries,
) -> None:
    """PostgreSQL refuses a NUL in text: a receiver's error body holding one (or a recipient
    from before the contract refused them) made the outcome unrecordable, and a delivered
    notification was failed and sent again on every retry."""
    n = replace(notification("http://b.test/"), recipient="http://b.test/\u0000")
    await deliveries.failed(n, "webhook answered 400: bad\u0000body", permanent=True)
    await deliveries.delivered(n)
    stored = await deliveries.get(n.event_id)
    assert stored is not None and stored.outcome == "delivered"
    assert stored.target == "http://b.test/\\x00"
    assert stored.last_error == "webhook answered 400: bad\\x00body"


async def test_a_store_outage_at_the_check_before_sending_holds_the_delivery(
    channels: Channels, deliveries: Deliveries, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As an ordinary error it went to a delay tier, spending an attempt on the outage: a long
    # one dead-lettered notifications that only had to wait.
    async def locked(event_id: str) -> object:
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(deliveries, "delivered_already", locked)
    monkeypatch.setattr(deliveries, "get", locked)
    with WebhookReceiver().running() as receiver:
        n = notification(receiver.url())
        with pytest.raises(StoreUnavailable) as held:  # the consumer holds the delivery
            await channels.deliver(n)
        assert isinstance(held.value.__cause__, sqlite3.OperationalError)
        with pytest.raises(StoreUnavailable):
            await channels.refused_before(n)
        assert receiver.received == []  # nothing sent without the check


async def test_a_full_batch_of_outcomes_is_committed_without_the_commit_delay(
    tmp_path: Path,
) -> None:
    engine = open_store(store_url(None, tmp_path, "lingering"))
    record = Deliveries(engine, commit_delay=60, batch=2)  # a delay no test outlives
    await record.start()
    try:
        first, second = notification("http://a.test/"), notification("http://b.test/")
        async with asyncio.timeout(10):
            await asyncio.gather(record.delivered(first), record.delivered(second))
        assert await record.delivered_already(first.event_id)
        assert await record.delivered_already(second.event_id)
    finally:
        record.close()
        await engine.dispose()


async def test_a_store_outage_longer_than_the_budget_after_sending_does_not_send_again(
    channels: Channels, deliveries: Deliveries, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("services.notifier.channels.RECORD_BUDGET_SECONDS", 0.2)
    record = deliveries.delivered
    store_down = True

    async def while_down(notification: Notification) -> None:
        if store_down:
            raise OSError("the store is away")
        await record(notification)

    monkeypatch.setattr(deliveries, "delivered", while_down)
    with WebhookReceiver().running() as receiver:
        n = notification(receiver.url())
        with pytest.raises(OSError, match="the store is away"):
            await channels.deliver(n)  # sent, not recorded: the handler fails, and is retried
        store_down = False
        await channels.deliver(n)  # the retry
        assert len(receiver.received) == 1
    stored = await deliveries.get(n.event_id)
    assert stored is not None and stored.outcome == "delivered"


async def test_a_sent_notification_the_store_cannot_record_holds_its_delivery(
    channels: Channels, deliveries: Deliveries, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It failed as an ordinary error: retried through the delay tiers, each spending an
    # attempt, so a long write outage dead-lettered a notification that had been delivered.
    monkeypatch.setattr("services.notifier.channels.RECORD_BUDGET_SECONDS", 0.2)

    async def locked(notification: Notification) -> None:
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(deliveries, "delivered", locked)
    with (
        WebhookReceiver().running() as receiver,
        pytest.raises(StoreUnavailable) as held,  # the consumer holds the delivery
    ):
        await channels.deliver(notification(receiver.url()))
    assert isinstance(held.value.__cause__, sqlite3.OperationalError)
    assert len(receiver.received) == 1


async def cancel_while_writing(
    channels: Channels, n: Notification, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deliver `n` on the log channel, whose writes take 0.3 s, and cancel the delivery while
    its line is being written (as the broker closing the channel under it does)."""
    append = LogChannel._append

    def slow_append(self: LogChannel, lines: list[bytes]) -> None:
        time.sleep(0.3)
        append(self, lines)

    monkeypatch.setattr(LogChannel, "_append", slow_append)
    sending = asyncio.create_task(channels.deliver(n))
    await asyncio.sleep(0.1)  # the line is being written
    sending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await sending


async def test_a_send_whose_delivery_was_cancelled_midway_is_still_recorded(
    channels: Channels, deliveries: Deliveries, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The broker closed the channel under the delivery (a graceful restart): the line was
    # written but not recorded, and the redelivery wrote it again.
    n = replace(notification("ops"), channel="log")
    await cancel_while_writing(channels, n, monkeypatch)

    async def recorded() -> None:
        record = await deliveries.get(n.event_id)
        assert record is not None and record.outcome == "delivered"

    await eventually(recorded)
    await channels.deliver(n)  # the redelivery
    assert len((tmp_path / "log.jsonl").read_bytes().splitlines()) == 1


async def test_a_redelivery_while_the_cancelled_send_still_runs_waits_for_it_and_sends_nothing(
    channels: Channels, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The connection went with a node of the cluster and came back on another within
    # milliseconds: the broker redelivered the notification to the same process while its
    # first send (shielded, still running) had not been recorded, and it was sent twice.
    n = replace(notification("ops"), channel="log")
    await cancel_while_writing(channels, n, monkeypatch)
    await channels.deliver(n)  # the redelivery, at once
    assert len((tmp_path / "log.jsonl").read_bytes().splitlines()) == 1


async def test_a_large_prune_commits_in_batches_so_outcomes_recorded_meanwhile_do_not_wait(
    deliveries: Deliveries, tmp_path: Path
) -> None:
    # The hourly prune deleted every old delivery in one transaction: on SQLite it held the
    # write lock of the file the notifier's inbox shares, for as long as the delete took.
    month_ago = datetime.now(UTC) - timedelta(days=60)
    old = [
        {
            "event_id": f"old-{i}",
            "channel": "log",
            "target": "ops",
            "outcome": "delivered",
            "attempts": 1,
            "first_attempt_at": month_ago,
            "last_attempt_at": month_ago,
        }
        for i in range(30_000)
    ]
    engine = deliveries._engine
    async with engine.begin() as conn:
        await conn.execute(TABLE.insert(), old)

    async def old_left() -> int:
        async with engine.connect() as conn:
            query = select(func.count()).where(TABLE.c.event_id.like("old-%"))
            return int(await conn.scalar(query) or 0)

    pruning = asyncio.create_task(deliveries.prune(timedelta(days=30)))
    seen_after_an_outcome = set()
    while not pruning.done():
        sent = notification("https://hooks.example.com/x")
        await deliveries.delivered(sent)
        seen_after_an_outcome.add(await old_left())
        assert await deliveries.delivered_already(sent.event_id)
    assert await pruning == len(old)
    assert await old_left() == 0
    # Outcomes were recorded while part of the old ones was gone and part still there.
    assert seen_after_an_outcome - {0, len(old)}
