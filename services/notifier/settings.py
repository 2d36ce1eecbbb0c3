from __future__ import annotations

from pathlib import Path

from pydantic import Field

from services.messaging.settings import ConsumerSettings


class NotifierSettings(ConsumerSettings):
    notify_log: Path = Field(
        default=Path("data/notifications.jsonl"),
        description="File the `log` channel appends one JSON line per notification to.",
    )
