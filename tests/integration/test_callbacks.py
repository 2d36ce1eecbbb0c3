"""Callbacks (`services.gateway.callbacks`) on both stores, SQLite and PostgreSQL: when an event
is settled, that one `callback.requested` is published per outcome, and what a crash between
the status write and the publish leaves behind.

The publisher here is a stand-in that records (or refuses) what it is given, so each test can
say exactly what was published and when a publish fails; the flow through a real broker, the
notifier and a webhook receiver is tests/e2e/test_callbacks.py.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from sqlalchemy import inspect, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine

from contracts.envelope import Envelope
from contracts.events import (
    EVENT_ADAPTER,
    DatasetSubmitted,
    DatasetSubmittedData,
    NotificationRequested,
    NotificationRequestedData,
)
from contracts.topology import work_queue
from contracts.tracking import CallbackRequested, State, Transition, callback_id
from services.gateway.callbacks import Callbacks
from services.gateway.letters import dead_lettered
from services.gateway.tracking import CALLBACK_COLUMNS, Tracking, events, metadata
from services.gateway.tracking_migrations import LEGACY_CALLBACK_COLUMNS, steps
from services.messaging.dead_letters import group_key, read_dead_letter
from services.messaging.errors import BrokerUnavailable
from services.messaging.failure import EXCEPTION_MESSAGE, FINGERPRINT
from services.messaging.logs import _ContextFilter, event_context
from services.messaging.store import migrate, open_store, store_url
from tests.conftest import Namespace
from tests.integration.test_tracking_store import running_gateway
from tests.support.polling import eventually
from tests.support.queues import take
from tests.unit.test_letters_in_status import a_failure

HOOK = "https://shop.example/hooks/courier"


@dataclass
class FakePublisher:
    """Records confirmed publishes; `down` makes every publish fail as a broker outage would."""

    down: bool = False
    ready: bool = True
    published: list[CallbackRequested] = field(default_factory=list)
    refused: list[CallbackRequested] = field(default_factory=list)

    async def publish_event(self, event: Envelope, *, exchange: str) -> None:
        assert isinstance(event, CallbackRequested) and exchange == "test.events"
        if self.down:
            self.refused.append(event)
            raise BrokerUnavailable("no confirm within 5s")
        self.published.append(event)


@pytest.fixture(params=["sqlite", "postgresql"])
async def engine(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    database_url = None if request.param == "sqlite" else request.getfixturevalue("module_database")
    store = open_store(store_url(database_url, tmp_path, "gateway"))
    yield store
    await store.dispose()


@pytest.fixture
def publisher() -> FakePublisher:
    return FakePublisher()


@pytest.fixture
async def callbacks(engine: AsyncEngine, publisher: FakePublisher) -> AsyncIterator[Callbacks]:
    found = Callbacks(engine, publisher, "test.events")
    yield found
    found.close()


@pytest.fixture
async def tracking(engine: AsyncEngine, callbacks: Callbacks) -> AsyncIterator[Tracking]:
    projection = Tracking(engine, on_final=callbacks.publish_settled)
    await projection.start()
    yield projection
    await projection.close()


def dataset(callback: str | None = HOOK) -> DatasetSubmitted:
    return DatasetSubmitted(
        callbackurl=callback, data=DatasetSubmittedData(name="prices", records=[{"price": 10}])
    )


def step(event: Envelope, state: State, at: datetime, **detail: Any) -> Transition:
    service = "processor" if event.type == "dataset.submitted" else "notifier"
    return Transition(
        event_id=event.id, event_type=event.type, service=service, state=state, at=at, **detail
    )


def published_for(publisher: FakePublisher, *mine: Envelope) -> list[str]:
    """Ids of the events among `mine` a callback was published for (the sweep also finds what
    other tests in the module's PostgreSQL database left open)."""
    ids = {event.id for event in mine}
    return [c.data.event_id for c in publisher.published if c.data.event_id in ids]


async def accept(tracking: Tracking, event: Envelope) -> datetime:
    """Accept and write it (reading the status flushes the accept batch); the accept time."""
    tracking.accepted(event)
    status = await tracking.status(event.id)
    assert status is not None
    accepted_at: datetime = status["accepted_at"]
    return accepted_at


async def test_nothing_is_published_until_every_worker_is_done_then_exactly_once(
    tracking: Tracking, publisher: FakePublisher
) -> None:
    event = dataset()
    t = await accept(tracking, event) + timedelta(milliseconds=10)
    await tracking.apply([step(event, "processing", t, attempt=1)])
    await tracking.apply(
        [step(event, "retrying", t + timedelta(seconds=1), attempt=1, detail="OSError: x")]
    )
    assert publisher.published == []

    done = [
        step(event, "processing", t + timedelta(seconds=5), attempt=2),
        step(event, "succeeded", t + timedelta(seconds=6), attempt=2),
    ]
    await tracking.apply(done)
    [callback] = publisher.published
    assert callback.id == callback_id(event.id, "succeeded")
    assert callback.data.settled_at == t + timedelta(seconds=6)
    assert callback.subject == event.id
    assert "callbackurl" not in callback.model_dump()  # a callback never asks for a callback
    data = callback.data
    assert (data.event_id, data.event_type, data.outcome) == (
        event.id,
        "dataset.submitted",
        "succeeded",
    )
    assert data.callback_url == HOOK
    assert data.settled_at == t + timedelta(seconds=6)
    assert set(data.services) == {"processor"}
    assert (data.services["processor"].state, data.services["processor"].attempt) == (
        "succeeded",
        2,
    )

    await tracking.apply(done)  # the same report again (a redelivery)
    await tracking.apply([step(event, "skipped_duplicate", t + timedelta(seconds=9))])
    assert len(publisher.published) == 1


async def test_the_callback_carries_the_events_correlation_id(
    tracking: Tracking, publisher: FakePublisher
) -> None:
    event = dataset().model_copy(update={"correlationid": "order-42"})
    await tracking.note_callbacks([event])  # as the ingest routes do, before the publish
    t = await accept(tracking, event)
    await tracking.apply([step(event, "succeeded", t + timedelta(seconds=1))])
    [callback] = publisher.published
    assert callback.correlationid == "order-42"


async def test_the_callback_is_logged_under_its_event_not_the_report_that_settled_it(
    tracking: Tracking, caplog: pytest.LogCaptureFixture
) -> None:
    event = dataset()
    await tracking.note_callbacks([event])
    t = await accept(tracking, event)
    caplog.handler.addFilter(_ContextFilter())
    with caplog.at_level(logging.INFO), event_context("report-id", "report-correlation"):
        await tracking.apply([step(event, "succeeded", t + timedelta(seconds=1))])
    [line] = [r for r in caplog.records if r.getMessage() == "callback requested"]
    logged = (line.__dict__["event_id"], line.__dict__["correlation_id"])
    assert logged == (event.id, event.correlation())


async def test_checks_running_side_by_side_publish_a_settlement_once(
    tracking: Tracking, callbacks: Callbacks, publisher: FakePublisher
) -> None:
    """The same report delivered twice at once, the accept writer and the sweep all find the
    settled event together; one of them publishes it."""
    event = dataset()
    t = await accept(tracking, event) + timedelta(milliseconds=10)
    report = [step(event, "succeeded", t, attempt=1)]
    await asyncio.gather(
        tracking.apply(report), tracking.apply(report), callbacks.sweep(), callbacks.sweep()
    )
    assert published_for(publisher, event) == [event.id]


async def test_an_event_without_a_callback_url_publishes_nothing(
    tracking: Tracking, publisher: FakePublisher
) -> None:
    event = dataset(callback=None)
    t = await accept(tracking, event) + timedelta(milliseconds=10)
    await tracking.apply([step(event, "succeeded", t)])
    assert publisher.published == []


async def test_a_dead_letter_posts_its_reason_and_a_replay_that_succeeds_posts_again(
    tracking: Tracking, publisher: FakePublisher
) -> None:
    event = NotificationRequested(
        callbackurl=HOOK,
        data=NotificationRequestedData(channel="email", recipient="a@example.org", subject="s"),
    )
    t = await accept(tracking, event) + timedelta(milliseconds=10)
    await tracking.apply(
        [
            step(event, "processing", t, attempt=1),
            step(
                event,
                "dead_lettered",
                t + timedelta(milliseconds=1),
                attempt=1,
                reason="permanent",
                group="0123456789abcdef",
                detail="PermanentError: the 'email' channel is not configured",
            ),
        ]
    )
    [dead] = publisher.published
    assert dead.data.outcome == "dead_lettered"
    notifier = dead.data.services["notifier"]
    assert (notifier.state, notifier.reason, notifier.group) == (
        "dead_lettered",
        "permanent",
        "0123456789abcdef",
    )
    assert notifier.detail is not None and "not configured" in notifier.detail

    await tracking.apply([step(event, "replayed", t + timedelta(seconds=1))])  # ops replay
    assert len(publisher.published) == 1
    await tracking.apply(
        [
            step(event, "processing", t + timedelta(seconds=2), attempt=1),
            step(event, "succeeded", t + timedelta(seconds=3), attempt=1),
        ]
    )
    assert [c.data.outcome for c in publisher.published] == ["dead_lettered", "succeeded"]
    assert publisher.published[0].id != publisher.published[1].id


async def test_a_failed_publish_leaves_the_callback_due_and_the_redelivery_publishes_it(
    tracking: Tracking, publisher: FakePublisher
) -> None:
    """A crash (or a broker outage) between writing the final state and the confirmed publish:
    the status report is not acknowledged, comes back, and then the callback goes out, under the
    id the first try had."""
    event = dataset()
    t = await accept(tracking, event) + timedelta(milliseconds=10)
    report = [step(event, "processing", t, attempt=1), step(event, "succeeded", t, attempt=1)]
    publisher.down = True
    with pytest.raises(BrokerUnavailable):
        await tracking.apply(report)
    # (The accept writer's own look at settled callbacks may have tried too, and failed.)
    assert publisher.published == [] and publisher.refused

    publisher.down = False
    await tracking.apply(report)  # the redelivered report
    [callback] = publisher.published
    assert callback.id == publisher.refused[0].id
    await tracking.apply(report)
    assert len(publisher.published) == 1


async def test_a_report_that_overtakes_the_accept_still_gets_its_callback(
    tracking: Tracking, publisher: FakePublisher
) -> None:
    """The service finished, and its report was applied, before the gateway wrote the accept
    (and with it the callback URL): the accept writer finds the settled event."""
    event = dataset()
    t = datetime.now(UTC)
    await tracking.apply([step(event, "succeeded", t, attempt=1)])
    assert publisher.published == []
    tracking.accepted(event)

    async def published() -> None:
        assert [c.data.event_id for c in publisher.published] == [event.id]

    await eventually(published)


async def test_a_url_noted_before_publishing_survives_a_gateway_that_died_before_the_accept(
    engine: AsyncEngine, tracking: Tracking, publisher: FakePublisher
) -> None:
    """The route stores the URL before it publishes; the accept itself is written a moment
    after the 202. A gateway that dies in between never writes it, yet the callback is due
    as soon as the report arrives (here: read by a fresh projection, as after a restart)."""
    event = dataset()
    await tracking.note_callbacks([event])  # what the route does; then the process dies
    restarted = Tracking(
        engine, on_final=Callbacks(engine, publisher, "test.events").publish_settled
    )
    await restarted.start()
    try:
        await restarted.apply([step(event, "succeeded", datetime.now(UTC), attempt=1)])
    finally:
        await restarted.close()
    assert published_for(publisher, event) == [event.id]


async def test_a_url_noted_before_publishing_outlives_the_retention_run_at_restart(
    engine: AsyncEngine, tracking: Tracking
) -> None:
    """Retention runs at every start-up: a URL noted by a gateway that died before its accept
    has no accept time and perhaps no status yet, and must not be taken for an old event."""
    event = dataset()
    await tracking.note_callbacks([event])  # then the process dies
    await tracking.prune(timedelta(days=30))
    async with engine.connect() as conn:
        url = await conn.scalar(select(events.c.callback_url).where(events.c.event_id == event.id))
    assert url == HOOK


async def test_a_url_noted_for_an_event_never_accepted_goes_after_the_retention(
    engine: AsyncEngine, tracking: Tracking
) -> None:
    event = dataset()  # noted, then the broker refused it and the client gave up
    await tracking.note_callbacks([event])
    async with engine.begin() as conn:
        await conn.execute(
            update(events)
            .where(events.c.event_id == event.id)
            .values(noted_at=datetime.now(UTC) - timedelta(days=31))
        )
    assert await tracking.prune(timedelta(days=30)) >= 1
    async with engine.connect() as conn:
        assert await conn.scalar(select(events.c.seq).where(events.c.event_id == event.id)) is None


async def test_noting_urls_keeps_the_latest_until_accepted_and_skips_events_without_one(
    engine: AsyncEngine, tracking: Tracking
) -> None:
    # Until an accept, the latest attempt's URL is the one its accept would carry.
    first, plain = dataset(), dataset(callback=None)
    await tracking.note_callbacks([first.model_copy(update={"callbackurl": "https://a.example/"})])
    await tracking.note_callbacks([first, plain])

    async def noted() -> dict[str, str | None]:
        async with engine.connect() as conn:
            found = await conn.execute(select(events.c.event_id, events.c.callback_url))
            return {event_id: url for event_id, url in found}

    rows = await noted()
    assert rows.get(first.id) == HOOK
    assert plain.id not in rows
    await accept(tracking, first)
    await tracking.note_callbacks(
        [first.model_copy(update={"callbackurl": "https://other.example/"})]
    )
    assert (await noted()).get(first.id) == HOOK  # an accepted event keeps its URL


async def test_settled_events_are_found_among_more_ids_than_a_statement_can_bind(
    engine: AsyncEngine, callbacks: Callbacks, publisher: FakePublisher
) -> None:
    # After a store outage the accept writer writes its whole backlog (up to 100,000) at once
    # and looks for callbacks among all of it: one statement passed the databases' limits.
    unhooked = Tracking(engine)
    await unhooked.start()
    try:
        settled = dataset()
        t = await accept(unhooked, settled) + timedelta(milliseconds=10)
        await unhooked.apply([step(settled, "succeeded", t)])
    finally:
        await unhooked.close()
    others = [f"never-seen-{i}" for i in range(40_000)]
    await callbacks.publish_settled([*others, settled.id])
    assert published_for(publisher, settled) == [settled.id]


async def test_the_sweep_publishes_what_no_trigger_brings_back(
    engine: AsyncEngine, callbacks: Callbacks, publisher: FakePublisher
) -> None:
    """A settled event whose check died with the process (here: a projection without the hook)
    is found by the periodic sweep, once; an event only cancelled is closed with nothing sent."""
    unhooked = Tracking(engine)
    await unhooked.start()
    try:
        settled, cancelled, running = dataset(), dataset(), dataset()
        for event in (settled, cancelled, running):
            t = await accept(unhooked, event) + timedelta(milliseconds=10)
        await unhooked.apply(
            [
                step(settled, "succeeded", t),
                step(cancelled, "cancelled", t),
                step(running, "processing", t),
            ]
        )
    finally:
        await unhooked.close()

    publisher.ready = False
    await callbacks.sweep()  # not connected yet: nothing tried
    assert publisher.published == [] and publisher.refused == []
    publisher.ready = True
    await callbacks.sweep()
    assert published_for(publisher, settled, cancelled, running) == [settled.id]
    await callbacks.sweep()
    assert published_for(publisher, settled, cancelled, running) == [settled.id]
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                text(
                    "SELECT event_id, callback_outcome FROM status_events "
                    "WHERE event_id IN (:a, :b, :c)"
                ),
                {"a": settled.id, "b": cancelled.id, "c": running.id},
            )
        ).all()
    assert dict(rows) == {settled.id: "succeeded", cancelled.id: "cancelled", running.id: None}


async def test_an_older_store_gets_the_callback_columns(fresh_engine: AsyncEngine) -> None:
    """A store migrated by an older version (two steps, no callback columns) is upgraded by
    ALTER TABLE at start-up, keeping its rows."""
    await migrate(fresh_engine, "gateway.tracking", steps(metadata)[:2])
    async with fresh_engine.begin() as conn:
        await conn.execute(text("DROP INDEX ix_tracking_callbacks_open"))
        for column in LEGACY_CALLBACK_COLUMNS:
            await conn.execute(text(f"ALTER TABLE tracking_events DROP COLUMN {column}"))
        await conn.execute(text("INSERT INTO tracking_events (event_id) VALUES ('old-event')"))

    upgraded = Tracking(fresh_engine)
    await upgraded.start()
    try:
        async with fresh_engine.connect() as conn:
            columns = await conn.run_sync(
                lambda sync: {c["name"] for c in inspect(sync).get_columns(events.name)}
            )
            indexes = await conn.run_sync(
                lambda sync: {i["name"] for i in inspect(sync).get_indexes(events.name)}
            )
        assert set(CALLBACK_COLUMNS) <= columns
        assert "ix_status_callbacks_open" in indexes
        assert await upgraded.status("old-event") is not None
        event = dataset()
        await accept(upgraded, event)
        async with fresh_engine.connect() as conn:
            url = await conn.scalar(
                text("SELECT callback_url FROM status_events WHERE event_id = :id"),
                {"id": event.id},
            )
        assert url == HOOK
    finally:
        await upgraded.close()


async def noted_by_a_store_of_version(
    engine: AsyncEngine, version: int, column: str, event: Envelope
) -> object:
    """`column` of `event`'s row, noted with its callback URL by a store `version` made
    (before the column) and then upgraded at start-up."""
    await migrate(engine, "gateway.tracking", steps(metadata)[:version])
    async with engine.begin() as conn:
        await conn.execute(text(f"ALTER TABLE status_events DROP COLUMN {column}"))
    upgraded = Tracking(engine)
    await upgraded.start()
    try:
        await upgraded.note_callbacks([event])
        async with engine.connect() as conn:
            return await conn.scalar(select(events.c[column]).where(events.c.event_id == event.id))
    finally:
        await upgraded.close()


async def test_a_store_of_version_6_gets_the_noted_at_column(fresh_engine: AsyncEngine) -> None:
    assert await noted_by_a_store_of_version(fresh_engine, 6, "noted_at", dataset()) is not None


async def test_a_store_of_version_7_gets_the_callback_correlation_column(
    fresh_engine: AsyncEngine,
) -> None:
    event = dataset()
    noted = await noted_by_a_store_of_version(fresh_engine, 7, "callback_correlation", event)
    assert noted == event.correlation()


@pytest.mark.broker
async def test_a_delivery_the_broker_dead_letters_gets_its_callback(
    namespace: Namespace, tmp_path: Path
) -> None:
    """No consumer could report this one (it kept crashing its consumer): the gateway's
    dead-letter drain marks it dead-lettered, and publishes the callback request, through the
    real broker, to the notifier's queue."""
    async with running_gateway(namespace, tmp_path, None, delivery_limit=1) as client:
        response = await client.post(
            "/v1/events",
            json={
                "type": "notification.requested",
                "callback_url": HOOK,
                "data": {"recipient": "r@example.org", "subject": "hi"},
            },
        )
        assert response.status_code == 202, response.text
        event_id = response.json()["id"]
        notifier_queue = work_queue(namespace.name, "notifier")
        connection = await aio_pika.connect(namespace.amqp_url)
        async with connection:  # a consumer that returns the message until the broker gives up
            channel = await connection.channel()
            queue = await channel.get_queue(notifier_queue)
            returned = 0
            while (message := await queue.get(fail=False)) is not None or returned == 0:
                if message is not None:
                    assert message.type == "notification.requested"
                    await message.nack(requeue=True)
                    returned += 1

        [message] = await take(namespace.amqp_url, notifier_queue, 1)
        callback = EVENT_ADAPTER.validate_json(message.body)
        assert isinstance(callback, CallbackRequested)
        assert (callback.data.event_id, callback.data.outcome) == (event_id, "dead_lettered")
        assert callback.data.callback_url == HOOK
        notifier = callback.data.services["notifier"]
        assert (notifier.state, notifier.reason) == ("dead_lettered", "delivery_limit")


# --- outcomes told twice (after a crash, or by the letter and the consumer) ---------------------


def hooked_notification() -> NotificationRequested:
    return NotificationRequested(
        callbackurl=HOOK, data=NotificationRequestedData(recipient="a@example.org", subject="s")
    )


async def test_a_report_told_again_from_the_inbox_changes_nothing_and_posts_nothing(
    tracking: Tracking, publisher: FakePublisher
) -> None:
    event = hooked_notification()
    t = await accept(tracking, event) + timedelta(milliseconds=10)
    succeeded = step(event, "succeeded", t + timedelta(milliseconds=3), attempt=2)
    await tracking.apply([step(event, "processing", t, attempt=2), succeeded])
    told = await tracking.status(event.id)

    await tracking.apply([succeeded])  # a restarted service's `Inbox.recent`

    assert await tracking.status(event.id) == told
    assert [c.data.outcome for c in publisher.published] == ["succeeded"]


async def test_a_letter_and_its_consumers_report_are_one_dead_lettered(
    tracking: Tracking, publisher: FakePublisher
) -> None:
    """Whichever comes first, the other adds nothing: one history entry, one callback."""
    event = hooked_notification()
    t = await accept(tracking, event) + timedelta(milliseconds=10)
    failure = a_failure()
    headers = failure.dead_letter_headers(
        {},
        reason="permanent",
        service="notifier",
        queue="ns.notifier",
        event_id=event.id,
        event_type=event.type,
    )
    reported = step(
        event,
        "dead_lettered",
        failure.at,
        attempt=failure.attempt,
        reason="permanent",
        group=group_key(headers[FINGERPRINT], headers[EXCEPTION_MESSAGE]),
        detail=failure.summary(),
    )  # what Consumer._dead_letter reports
    letter = read_dead_letter(
        "ns",
        body=event.model_dump_json().encode(),
        headers=headers,
        message_id=event.id,
        message_type=event.type,
        correlation_id=None,
    )
    from_letter = dead_lettered(letter, stored_at=datetime.now(UTC))
    assert from_letter is not None
    await tracking.apply([step(event, "processing", t, attempt=1), reported])
    told = await tracking.status(event.id)

    await tracking.apply([from_letter])

    assert await tracking.status(event.id) == told
    assert [c.data.outcome for c in publisher.published] == ["dead_lettered"]


async def test_a_detail_that_escaping_lengthens_still_fits_its_callback(
    tracking: Tracking, publisher: FakePublisher
) -> None:
    """Control characters are escaped for the store (four characters each): cut again, or the
    callback could not carry it and no callback of that report would go out."""
    event, other = hooked_notification(), hooked_notification()
    t = await accept(tracking, event) + timedelta(milliseconds=10)
    await accept(tracking, other)
    detail = ("ValueError: " + "\r" * 1000)[:1000]
    await tracking.apply(
        [
            step(event, "dead_lettered", t, attempt=1, reason="permanent", detail=detail),
            step(other, "succeeded", t, attempt=1),
        ]
    )
    assert sorted(c.data.outcome for c in publisher.published) == ["dead_lettered", "succeeded"]
    dead = next(c for c in publisher.published if c.data.outcome == "dead_lettered")
    shown = dead.data.services["notifier"].detail
    assert shown is not None and len(shown) == 1000 and shown.startswith("ValueError: \\r")


async def test_a_stored_detail_longer_than_a_callback_holds_is_cut_not_left_uncalled(
    tracking: Tracking, publisher: FakePublisher, callbacks: Callbacks, engine: AsyncEngine
) -> None:
    """Rows written before details were cut after escaping (or by hand) may be longer: the
    sweep must still build and send the callback."""
    event = hooked_notification()
    t = await accept(tracking, event) + timedelta(milliseconds=10)
    publisher.down = True  # the callback stays due
    with pytest.raises(BrokerUnavailable):
        await tracking.apply([step(event, "dead_lettered", t, attempt=1, reason="permanent")])
    async with engine.begin() as conn:
        await conn.execute(text("UPDATE status_states SET detail = :d"), {"d": "\\r" * 700})
    publisher.down = False
    await callbacks.sweep()
    [dead] = publisher.published
    detail = dead.data.services["notifier"].detail
    assert detail is not None and len(detail) == 1000


async def test_an_events_status_tells_its_callback_and_how_its_delivery_went(
    tracking: Tracking, publisher: FakePublisher
) -> None:
    # A callback that could not be delivered (dead-lettered at the notifier) showed nowhere on
    # the event: its client, polling the status, could not tell it would never come.
    event = dataset()
    t = await accept(tracking, event) + timedelta(milliseconds=10)
    status = await tracking.status(event.id)
    assert status is not None and status["callback"] is None  # not settled: nothing asked yet
    await tracking.apply([step(event, "succeeded", t, attempt=1)])
    [request] = publisher.published
    status = await tracking.status(event.id)
    assert status is not None
    assert status["callback"] == {
        "id": request.id,
        "outcome": "succeeded",
        "settled_at": t,
        "state": "pending",  # the notifier has not reported on it yet
        "detail": None,
    }
    await tracking.apply(
        [step(request, "dead_lettered", t + timedelta(seconds=9), detail="webhook answered 410")]
    )
    status = await tracking.status(event.id)
    assert status is not None
    assert (status["callback"]["state"], status["callback"]["detail"]) == (
        "dead_lettered",
        "webhook answered 410",
    )
