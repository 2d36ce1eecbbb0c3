"""A broker for a status reporter in unit tests: what it takes, refuses or cannot frame."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson

from services.messaging.errors import BrokerUnavailable, Unpublishable
from services.messaging.publisher import Publisher


class StatusBroker(Publisher):
    """Takes each report (counts it, keeps its body), unless it is `away` (refused), told to
    refuse the next one after running `meanwhile` (while the publish was on its way), or to
    find the next `unframeable` ones impossible to frame."""

    def __init__(
        self,
        *,
        away: bool = False,
        meanwhile: Callable[[], None] | None = None,
        unframeable: int = 0,
    ) -> None:
        super().__init__("amqp://unused")
        self.away = away
        self._meanwhile = meanwhile
        self.unframeable = unframeable
        self.reports = 0
        self.taken: list[bytes] = []

    async def publish_event(self, *args: Any, body: bytes | None = None, **kwargs: Any) -> None:
        await asyncio.sleep(0)
        if self._meanwhile is not None:
            meanwhile, self._meanwhile = self._meanwhile, None
            meanwhile()
            raise BrokerUnavailable("the broker is away")
        if self.away:
            raise BrokerUnavailable("the broker is away")
        if self.unframeable:
            self.unframeable -= 1
            raise Unpublishable("the message cannot be framed")
        self.reports += 1
        if body is not None:
            self.taken.append(body)

    def reported(self) -> list[str]:
        """The event ids of the transitions taken, in order."""
        return [
            t["event_id"] for body in self.taken for t in orjson.loads(body)["data"]["transitions"]
        ]
