"""Idempotent ingest: the same `Idempotency-Key` with the same body publishes once.

A key is claimed with the request's fingerprint and the event ids chosen for it. The same key
again with the same body returns the first response and publishes nothing; with a different body
it is a conflict. Concurrent requests with one key: one publishes, the others wait for its
response. If the broker did not take the events, or the gateway died while publishing, the next
request with the key publishes again under the same event ids, so a publish that did land after
all is dropped by the consumers' inboxes instead of doubling the work.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    and_,
    delete,
    not_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.messaging.store import as_utc, migrate

metadata = MetaData()
keys = Table(
    "idempotency_keys",
    metadata,
    Column("key", String(256), primary_key=True),
    Column("fingerprint", String(64), nullable=False),
    Column("event_ids", JSON, nullable=False),
    Column("state", String(16), nullable=False),  # in_progress | done | retryable
    Column("status_code", Integer, nullable=True),
    Column("response", JSON, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False, index=True),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

MAX_KEY_LENGTH = 256
WAIT_POLL_SECONDS = 0.05


def fingerprint(*parts: bytes | str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
        digest.update(b"\0")
    return digest.hexdigest()


@dataclass(frozen=True)
class Claim:
    kind: Literal["publish", "done", "conflict", "busy"]
    event_ids: list[str]
    status_code: int | None = None
    response: Any = None
    held_since: datetime | None = None
    """For `publish`: when this request took the key. Completing or releasing it is
    conditional on it: a request whose key was taken over after its lease (it looked dead)
    must not undo what the new holder did."""


class IdempotencyKeys:
    def __init__(self, engine: AsyncEngine, ttl: timedelta, lease: timedelta) -> None:
        self._engine = engine
        self._ttl = ttl
        self._lease = lease

    async def start(self) -> None:
        async def create(conn: AsyncConnection) -> None:
            await conn.run_sync(metadata.create_all)

        await migrate(self._engine, "gateway.idempotency", [create])

    async def claim(self, key: str, request: str, event_ids: list[str]) -> Claim:
        """Take the key for this request, or say why not (done, conflict, busy elsewhere)."""
        now = datetime.now(UTC)
        async with self._engine.begin() as conn:
            try:
                async with conn.begin_nested():
                    await conn.execute(
                        keys.insert().values(
                            key=key,
                            fingerprint=request,
                            event_ids=event_ids,
                            state="in_progress",
                            created_at=now,
                            updated_at=now,
                        )
                    )
                return Claim("publish", event_ids, held_since=now)
            except IntegrityError:
                pass
            row = (await conn.execute(select(keys).where(keys.c.key == key))).one()
            if as_utc(row.created_at) < now - self._ttl:  # expired: the key is free again
                if self._held(row, now):
                    # Unless a request holds it right now (it took the key back for a retry
                    # just before the key expired): taken over, its events would go out twice,
                    # under two sets of ids.
                    return Claim("busy", row.event_ids)
                # Taken only if no one took it since this read: two requests reusing an
                # expired key at once must not both publish.
                taken = await conn.execute(
                    update(keys)
                    .where(
                        keys.c.key == key,
                        keys.c.created_at == row.created_at,
                        keys.c.updated_at == row.updated_at,
                    )
                    .values(
                        fingerprint=request,
                        event_ids=event_ids,
                        state="in_progress",
                        status_code=None,
                        response=None,
                        created_at=now,
                        updated_at=now,
                    )
                )
                if taken.rowcount == 1:
                    return Claim("publish", event_ids, held_since=now)
                # Another request took it first: answer as if it had been there all along.
                row = (await conn.execute(select(keys).where(keys.c.key == key))).one()
            if row.fingerprint != request:
                return Claim("conflict", row.event_ids)
            if row.state == "done":
                return Claim("done", row.event_ids, row.status_code, row.response)
            stale = as_utc(row.updated_at) < now - self._lease
            if row.state == "retryable" or stale:
                # The TTL starts again: the response this request stores is remembered for a
                # whole TTL, or a retry of it after a quick expiry would publish again under
                # new ids, which no inbox drops.
                taken = await conn.execute(
                    update(keys)
                    .where(keys.c.key == key, keys.c.updated_at == row.updated_at)
                    .values(state="in_progress", created_at=now, updated_at=now)
                )
                if taken.rowcount == 1:
                    return Claim("publish", row.event_ids, held_since=now)
            return Claim("busy", row.event_ids)

    async def wait(self, key: str, request: str) -> Claim | None:
        """Wait for another request with this key to finish (bound it with a timeout); its
        response, or None if that request failed or was not this one (an expired key reused
        with another body: its response is not this request's, whose events it never
        published)."""
        while True:
            async with self._engine.connect() as conn:
                row = (await conn.execute(select(keys).where(keys.c.key == key))).first()
            if row is None or row.state == "retryable":
                return None
            if row.state == "done":
                if row.fingerprint != request:
                    return None
                return Claim("done", row.event_ids, row.status_code, row.response)
            await asyncio.sleep(WAIT_POLL_SECONDS)

    async def complete(self, key: str, claim: Claim, status_code: int, response: Any) -> bool:
        """Keep the response for repeats; False if the key was taken over meanwhile."""
        return await self._settle(
            key, claim, state="done", status_code=status_code, response=response
        )

    async def release(self, key: str, claim: Claim) -> bool:
        """The broker did not take the events: the next request publishes them again. False if
        the key was taken over meanwhile (the new holder decides)."""
        return await self._settle(key, claim, state="retryable")

    async def _settle(self, key: str, claim: Claim, **values: Any) -> bool:
        if claim.held_since is None:
            raise ValueError("only a claim to publish is settled")
        async with self._engine.begin() as conn:
            settled = await conn.execute(
                update(keys)
                .where(keys.c.key == key, keys.c.updated_at == claim.held_since)
                .values(**values, updated_at=datetime.now(UTC))
            )
        return settled.rowcount == 1

    def _held(self, row: Any, now: datetime) -> bool:
        """Whether a request holds the key: in progress, and its lease not run out."""
        return bool(row.state == "in_progress" and as_utc(row.updated_at) >= now - self._lease)

    async def purge(self) -> int:
        """Forget the keys older than the TTL, but not one a request holds right now."""
        now = datetime.now(UTC)
        held = and_(keys.c.state == "in_progress", keys.c.updated_at >= now - self._lease)
        async with self._engine.begin() as conn:
            result = await conn.execute(
                delete(keys).where(keys.c.created_at < now - self._ttl, not_(held))
            )
        return int(result.rowcount or 0)
