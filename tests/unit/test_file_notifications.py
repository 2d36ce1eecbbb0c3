"""The notifier's `file.processed` notifications: one per target, stable ids, a readable body."""

from __future__ import annotations

from contracts.envelope import derived_event_id
from contracts.files import ColumnStats, FileAnalysis, FileProcessed, FileProcessedData
from contracts.notify import NotifyTarget
from services.messaging.errors import PermanentError, RetryLater, StoreUnavailable
from services.notifier.handlers import _to_raise, file_body, file_notifications, target_event_id

WEBHOOK = NotifyTarget(channel="webhook", recipient="https://example.com/hook")
EMAIL = NotifyTarget(channel="email", recipient="ops@example.com")
LOG = NotifyTarget(channel="log", recipient="ops")


def processed(*targets: NotifyTarget, event_id: str = "fp-1") -> FileProcessed:
    return FileProcessed(
        id=event_id,
        correlationid="upload-7",
        data=FileProcessedData(
            file_id="f-1",
            name="prices.csv",
            declared_type="text/csv",
            size=35,
            sha256="0" * 64,
            analysis=FileAnalysis(
                detected_type="text/csv",
                format="csv",
                line_count=4,
                record_count=3,
                column_count=2,
                columns=[
                    ColumnStats(
                        name="price",
                        kind="number",
                        count=3,
                        nulls=0,
                        min=10.0,
                        max=30.0,
                        mean=20.0,
                        distinct=3,
                    ),
                    ColumnStats(
                        name="sku",
                        kind="string",
                        count=2,
                        nulls=1,
                        distinct=2,
                        distinct_capped=True,
                    ),
                ],
                notes=["declared text/plain"],
            ),
            notify=list(targets),
        ),
    )


def test_one_notification_per_target_with_its_own_stable_id() -> None:
    event = processed(WEBHOOK, EMAIL, LOG)
    notifications = file_notifications(event)
    assert [(n.channel, n.recipient) for n in notifications] == [
        ("webhook", WEBHOOK.recipient),
        ("email", EMAIL.recipient),
        ("log", "ops"),
    ]
    ids = [n.event_id for n in notifications]
    assert len(set(ids)) == 3 and event.id not in ids
    assert ids[0] == derived_event_id(event.id, f"notify:webhook:{WEBHOOK.recipient}")
    # The same event (a redelivery, a replay) gives the same ids; another event other ids.
    assert [n.event_id for n in file_notifications(processed(WEBHOOK, EMAIL, LOG))] == ids
    other = file_notifications(processed(WEBHOOK, event_id="fp-2"))
    assert other[0].event_id != ids[0]
    for n in notifications:
        assert n.subject == "File 'prices.csv' processed"
        # The webhook receives the file.processed event, without the other targets (a webhook
        # URL often carries a secret; an address is personal data).
        assert n.event == event.model_copy(
            update={"data": event.data.model_copy(update={"notify": []})}
        )
        assert n.correlation_id == "upload-7"


def test_a_target_named_twice_is_notified_once() -> None:
    notifications = file_notifications(processed(EMAIL, EMAIL))
    assert [n.event_id for n in notifications] == [target_event_id("fp-1", EMAIL)]


def test_no_targets_no_notifications() -> None:
    assert file_notifications(processed()) == []


def test_the_body_summarises_the_analysis() -> None:
    assert file_body(processed().data).splitlines() == [
        f"prices.csv: 35 bytes, declared text/csv, sha256 {'0' * 64}",
        "format csv (text/csv), 3 records, 2 columns, 4 lines",
        "price: number, 3 values, 0 missing, min 10, max 30, mean 20, 3 distinct",
        "sku: string, 2 values, 1 missing, at least 2 distinct",
        "note: declared text/plain",
    ]


def test_a_binary_file_has_no_counts_to_report() -> None:
    event = processed()
    binary = event.data.model_copy(
        update={"analysis": FileAnalysis(detected_type="application/pdf", format="binary")}
    )
    assert file_body(binary).splitlines()[1] == "format binary (application/pdf)"


def test_a_store_away_for_one_target_holds_the_event_whatever_the_others_ask() -> None:
    # A target's longer Retry-After won, and the event went through the delay tiers, spending
    # an attempt, while the store it could not record in was only away.
    away = StoreUnavailable("could not record a sent notification")
    later = RetryLater("webhook answered 503", min_delay=300)
    assert _to_raise([later, away, PermanentError("refused")]) is away
