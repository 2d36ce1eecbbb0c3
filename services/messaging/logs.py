"""Structured JSON logs carrying the event id and correlation id of the work at hand.

Configured once at each entry point. The ids live in context variables, so every log line
emitted while handling an event (including from libraries) carries them.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from pythonjsonlogger.json import JsonFormatter

event_id_var: ContextVar[str | None] = ContextVar("event_id", default=None)
correlation_id_var: ContextVar[str | None] = ContextVar("correlation_id", default=None)

ROOT_LOGGER = "courier"


def get_logger(name: str) -> logging.Logger:
    """A logger under Courier's root, e.g. `courier.consumer`."""
    return logging.getLogger(f"{ROOT_LOGGER}.{name}")


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        # An explicit `extra={"event_id": ...}` wins over the context.
        record.event_id = getattr(record, "event_id", None) or event_id_var.get()
        record.correlation_id = getattr(record, "correlation_id", None) or correlation_id_var.get()
        return True


@contextmanager
def event_context(event_id: str | None, correlation_id: str | None) -> Iterator[None]:
    """Attach the ids to every log line emitted inside the block."""
    event_token = event_id_var.set(event_id)
    correlation_token = correlation_id_var.set(correlation_id)
    try:
        yield
    finally:
        event_id_var.reset(event_token)
        correlation_id_var.reset(correlation_token)


def configure_logging(level: str = "INFO", service: str = "courier") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ContextFilter())
    handler.setFormatter(
        JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            static_fields={"service": service},
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aio-pika's reconnect chatter is useful at WARNING and noise below it.
    logging.getLogger("aio_pika").setLevel(max(logging.getLevelName(level), logging.WARNING))
    logging.getLogger("aiormq").setLevel(max(logging.getLevelName(level), logging.WARNING))
