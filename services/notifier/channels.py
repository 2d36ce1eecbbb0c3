"""Delivery channels. Each takes a `Notification` and delivers it, or raises."""

from __future__ import annotations

import asyncio
import os
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import orjson

from contracts.events import Channel
from services.messaging.errors import PermanentError


@dataclass(frozen=True)
class Notification:
    event_id: str
    """Also the idempotency key a receiver can dedup on."""
    correlation_id: str
    channel: Channel
    recipient: str
    subject: str
    body: str


class DeliveryChannel(Protocol):
    async def deliver(self, notification: Notification) -> None: ...


class LogChannel:
    """Appends one JSON line per notification to a file, durably (fsync) before returning."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = asyncio.Lock()  # one writer at a time keeps lines whole
        path.parent.mkdir(parents=True, exist_ok=True)

    def _append(self, line: bytes) -> None:
        fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    async def deliver(self, notification: Notification) -> None:
        record = {**asdict(notification), "delivered_at": datetime.now(UTC).isoformat()}
        line = orjson.dumps(record) + b"\n"
        async with self._lock:
            await asyncio.to_thread(self._append, line)


class Unconfigured:
    """A channel this deployment has not set up: delivering on it is a permanent failure."""

    def __init__(self, channel: Channel) -> None:
        self._channel = channel

    async def deliver(self, notification: Notification) -> None:
        raise PermanentError(f"the {self._channel!r} channel is not configured")


class Channels:
    def __init__(self, by_name: dict[Channel, DeliveryChannel]) -> None:
        self._by_name = by_name

    async def deliver(self, notification: Notification) -> None:
        await self._by_name[notification.channel].deliver(notification)
