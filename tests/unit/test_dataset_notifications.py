"""Who the notifier tells of a processed dataset: its `notify`, read as the gateway checks it."""

from __future__ import annotations

import pytest

from contracts.notify import NotifyTarget
from services.notifier.handlers import dataset_target


@pytest.mark.parametrize(
    ("notify", "channel", "recipient"),
    [
        ("webhook:https://hooks.example.org/ds", "webhook", "https://hooks.example.org/ds"),
        (" email: a@b.example ", "email", "a@b.example"),  # trimmed, as an upload's targets
        ("log:team:alpha", "log", "team:alpha"),
    ],
)
def test_a_channel_prefixed_notify_names_that_channel_and_recipient(
    notify: str, channel: str, recipient: str
) -> None:
    expected = NotifyTarget.model_validate({"channel": channel, "recipient": recipient})
    assert dataset_target(notify) == expected


@pytest.mark.parametrize("notify", ["me", "bench@example.org"])
def test_a_plain_notify_is_a_label_on_the_log_channel(notify: str) -> None:
    assert dataset_target(notify) == NotifyTarget(channel="log", recipient=notify)


def test_no_notify_tells_ops_on_the_log_channel() -> None:
    assert dataset_target(None) == NotifyTarget(channel="log", recipient="ops")


@pytest.mark.parametrize(
    "notify",
    [
        "sms:+4412345",
        "webhook:",
        "https://hooks.example.org/x",
        "email:team-lead",
        "webhook:alerts",
    ],
)
def test_a_notify_taken_before_the_gateway_checked_it_stays_a_log_label(notify: str) -> None:
    """Queued or dead-lettered events of that time still deliver, as they did then."""
    assert dataset_target(notify) == NotifyTarget(channel="log", recipient=notify)
