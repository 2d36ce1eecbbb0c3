"""Notifier handlers: plain async functions, dependencies as parameters, no transport code."""

from __future__ import annotations

from contracts.events import DatasetProcessed, NotificationRequested
from contracts.tracking import CallbackRequested
from services.notifier.channels import Channels, Notification

DEFAULT_DATASET_RECIPIENT = "ops"


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


async def dataset_processed(event: DatasetProcessed, *, channels: Channels) -> None:
    await channels.deliver(
        Notification(
            event_id=event.id,
            correlation_id=event.correlation(),
            channel="log",
            recipient=event.data.notify or DEFAULT_DATASET_RECIPIENT,
            subject=f"Dataset {event.data.name!r} processed",
            body=_dataset_body(event),
            event=event,
        )
    )
