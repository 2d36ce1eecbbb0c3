"""The operators' failure store on both databases: SQLite (the default) and PostgreSQL.

Dead letters are written as values (`DeadLetter`); times the tests depend on (when a letter was
dead-lettered, claimed or closed) are set in the table directly, so nothing waits for a clock.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, event, func, inspect, select, update
from sqlalchemy.exc import IntegrityError

from services.messaging import failure as f
from services.messaging.dead_letters import DeadLetter, read_dead_letter
from services.messaging.store import open_store, store_url
from services.ops.store import RECORDED_IDS, FailureStore, Filter, dead_letters
from tests.support.plans import query_plan

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
LEASE = timedelta(minutes=5)


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[FailureStore]:
    if request.param == "sqlite":
        url = store_url(None, tmp_path, "gateway")
    else:
        url = store_url(request.getfixturevalue("postgres_database"), tmp_path, "gateway")
    engine = open_store(url)
    failures = FailureStore(engine)
    await failures.start()
    await failures.start()  # start-up is idempotent: a restarted gateway migrates nothing twice
    yield failures
    await engine.dispose()


def letter(**overrides: Any) -> DeadLetter:
    values: dict[str, Any] = {
        "id": uuid.uuid4().hex,
        "service": "notifier",
        "queue": "ns.notifier",
        "event_id": str(uuid.uuid4()),
        "event_type": "notification.requested",
        "reason": "retries_exhausted",
        "attempts": 3,
        "replays": 0,
        "first_failure": T0,
        "last_failure": T0 + timedelta(seconds=30),
        "exception_type": "builtins.ConnectionError",
        "exception_message": "connection refused",
        "traceback": "Traceback (most recent call last):\n...\nConnectionError: refused",
        "fingerprint": "f" * 16,
        "group": "g-connection",
        "body": b'{"id": "x"}',
        "headers": {"courier-reason": "retries_exhausted", "courier-attempt": 3},
        "correlation_id": None,
    }
    values.update(overrides)
    return DeadLetter(**values)


async def add_all(store: FailureStore, letters: Iterable[DeadLetter]) -> list[DeadLetter]:
    added = list(letters)
    for item in added:
        assert await store.add(item)
    return added


async def set_column(store: FailureStore, column: str, values: dict[str, Any]) -> None:
    """Set one column of some letters directly (times the test controls)."""
    async with store.engine.begin() as conn:
        for letter_id, value in values.items():
            await conn.execute(
                update(dead_letters).where(dead_letters.c.id == letter_id).values({column: value})
            )


async def status_of(store: FailureStore, ids: Iterable[str]) -> dict[str, str]:
    async with store.engine.connect() as conn:
        rows = (
            await conn.execute(
                select(dead_letters.c.id, dead_letters.c.status).where(
                    dead_letters.c.id.in_(list(ids))
                )
            )
        ).all()
    return {row.id: row.status for row in rows}


async def all_pages(store: FailureStore, selection: Filter, limit: int) -> list[list[str]]:
    pages: list[list[str]] = []
    cursor: str | None = None
    while True:
        page = await store.page(selection, limit=limit, cursor=cursor)
        pages.append([item["id"] for item in page.items])
        if page.next_cursor is None:
            return pages
        assert len(pages) < 100, "paging does not end"
        cursor = page.next_cursor


# --- ingest ------------------------------------------------------------------------------------


async def test_add_is_idempotent_by_id(store: FailureStore) -> None:
    first = letter()
    assert await store.add(first)
    # The drain may receive the same dead letter again (a redelivery): stored once.
    assert not await store.add(replace(first, exception_message="changed"))
    assert await store.count(Filter(status=None)) == 1
    stored = await store.get(first.id)
    assert stored is not None
    assert stored["exception_message"] == "connection refused"
    assert stored["status"] == "dead"
    assert [entry["action"] for entry in stored["history"]] == ["dead_lettered"]
    assert stored["body"] == first.body and stored["headers"] == first.headers
    assert stored["dead_lettered_at"].tzinfo is not None


async def test_concurrent_adds_of_one_letter_store_it_once(store: FailureStore) -> None:
    same = letter()
    results = await asyncio.gather(*(store.add(same) for _ in range(4)))
    assert sorted(results) == [False, False, False, True]
    assert await store.count(Filter(status=None)) == 1


# --- listing -----------------------------------------------------------------------------------


async def test_listing_is_newest_first_and_paging_neither_repeats_nor_skips(
    store: FailureStore,
) -> None:
    letters = await add_all(store, (letter() for _ in range(23)))
    # Several letters share a timestamp, so the cursor has to break ties by id.
    times = {item.id: T0 + timedelta(seconds=i // 3) for i, item in enumerate(letters)}
    await set_column(store, "dead_lettered_at", times)
    expected = sorted(times, key=lambda i: (times[i], i), reverse=True)

    first = await store.page(Filter(), limit=50)
    assert [item["id"] for item in first.items] == expected
    assert first.next_cursor is None
    assert "body" not in first.items[0] and "traceback" not in first.items[0]

    for size in (1, 4, 5, 22, 23):
        pages = await all_pages(store, Filter(), limit=size)
        assert [i for page in pages for i in page] == expected, f"page size {size}"
        assert all(len(page) == size for page in pages[:-1])


async def test_paging_with_a_filter_keeps_to_the_filter(store: FailureStore) -> None:
    letters = await add_all(
        store, (letter(service="notifier" if i % 2 else "processor") for i in range(12))
    )
    await set_column(
        store,
        "dead_lettered_at",
        {item.id: T0 + timedelta(seconds=i // 4) for i, item in enumerate(letters)},
    )
    pages = await all_pages(store, Filter(service="processor"), limit=2)
    ids = [i for page in pages for i in page]
    assert len(ids) == len(set(ids)) == 6
    assert set(ids) == {item.id for item in letters if item.service == "processor"}


async def test_each_filter_narrows_the_listing(store: FailureStore) -> None:
    letters = await add_all(
        store,
        [
            letter(
                service="processor",
                event_type="dataset.submitted",
                reason="permanent",
                exception_type="services.messaging.errors.PermanentError",
                exception_message="Dataset refused by Warehouse",
                group="g-refused",
            ),
            letter(
                reason="invalid",
                exception_type="pydantic_core._pydantic_core.ValidationError",
                exception_message="1 validation error for notification.requested",
                group="g-invalid",
                event_type=None,
            ),
            letter(exception_message="connection refused by smtp.example.org"),
            letter(reason="delivery_limit", exception_type=None, group="g-broker"),
            letter(),
        ],
    )
    refused, invalid, smtp, broker, plain = letters
    await set_column(
        store,
        "dead_lettered_at",
        {item.id: T0 + timedelta(minutes=i) for i, item in enumerate(letters)},
    )

    async def ids(selection: Filter) -> set[str]:
        return {item["id"] for item in (await store.page(selection, limit=100)).items}

    everyone = {item.id for item in letters}
    assert await ids(Filter()) == everyone
    assert await ids(Filter(service="processor")) == {refused.id}
    assert await ids(Filter(service="notifier")) == everyone - {refused.id}
    assert await ids(Filter(event_type="dataset.submitted")) == {refused.id}
    assert await ids(Filter(group="g-connection")) == {smtp.id, plain.id}
    assert await ids(Filter(reason="invalid")) == {invalid.id}
    assert await ids(Filter(reason="delivery_limit")) == {broker.id}
    assert await ids(Filter(exception_type="builtins.ConnectionError")) == {smtp.id, plain.id}
    assert await ids(Filter(since=T0 + timedelta(minutes=2))) == {smtp.id, broker.id, plain.id}
    assert await ids(Filter(until=T0 + timedelta(minutes=2))) == {refused.id, invalid.id}
    window = Filter(since=T0 + timedelta(minutes=1), until=T0 + timedelta(minutes=3))
    assert await ids(window) == {invalid.id, smtp.id}
    # Text search: case-insensitive, in the message and in the exception type.
    assert await ids(Filter(text="WAREHOUSE")) == {refused.id}
    assert await ids(Filter(text="smtp.example")) == {smtp.id}
    assert await ids(Filter(text="validationerror")) == {invalid.id}
    assert await ids(Filter(text="refused")) == {refused.id, smtp.id, broker.id, plain.id}
    # Filters combine; an explicit id list narrows too.
    assert await ids(Filter(service="notifier", text="smtp")) == {smtp.id}
    assert await ids(Filter(ids=(smtp.id, refused.id), service="notifier")) == {smtp.id}
    assert await ids(Filter(service="nobody")) == set()
    # Status: closed letters leave the default (dead) listing.
    await set_column(store, "status", {plain.id: "replayed"})
    assert await ids(Filter()) == everyone - {plain.id}
    assert await ids(Filter(status="replayed")) == {plain.id}
    assert await ids(Filter(status=None)) == everyone
    assert await store.count(Filter(group="g-connection")) == 1


async def test_an_exception_type_is_found_by_its_dotted_name_or_its_last_parts(
    store: FailureStore,
) -> None:
    # The tables show `PermanentError`; an operator copies that into --exception-type.
    permanent, lookalike, _ = await add_all(
        store,
        [
            letter(exception_type="services.messaging.errors.PermanentError"),
            letter(exception_type="app.NotPermanentError"),
            letter(exception_type="app.Permanent_Error"),
        ],
    )

    async def ids(exception_type: str) -> set[str]:
        found = await store.page(Filter(exception_type=exception_type), limit=100)
        return {item["id"] for item in found.items}

    assert await ids("services.messaging.errors.PermanentError") == {permanent.id}
    assert await ids("PermanentError") == {permanent.id}
    assert await ids("errors.PermanentError") == {permanent.id}
    assert await ids("NotPermanentError") == {lookalike.id}
    assert await ids("Permanent%Error") == set()  # taken literally
    assert await ids("permanenterror") == set()  # in its case, on every database
    assert await ids("services.messaging.errors.permanenterror") == set()
    assert await ids("rors.PermanentError") == set()  # whole parts only


async def test_a_time_filter_means_the_same_moment_in_any_utc_offset(
    store: FailureStore, request: pytest.FixtureRequest
) -> None:
    early, late = await add_all(store, [letter(), letter()])
    await set_column(store, "dead_lettered_at", {early.id: T0, late.id: T0 + timedelta(minutes=30)})
    # 13:15 at UTC+02:00 is 11:15 UTC: both letters (12:00 and 12:30 UTC) come after it.
    plus_two = timezone(timedelta(hours=2))
    since = (T0 - timedelta(minutes=45)).astimezone(plus_two)
    page = await store.page(Filter(since=since), limit=10)
    assert {item["id"] for item in page.items} == {early.id, late.id}
    until = (T0 + timedelta(minutes=15)).astimezone(plus_two)
    page = await store.page(Filter(until=until), limit=10)
    assert {item["id"] for item in page.items} == {early.id}


async def test_text_search_takes_the_text_literally(store: FailureStore) -> None:
    percent, other = await add_all(
        store,
        [
            letter(exception_message="disk 100% full"),
            letter(exception_message="disk 100 blocks full"),
        ],
    )
    page = await store.page(Filter(text="100%"), limit=10)
    assert [item["id"] for item in page.items] == [percent.id]
    underscore = await store.page(Filter(text="k_1"), limit=10)  # `_` is no wildcard either
    assert underscore.items == []
    assert other.id  # listed only by a literal search for its own text


async def test_show_links_the_other_letters_of_the_same_event(store: FailureStore) -> None:
    event_id = str(uuid.uuid4())
    first, second = await add_all(
        store, [letter(event_id=event_id), letter(event_id=event_id, replays=1)]
    )
    unrelated = await add_all(store, [letter()])
    await set_column(store, "dead_lettered_at", {first.id: T0, second.id: T0 + timedelta(hours=1)})
    shown = await store.get(second.id)
    assert shown is not None
    assert [r["id"] for r in shown["related"]] == [first.id]
    assert shown["related"][0]["replays"] == 0
    assert unrelated[0].id not in {r["id"] for r in shown["related"]}
    assert await store.get("no-such-letter") is None


async def test_letters_without_an_event_id_are_not_related_to_each_other(
    store: FailureStore,
) -> None:
    # Bodies that were not events at all (no message id): nothing links them to each other.
    one, _ = await add_all(store, [letter(event_id=None), letter(event_id=None)])
    shown = await store.get(one.id)
    assert shown is not None
    assert shown["related"] == []


async def test_a_letter_with_oversized_fields_is_stored_cut_to_fit(store: FailureStore) -> None:
    """Anything may publish to a work queue: a message id longer than an event id may be must
    still reach the operators (PostgreSQL would refuse it, and the drain would retry it for
    ever)."""
    long_id = "m" * 300
    oversized = letter(event_id=long_id, event_type="t" * 300, correlation_id=long_id)
    assert await store.add(oversized)
    shown = await store.get(oversized.id)
    assert shown is not None
    assert shown["event_id"] == long_id[:128] and shown["event_type"] == "t" * 128


# --- groups ------------------------------------------------------------------------------------


async def test_groups_count_and_aggregate_services_and_event_types(store: FailureStore) -> None:
    letters = await add_all(
        store,
        [
            *(letter(group="g-big") for _ in range(3)),
            letter(group="g-big", service="processor", event_type="dataset.submitted"),
            letter(group="g-small", reason="permanent", exception_type="x.Refused"),
            letter(group="g-small", reason="permanent", exception_type="x.Refused"),
            letter(group="g-one", reason="invalid", event_type=None),
        ],
    )
    await set_column(
        store,
        "dead_lettered_at",
        {item.id: T0 + timedelta(minutes=i) for i, item in enumerate(letters)},
    )
    groups = await store.groups(Filter())
    assert [(g.group, g.count) for g in groups] == [("g-big", 4), ("g-small", 2), ("g-one", 1)]
    big, small, one = groups
    assert big.services == ("notifier", "processor")
    assert big.event_types == ("dataset.submitted", "notification.requested")
    assert (big.first_seen, big.last_seen) == (T0, T0 + timedelta(minutes=3))
    assert big.exception_type == "builtins.ConnectionError"
    assert big.example_message == "connection refused"
    assert big.reason == "retries_exhausted"
    assert (small.reason, small.exception_type, small.services) == (
        "permanent",
        "x.Refused",
        ("notifier",),
    )
    assert one.event_types == ()
    # A filter applies before grouping; closed letters do not count as dead.
    only_processor = await store.groups(Filter(service="processor"))
    assert [(g.group, g.count, g.services) for g in only_processor] == [
        ("g-big", 1, ("processor",))
    ]
    await set_column(store, "status", {letters[0].id: "discarded"})
    assert [(g.group, g.count) for g in await store.groups(Filter(), limit=1)] == [("g-big", 3)]


async def test_groups_stand_when_a_purge_removes_an_example_meanwhile(
    postgres_database: str, tmp_path: Path
) -> None:
    # The examples were read in a statement of their own: on PostgreSQL, which reads each
    # statement afresh, one a concurrent purge removed in between was a KeyError (a 500).
    # (SQLite reads a connection's statements in one snapshot.)
    engine = open_store(store_url(postgres_database, tmp_path, "gateway"))
    store = FailureStore(engine)
    await store.start()
    try:
        await _groups_stand_a_purge(store)
    finally:
        await engine.dispose()


async def _groups_stand_a_purge(store: FailureStore) -> None:
    letters = await add_all(store, [letter(group="g-purged") for _ in range(2)])
    example = max(item.id for item in letters)
    purged: list[str] = []

    def purge_after_the_first(conn: Any, *_: Any) -> None:
        if not purged:
            purged.append(example)
            conn.execute(delete(dead_letters).where(dead_letters.c.id == example))

    event.listen(store.engine.sync_engine, "after_cursor_execute", purge_after_the_first)
    try:
        groups = await store.groups(Filter(group="g-purged"))
    finally:
        event.remove(store.engine.sync_engine, "after_cursor_execute", purge_after_the_first)
    assert purged == [example]
    assert [(g.group, g.count, g.exception_type) for g in groups] == [
        ("g-purged", 2, "builtins.ConnectionError")
    ]


async def test_grouping_reads_only_the_covering_index_on_sqlite(tmp_path: Path) -> None:
    """With 100,000 letters the wide rows are what make grouping slow: the counts, spans and
    spreads must come from the grouping index alone (bench/dlq_store.py prints the timings)."""
    engine = open_store(store_url(None, tmp_path, "gateway"))
    try:
        await FailureStore(engine).start()
        c = dead_letters.c
        query = (
            select(c.group_key, func.count(), func.min(c.dead_lettered_at), func.max(c.id))
            .where(Filter(service="notifier").where())
            .group_by(c.group_key)
        )
        async with engine.connect() as conn:
            plan = await query_plan(conn, query)
    finally:
        await engine.dispose()
    assert any("COVERING INDEX ix_ops_dl_groups" in step for step in plan), plan


async def test_a_store_of_an_earlier_version_gains_the_grouping_index(tmp_path: Path) -> None:
    url = store_url(None, tmp_path, "gateway")
    engine = open_store(url)
    try:
        await FailureStore(engine).start()
        async with engine.begin() as conn:  # the store as version 1 left it
            await conn.exec_driver_sql("DROP INDEX ix_ops_dl_groups")
            await conn.exec_driver_sql(
                "UPDATE courier_migrations SET version = 1 WHERE component = 'ops.failures'"
            )
        await FailureStore(engine).start()
        async with engine.connect() as conn:
            names = await conn.run_sync(
                lambda sync: {i["name"] for i in inspect(sync).get_indexes("ops_dead_letters")}
            )
    finally:
        await engine.dispose()
    assert "ix_ops_dl_groups" in names


# --- claims ------------------------------------------------------------------------------------


async def test_concurrent_claims_of_one_selection_take_disjoint_sets(store: FailureStore) -> None:
    letters = await add_all(store, (letter() for _ in range(12)))
    everyone = {item.id for item in letters}
    claims = await asyncio.gather(
        *(store.claim(Filter(group="g-connection"), limit=100, lease=LEASE) for _ in range(4))
    )
    taken = [set(claimed) for _, claimed in claims]
    assert sum(len(ids) for ids in taken) == len(everyone)
    assert set().union(*taken) == everyone
    for i, ids in enumerate(taken):
        for other in taken[i + 1 :]:
            assert not ids & other
    assert set((await status_of(store, everyone)).values()) == {"replaying"}
    # Claimed letters leave the dead listing and cannot be claimed again within the lease.
    assert await store.count(Filter()) == 0
    _, again = await store.claim(Filter(group="g-connection"), limit=100, lease=LEASE)
    assert again == []


async def oldest_held_by_a_replay_not_yet_committed(
    store: FailureStore, take: Callable[[], Coroutine[Any, Any, list[str]]]
) -> tuple[list[str], list[str]]:
    """20 letters, the 10 oldest claimed by a replay that has not committed yet when `take`
    (a claim or a discard of the same selection) looks: what it took, and the 10 newest."""
    letters = await add_all(store, (letter() for _ in range(20)))
    await set_column(
        store,
        "dead_lettered_at",
        {item.id: T0 + timedelta(seconds=i) for i, item in enumerate(letters)},
    )
    oldest, rest = [i.id for i in letters[:10]], [i.id for i in letters[10:]]
    async with store.engine.connect() as other:
        await other.execute(
            update(dead_letters)
            .where(dead_letters.c.id.in_(oldest))
            .values(status="replaying", claim="other", claimed_at=datetime.now(UTC))
        )
        taking = asyncio.create_task(take())
        await asyncio.sleep(0.5)  # it looks while the other has not committed
        await other.commit()
    return await taking, rest


async def test_a_claim_racing_another_takes_the_letters_the_other_did_not(
    store: FailureStore,
) -> None:
    # It took none of the rest: a replay that moved nothing while matching letters stayed dead.
    async def claim() -> list[str]:
        return (await store.claim(Filter(), limit=10, lease=LEASE))[1]

    claimed, rest = await oldest_held_by_a_replay_not_yet_committed(store, claim)
    assert claimed == rest


async def test_a_discard_racing_a_replay_takes_the_letters_the_replay_did_not(
    store: FailureStore,
) -> None:
    async def discard() -> list[str]:
        discarded = await store.discard(
            Filter(), limit=10, reason="noise", actor="ops", action_id=uuid.uuid4().hex
        )
        return [letter.id for letter in discarded]

    discarded, rest = await oldest_held_by_a_replay_not_yet_committed(store, discard)
    assert sorted(discarded) == sorted(rest)


async def test_a_claim_takes_at_most_its_limit_oldest_first(store: FailureStore) -> None:
    letters = await add_all(store, (letter() for _ in range(5)))
    await set_column(
        store,
        "dead_lettered_at",
        {item.id: T0 - timedelta(minutes=i) for i, item in enumerate(letters)},
    )
    _, claimed = await store.claim(Filter(), limit=2, lease=LEASE)
    assert claimed == [letters[4].id, letters[3].id]
    # What a replay reads back is the dead letter as it was stored: body, headers, story.
    assert await store.letter(letters[4].id) == letters[4]


async def test_a_claim_past_its_lease_is_taken_over(store: FailureStore) -> None:
    letters = await add_all(store, (letter() for _ in range(3)))
    ids = {item.id for item in letters}
    dead_token, claimed = await store.claim(Filter(), limit=10, lease=LEASE)
    assert set(claimed) == ids
    _, none = await store.claim(Filter(), limit=10, lease=LEASE)
    assert none == []

    # The replay that claimed them died; its lease runs out.
    await set_column(store, "claimed_at", dict.fromkeys(ids, datetime.now(UTC) - 2 * LEASE))
    token, taken = await store.claim(Filter(), limit=10, lease=LEASE)
    assert set(taken) == ids and token != dead_token

    # The dead replay can no longer finish them; the new owner can.
    assert await store.mark_replayed([letters[0].id], dead_token, "old-action", "ghost") == set()
    await store.release(dead_token)
    assert set((await status_of(store, ids)).values()) == {"replaying"}
    assert await store.mark_replayed([letters[0].id], token, "action-1", "tester") == {
        letters[0].id
    }
    shown = await store.get(letters[0].id)
    assert shown is not None
    assert shown["status"] == "replayed" and shown["closed_at"] is not None
    assert shown["history"][-1]["action"] == "replayed"
    assert shown["history"][-1]["actor"] == "tester"
    assert shown["history"][-1]["action_id"] == "action-1"


async def test_letters_published_together_are_marked_together_each_only_if_still_held(
    store: FailureStore,
) -> None:
    """A replay marks the letters it published together in one statement: each gets its own
    history entry, and one whose claim another replay took meanwhile is not marked."""
    letters = await add_all(store, (letter() for _ in range(3)))
    ids = [item.id for item in letters]
    token, claimed = await store.claim(Filter(), limit=10, lease=LEASE)
    assert set(claimed) == set(ids)
    # The second letter's claim ran out, and another replay took it.
    await set_column(store, "claimed_at", {ids[1]: datetime.now(UTC) - 2 * LEASE})
    other, taken = await store.claim(Filter(), limit=10, lease=LEASE)
    assert taken == [ids[1]]

    assert await store.mark_replayed(ids, token, "action-1", "tester") == {ids[0], ids[2]}
    assert await status_of(store, ids) == {
        ids[0]: "replayed",
        ids[1]: "replaying",
        ids[2]: "replayed",
    }
    for letter_id in (ids[0], ids[2]):
        shown = await store.get(letter_id)
        assert shown is not None
        assert [(h["action"], h.get("action_id")) for h in shown["history"]][-1] == (
            "replayed",
            "action-1",
        )
    assert await store.mark_replayed([ids[1]], other, "action-2", "tester") == {ids[1]}


async def test_release_returns_unmoved_letters_to_dead(store: FailureStore) -> None:
    letters = await add_all(store, (letter() for _ in range(3)))
    token, claimed = await store.claim(Filter(), limit=10, lease=LEASE)
    assert len(claimed) == 3
    await store.mark_replayed([letters[0].id], token, "a", "tester")
    await store.release(token)
    assert await status_of(store, [item.id for item in letters]) == {
        letters[0].id: "replayed",
        letters[1].id: "dead",
        letters[2].id: "dead",
    }
    _, again = await store.claim(Filter(), limit=10, lease=LEASE)
    assert set(again) == {letters[1].id, letters[2].id}


class _AheadByTenMinutes(datetime):
    """A host whose clock runs ten minutes ahead."""

    @classmethod
    def now(cls, tz: tzinfo | None = None) -> datetime:  # type: ignore[override]
        return datetime.now(tz) + timedelta(minutes=10)


async def test_a_gateway_whose_clock_runs_ahead_releases_no_live_claim(
    postgres_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Gateways on several hosts share a PostgreSQL store. One whose clock ran more than a
    # lease ahead released the claims of a replay running on another: replayed twice.
    engine = open_store(store_url(postgres_database, tmp_path, "gateway"))
    store = FailureStore(engine)
    try:
        await store.start()
        [held] = await add_all(store, [letter()])
        _, claimed = await store.claim(Filter(), limit=10, lease=LEASE)
        assert claimed == [held.id]

        monkeypatch.setattr("services.ops.store.datetime", _AheadByTenMinutes)
        assert await store.release_expired(LEASE) == 0
        assert await store.preview(Filter(), limit=10, lease=LEASE) == []
        _, taken = await store.claim(Filter(), limit=10, lease=LEASE)
        assert taken == []
    finally:
        await engine.dispose()


# --- discard and purge -------------------------------------------------------------------------


async def test_discard_closes_dead_letters_and_records_history(store: FailureStore) -> None:
    doomed = await add_all(store, (letter(group="g-doomed") for _ in range(3)))
    kept = await add_all(store, [letter()])
    token, claimed = await store.claim(Filter(ids=(doomed[2].id,)), limit=1, lease=LEASE)
    assert len(claimed) == 1

    discarded = await store.discard(
        Filter(group="g-doomed"), limit=10, reason="bad input", actor="alice", action_id="act-9"
    )
    # A letter claimed by a replay is not discarded under it.
    assert {letter.id for letter in discarded} == {doomed[0].id, doomed[1].id}
    statuses = await status_of(store, [*(item.id for item in doomed), kept[0].id])
    assert statuses == {
        doomed[0].id: "discarded",
        doomed[1].id: "discarded",
        doomed[2].id: "replaying",
        kept[0].id: "dead",
    }
    shown = await store.get(doomed[0].id)
    assert shown is not None and shown["closed_at"] is not None
    assert [entry["action"] for entry in shown["history"]] == ["dead_lettered", "discarded"]
    entry = shown["history"][-1]
    assert (entry["actor"], entry["reason"], entry["action_id"]) == ("alice", "bad input", "act-9")
    assert datetime.fromisoformat(entry["at"]) > datetime.now(UTC) - timedelta(minutes=1)
    # Discarding again finds nothing dead in the group.
    again = await store.discard(
        Filter(group="g-doomed"), limit=10, reason="x", actor="alice", action_id="act-10"
    )
    assert again == []
    await store.release(token)


async def test_a_large_discard_takes_a_few_statements_not_one_per_letter(
    store: FailureStore,
) -> None:
    # An UPDATE per letter, all in one transaction: 10,000 letters (the API's limit) held
    # SQLite's write lock for 5.6 s, and a status read writing its accept records waited 5.4 s.
    many = await add_all(store, (letter(group="g-many") for _ in range(300)))
    statements: list[str] = []

    def executed(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    event.listen(store.engine.sync_engine, "before_cursor_execute", executed)
    try:
        discarded = await store.discard(
            Filter(group="g-many"), limit=1000, reason="noise", actor="alice", action_id="act-m"
        )
    finally:
        event.remove(store.engine.sync_engine, "before_cursor_execute", executed)
    assert [letter.id for letter in discarded] == [item.id for item in many]  # oldest first
    assert len(statements) < 10, len(statements)
    shown = await store.get(many[-1].id)
    assert shown is not None and shown["status"] == "discarded"
    assert [(e["action"], e.get("action_id")) for e in shown["history"]] == [
        ("dead_lettered", None),
        ("discarded", "act-m"),
    ]


async def test_discard_records_its_action_or_discards_nothing(store: FailureStore) -> None:
    # Discarded in one transaction and audited in the next, a store failing in between left
    # letters discarded with no action recorded (and the operator answered with a 503).
    letters = await add_all(store, (letter(group="g-audited") for _ in range(2)))
    await store.record_action(
        action="replay", actor="bob", selection=Filter(), dry_run=False, count=0, action_id="taken"
    )
    with pytest.raises(IntegrityError):  # the action cannot be recorded: its id is taken
        await store.discard(
            Filter(group="g-audited"), limit=10, reason="x", actor="alice", action_id="taken"
        )
    assert await status_of(store, [item.id for item in letters]) == dict.fromkeys(
        (item.id for item in letters), "dead"
    )
    discarded = await store.discard(
        Filter(group="g-audited"), limit=10, reason="bad input", actor="alice", action_id="act-11"
    )
    assert len(discarded) == 2
    [action] = [a for a in await store.actions() if a["id"] == "act-11"]
    assert (action["action"], action["actor"], action["count"], action["reason"]) == (
        "discard",
        "alice",
        2,
        "bad input",
    )


async def test_discard_takes_at_most_its_limit(store: FailureStore) -> None:
    await add_all(store, (letter() for _ in range(5)))
    discarded = await store.discard(
        Filter(), limit=2, reason="enough", actor="alice", action_id="act"
    )
    assert len(discarded) == 2
    assert await store.count(Filter()) == 3


async def test_purge_removes_only_closed_letters_older_than_retention(
    store: FailureStore,
) -> None:
    old_dead, old_replayed, old_discarded, new_discarded, old_replaying = await add_all(
        store, (letter() for _ in range(5))
    )
    long_ago = datetime.now(UTC) - timedelta(days=40)
    await set_column(
        store,
        "status",
        {
            old_replayed.id: "replayed",
            old_discarded.id: "discarded",
            new_discarded.id: "discarded",
            old_replaying.id: "replaying",
        },
    )
    await set_column(
        store,
        "closed_at",
        {
            old_replayed.id: long_ago,
            old_discarded.id: long_ago,
            new_discarded.id: datetime.now(UTC) - timedelta(days=1),
        },
    )
    await set_column(
        store,
        "dead_lettered_at",
        {old_dead.id: long_ago, old_replaying.id: long_ago},
    )
    assert await store.purge_closed(timedelta(days=30)) == 2
    remaining = await status_of(
        store,
        [item.id for item in (old_dead, old_replayed, old_discarded, new_discarded, old_replaying)],
    )
    assert remaining == {
        old_dead.id: "dead",
        new_discarded.id: "discarded",
        old_replaying.id: "replaying",
    }
    assert await store.purge_closed(timedelta(days=30)) == 0


# --- audit -------------------------------------------------------------------------------------


async def test_actions_are_listed_newest_first_with_their_selection(store: FailureStore) -> None:
    first = await store.record_action(
        action="replay",
        actor="alice",
        selection=Filter(group="g", since=T0),
        dry_run=True,
        count=3,
    )
    second = await store.record_action(
        action="discard",
        actor="bob",
        selection=Filter(ids=("a", "b")),
        dry_run=False,
        count=2,
        reason="noise",
    )
    listed = await store.actions()
    assert [a["id"] for a in listed] == [second, first]
    newest, oldest = listed
    assert (newest["action"], newest["actor"], newest["dry_run"], newest["count"]) == (
        "discard",
        "bob",
        False,
        2,
    )
    assert newest["reason"] == "noise" and newest["selection"]["ids"] == ["a", "b"]
    assert oldest["dry_run"] is True
    assert oldest["selection"] == {"group": "g", "since": T0.isoformat(), "status": "dead"}
    assert oldest["at"].tzinfo is not None
    assert [a["id"] for a in await store.actions(limit=1)] == [second]


async def test_an_action_records_a_long_id_list_cut_with_its_length(store: FailureStore) -> None:
    # A batched CLI replay sends up to 10,000 ids in each request: recorded whole, the audit
    # trail grew by that per batch, and listing it served tens of megabytes.
    ids = tuple(f"letter-{i}" for i in range(10_000))
    await store.record_action(
        action="replay",
        actor="alice",
        selection=Filter(ids=ids, exclude_ids=ids[:5]),
        dry_run=False,
        count=100,
    )
    [action] = await store.actions()
    selection = action["selection"]
    assert selection["ids"] == list(ids[:RECORDED_IDS]) and selection["ids_count"] == 10_000
    assert selection["exclude_ids"] == list(ids[:5]) and "exclude_ids_count" not in selection


async def test_broker_dead_letters_of_one_event_from_different_replays_are_kept_apart(
    store: FailureStore,
) -> None:
    # A message that crashes its consumer is dead-lettered by the broker, replayed, and crashes
    # it again: `x-death` (time in whole seconds) can be identical both times.
    death = {
        "count": 1,
        "reason": "delivery_limit",
        "queue": "ns.processor",
        "time": T0,
        "exchange": "",
        "routing-keys": ["ns.processor"],
    }
    letters = [
        read_dead_letter(
            "ns",
            body=b"{}",
            headers={"x-death": [death], "x-first-death-queue": "ns.processor", f.REPLAYS: n},
            message_id="event-1",
            message_type="dataset.submitted",
            correlation_id=None,
        )
        for n in (1, 2)
    ]
    assert [item.replays for item in letters] == [1, 2]
    assert [await store.add(item) for item in letters] == [True, True]
    assert await store.count(Filter(service="processor")) == 2


async def test_a_letter_stored_again_tells_when_it_was_first_stored(store: FailureStore) -> None:
    """The drain stores a letter again when it comes back (a redelivery, a retry after a
    failure past the store): its status shows it dead-lettered once, at the first time."""
    same = letter()
    first = await store.store(same)
    assert await store.store(same) == first


async def test_letters_stored_together_tell_each_when_it_was_first_stored(
    store: FailureStore,
) -> None:
    """The drain stores the letters delivered together in one transaction: one stored
    before keeps its first time, a letter twice in the batch (two copies of it in the queue)
    is stored once, and each is told its own time, in order."""
    before, new, twice = letter(), letter(), letter()
    first = await store.store(before)
    stored_at = await store.store_many([new, before, twice, twice])
    assert stored_at[1] == first
    assert stored_at[0] > first and stored_at[2] == stored_at[3] == stored_at[0]
    assert await store.count(Filter()) == 3
    assert await store.store(new) == stored_at[0]


@pytest.mark.parametrize("needle", ["échec", "ÉCHEC", "Échec"])
async def test_the_text_search_ignores_the_case_of_every_letter_not_only_ascii(
    store: FailureStore, needle: str
) -> None:
    failed = letter(exception_message="Échec de livraison: boîte pleine")
    await store.add(failed)
    found = await store.page(Filter(text=needle), limit=10)
    assert [item["id"] for item in found.items] == [failed.id]


@pytest.mark.parametrize(
    ("message", "needle"),
    [("İstanbul edge unreachable", "İstanbul"), ("ΟΔΟΣ not found", "ΟΔΟΣ")],
)
async def test_the_text_search_finds_text_copied_from_the_error_whatever_its_letters(
    store: FailureStore, message: str, needle: str
) -> None:
    # Lowered by Python on one side and by PostgreSQL on the other, a dotted capital I or a
    # final capital sigma never matched: a replay or discard by that text selected nothing.
    failed = letter(exception_message=message)
    await store.add(failed)
    found = await store.page(Filter(text=needle), limit=10)
    assert [item["id"] for item in found.items] == [failed.id]
    assert await store.count(Filter(text=needle)) == 1
