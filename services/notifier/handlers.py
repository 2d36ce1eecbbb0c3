"""Notifier handlers: plain async functions, dependencies as parameters, no transport code."""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlsplit

from contracts.envelope import derived_event_id
from contracts.events import DatasetProcessed, NotificationRequested
from contracts.files import ColumnStats, FileAnalysis, FileProcessed, FileProcessedData
from contracts.notify import CHANNELS, NotifyTarget, split_target
from contracts.tracking import CallbackRequested
from services.messaging.errors import (
    PermanentError,
    RetryLater,
    StoreUnavailable,
    no_immediate_retry,
)
from services.messaging.logs import get_logger
from services.notifier.channels import Channels, Notification
from services.notifier.recipients import recipient_problem

DEFAULT_DATASET_RECIPIENT = "ops"
"""Who hears of a processed dataset that names no one: a label on the log channel."""
_DEFAULT_DATASET_TARGET = NotifyTarget(channel="log", recipient=DEFAULT_DATASET_RECIPIENT)

log = get_logger("notifier.handlers")


async def notification_requested(event: NotificationRequested, *, channels: Channels) -> None:
    await channels.deliver(
        Notification(
            event_id=event.id,
            correlation_id=event.correlation(),
            channel=event.data.channel,
            recipient=event.data.recipient,
            subject=event.data.subject,
            body=event.data.body,
            event=event,
        )
    )


async def callback_requested(event: CallbackRequested, *, channels: Channels) -> None:
    """Post an event's final status to its client's callback URL: the webhook body is this
    event, its `Idempotency-Key` this event's id (the same for every retry and redelivery)."""
    await channels.deliver(
        Notification(
            event_id=event.id,
            correlation_id=event.correlation(),
            channel="webhook",
            recipient=event.data.callback_url,
            subject=f"{event.data.event_type or 'event'} {event.data.outcome}",
            body="",
            event=event,
        )
    )


def _dataset_body(event: DatasetProcessed) -> str:
    lines = [f"{event.data.record_count} records, {len(event.data.fields)} fields"]
    for name, summary in sorted(event.data.fields.items()):
        detail = f"{name}: {summary.kind}, {summary.count} values, {summary.nulls} missing"
        if summary.mean is not None:
            detail += f", min {summary.min:g}, max {summary.max:g}, mean {summary.mean:g}"
        if summary.distinct is not None:
            detail += f", {summary.distinct} distinct"
        lines.append(detail)
    return "\n".join(lines)


def dataset_target(notify: str | None) -> NotifyTarget:
    """Who hears of a processed dataset: `<channel>:<recipient>` on that channel, as an upload's
    targets; a plain label, or none (`"ops"`), on the log channel.

    A value whose prefix names no channel, or a recipient that channel would refuse for good,
    stays a log label as a whole: the gateway refuses such values now, but took them before
    it checked them (`email:team-lead` was a label), and queued or dead-lettered events of
    that time must still deliver as they did."""
    if notify is None:
        return _DEFAULT_DATASET_TARGET
    match split_target(notify):
        case (channel, recipient) if (
            channel in CHANNELS and recipient and not recipient_problem(channel, recipient)
        ):
            return NotifyTarget.model_validate({"channel": channel, "recipient": recipient})
    return NotifyTarget(channel="log", recipient=notify)


async def dataset_processed(event: DatasetProcessed, *, channels: Channels) -> None:
    target = dataset_target(event.data.notify)
    await channels.deliver(
        Notification(
            event_id=event.id,
            correlation_id=event.correlation(),
            channel=target.channel,
            recipient=target.recipient,
            subject=f"Dataset {event.data.name!r} processed",
            body=_dataset_body(event),
            event=event,  # a webhook gets it without its `notify` (`webhook_body`)
        )
    )


# --- file.processed: one notification per target ------------------------------------------------


def target_event_id(event_id: str, target: NotifyTarget) -> str:
    """The notification id of one target of an event: stable across redeliveries and replays.

    It keys the deliveries record, the webhook's `Idempotency-Key` and the email's `Message-ID`,
    so each target is delivered once however often the event comes back.
    """
    return derived_event_id(event_id, f"notify:{target.channel}:{target.recipient}")


def _count(value: int | None, noun: str) -> list[str]:
    return [] if value is None else [f"{value} {noun}"]


def _column_line(column: ColumnStats) -> str:
    line = f"{column.name}: {column.kind}, {column.count} values, {column.nulls} missing"
    if column.mean is not None:
        line += f", min {column.min:g}, max {column.max:g}, mean {column.mean:g}"
    bound = "at least " if column.distinct_capped else ""
    return f"{line}, {bound}{column.distinct} distinct"


def _analysis_lines(analysis: FileAnalysis) -> list[str]:
    counts = [
        *_count(analysis.record_count, "records"),
        *_count(analysis.column_count, "columns"),
        *_count(analysis.line_count, "lines"),
    ]
    lines = [", ".join([f"format {analysis.format} ({analysis.detected_type})", *counts])]
    lines += [_column_line(column) for column in analysis.columns]
    if analysis.columns_truncated:
        lines.append("(more columns than described)")
    lines += [f"note: {note}" for note in analysis.notes]
    return lines


def file_body(data: FileProcessedData) -> str:
    """A plain-text summary of the analysis, for people (a webhook gets the whole event)."""
    header = f"{data.name}: {data.size} bytes, declared {data.declared_type}, sha256 {data.sha256}"
    return "\n".join([header, *_analysis_lines(data.analysis)])


def _without_targets(event: FileProcessed) -> FileProcessed:
    """The event as receivers see it: other targets' URLs (often secret) and addresses stay out."""
    return event.model_copy(update={"data": event.data.model_copy(update={"notify": []})})


def file_notifications(event: FileProcessed) -> list[Notification]:
    """One notification per distinct target, each with its own stable id."""
    subject = f"File {event.data.name!r} processed"
    body = file_body(event.data)
    announced = _without_targets(event)
    by_id = {
        target_event_id(event.id, target): target for target in event.data.notify
    }  # a target named twice is one notification
    return [
        Notification(
            event_id=notification_id,
            correlation_id=event.correlation(),
            channel=target.channel,
            recipient=target.recipient,
            subject=subject,
            body=body,
            event=announced,
        )
        for notification_id, target in by_id.items()
    ]


def _to_raise(failures: Sequence[Exception]) -> Exception:
    """The failure that decides what happens to the event.

    A transient one wins, so the event is retried (its delivered targets are skipped then, by
    their deliveries record), with the longest wait any target asked for; only when every
    failure is permanent is the event dead-lettered. The other failures are attached as notes.

    When a target also refused for good, the retry is a delayed one (`no_immediate_retry`): an
    immediate retry repeats the same attempt, which would ask the refusing target again (only
    a later attempt looks its refusal up).
    """
    transient = [exc for exc in failures if not isinstance(exc, PermanentError)]
    # The store being away holds the event (`StoreUnavailable`): no target's wait beats that.
    away = [exc for exc in failures if isinstance(exc, StoreUnavailable)]
    candidates = away or transient or list(failures)
    chosen = max(candidates, key=lambda exc: exc.min_delay if isinstance(exc, RetryLater) else 0.0)
    for other in failures:
        if other is not chosen:
            notes = "".join(f"; {note}" for note in getattr(other, "__notes__", ()))
            chosen.add_note(f"another target failed too: {type(other).__name__}: {other}{notes}")
    if transient and len(transient) < len(failures):
        no_immediate_retry(chosen)
    return chosen


def target_name(notification: Notification) -> str:
    """A target as failures name it (in logs, dead letters and status details): a webhook by
    its host alone, since its URL's path or query often holds a secret token."""
    if notification.channel == "webhook":
        return f"webhook to {urlsplit(notification.recipient).hostname or '?'}"
    return f"{notification.channel}:{notification.recipient}"


class RefusedEarlier(PermanentError):
    """A target refused this notification for good on an earlier attempt of the event."""


async def file_processed(event: FileProcessed, *, channels: Channels, attempt: int = 1) -> None:
    """Deliver the analysis to every target the upload named; no targets, nothing to do.

    Every target is tried even when an earlier one fails, so one broken receiver does not hold
    the others back; the event fails afterwards if any target did. On a retry (`attempt` > 1) a
    target that refused for good is not asked again, but still fails the event (a replay starts
    again at attempt 1, and asks it again).
    """
    failures: list[Exception] = []
    for notification in file_notifications(event):
        refusal = await channels.refused_before(notification) if attempt > 1 else None
        if refusal is not None:
            failures.append(RefusedEarlier(f"{target_name(notification)}: {refusal}"))
            continue
        try:
            await channels.deliver(notification)
        except Exception as exc:  # noqa: BLE001  # raised below, after the other targets
            # Named: with several targets, "webhook answered 503" does not say whose answer.
            exc.add_note(f"target: {target_name(notification)}")
            log.warning(
                "file notification failed",
                extra={
                    "channel": notification.channel,
                    "target": target_name(notification),
                    "error": f"{type(exc).__name__}: {exc}",
                },
            )
            failures.append(exc)
    if failures:
        raise _to_raise(failures)
