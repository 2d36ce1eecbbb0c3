"""Two gateway replicas behind one address: two in-process gateway apps in one namespace, on
one PostgreSQL database, as a load balancer alternating between them would see them.

A client is answered by one replica and comes back through the other: what the first one
accepted is known to the second (its status, its cancellation, its dataset), although each
replica writes its accept records a moment after its `202`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.gateway.tracking import UNKNOWN_LOOK_SECONDS
from tests.conftest import Namespace
from tests.integration.conftest import gateway_client, gateway_settings

pytestmark = [pytest.mark.broker]

DATASET: dict[str, Any] = {"type": "dataset.submitted", "data": {"records": [{"price": 10}]}}


@pytest.fixture
async def replicas(
    namespace: Namespace, tmp_path: Path, postgres_database: str
) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    settings = [
        gateway_settings(namespace, tmp_path / name, database_url=postgres_database)
        for name in ("first", "second")
    ]
    async for first in gateway_client(settings[0]):
        async for second in gateway_client(settings[1]):
            yield first, second


async def test_an_event_one_replica_accepted_is_known_to_the_other_at_once(
    replicas: tuple[httpx.AsyncClient, httpx.AsyncClient],
) -> None:
    first, second = replicas
    for _ in range(3):
        accepted = await first.post("/v1/events", json=DATASET)
        assert accepted.status_code == 202
        event_id = accepted.json()["id"]

        status = await second.get(accepted.headers["location"])
        assert status.status_code == 200, status.text
        assert status.json()["services"]["processor"]["state"] == "pending"
        dataset = await second.get(f"/v1/datasets/{event_id}")
        assert dataset.status_code == 202, dataset.text


async def test_an_event_one_replica_accepted_can_be_cancelled_through_the_other_at_once(
    replicas: tuple[httpx.AsyncClient, httpx.AsyncClient],
) -> None:
    first, second = replicas
    accepted = await first.post("/v1/events", json=DATASET)
    assert accepted.status_code == 202
    event_id = accepted.json()["id"]

    cancelled = await second.delete(f"/v1/events/{event_id}")
    assert cancelled.status_code == 202, cancelled.text
    status = (await first.get(f"/v1/events/{event_id}")).json()
    assert status["cancel_requested_at"] is not None


async def test_an_unknown_event_is_still_404_on_every_replica(
    replicas: tuple[httpx.AsyncClient, httpx.AsyncClient],
) -> None:
    for client in replicas:
        assert (await client.get("/v1/events/never-accepted")).status_code == 404
        assert (await client.delete("/v1/events/never-accepted")).status_code == 404
        assert (await client.get("/v1/datasets/never-accepted")).status_code == 404


async def test_a_single_gateway_on_sqlite_says_404_at_once(
    namespace: Namespace, tmp_path: Path
) -> None:
    # Its own accepts are written before it looks: no other process can have the event.
    async for client in gateway_client(gateway_settings(namespace, tmp_path)):
        began = time.monotonic()
        assert (await client.get("/v1/events/never-accepted")).status_code == 404
        assert time.monotonic() - began < UNKNOWN_LOOK_SECONDS / 2
