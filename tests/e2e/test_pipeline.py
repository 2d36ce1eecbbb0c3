"""End to end over HTTP with real processes: gateway → broker → processor → notifier."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.e2e.conftest import System
from tests.support.notify_log import notification_lines
from tests.support.polling import eventually_sync
from tests.support.processes import base_url

pytestmark = [pytest.mark.e2e, pytest.mark.broker]


def notifications(system: System) -> list[dict[str, Any]]:
    return notification_lines(system.notify_log)


def test_a_requested_notification_is_delivered_to_the_log_channel(system: System) -> None:
    event = {
        "type": "notification.requested",
        "data": {"recipient": "ops@example.org", "subject": "Deploy done", "body": "v1.2"},
    }
    response = httpx.post(f"{base_url(system.gateway)}/v1/events", json=event, timeout=10)
    assert response.status_code == 202
    event_id = response.json()["id"]

    def delivered() -> dict[str, object]:
        lines = [n for n in notifications(system) if n["event_id"] == event_id]
        assert len(lines) == 1, lines
        return lines[0]

    line = eventually_sync(delivered, timeout=15)
    assert (line["recipient"], line["subject"], line["body"]) == (
        "ops@example.org",
        "Deploy done",
        "v1.2",
    )


def test_a_submitted_dataset_is_summarised_and_announced(system: System) -> None:
    records = [{"price": 10, "sku": "a"}, {"price": 30, "sku": "b"}, {"price": None, "sku": "a"}]
    event = {
        "type": "dataset.submitted",
        "data": {"name": "prices", "records": records, "notify": "me"},
    }
    response = httpx.post(
        f"{base_url(system.gateway)}/v1/events",
        json=event,
        headers={"x-correlation-id": "order-42"},
        timeout=10,
    )
    assert response.status_code == 202

    def announced() -> dict[str, object]:
        lines = [n for n in notifications(system) if n["recipient"] == "me"]
        assert len(lines) == 1, lines
        return lines[0]

    line = eventually_sync(announced, timeout=20)
    assert line["correlation_id"] == "order-42"
    assert line["subject"] == "Dataset 'prices' processed"
    body = str(line["body"])
    assert "3 records, 2 fields" in body
    assert "price: number, 2 values, 1 missing, min 10, max 30, mean 20" in body
    assert "sku: string, 3 values, 0 missing, 2 distinct" in body


def test_services_stop_cleanly_on_sigterm(system: System) -> None:
    assert [service.terminate() for service in system.all] == [0, 0, 0]
