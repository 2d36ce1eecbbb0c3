"""Structured JSON logs carrying the event id and correlation id of the work at hand.

Configured once at each entry point. The ids live in context variables, so every log line
emitted while handling an event (including from libraries) carries them.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from contextvars import ContextVar
from types import TracebackType

from aio_pika.exceptions import ChannelInvalidStateError
from aio_pika.robust_channel import RobustChannel
from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

event_id_var: ContextVar[str | None] = ContextVar("event_id", default=None)
correlation_id_var: ContextVar[str | None] = ContextVar("correlation_id", default=None)

ROOT_LOGGER = "courier"


def get_logger(name: str) -> logging.Logger:
    """A logger under Courier's root, e.g. `courier.consumer`."""
    return logging.getLogger(f"{ROOT_LOGGER}.{name}")


def error_field(exc: BaseException) -> dict[str, str]:
    """A failure as a log field of one line, for an expected outage logged without its
    traceback (a store's error quotes its whole statement over several lines)."""
    return {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}


class Throttle:
    """At most one line per `interval` seconds about a failure that every request meets while
    it lasts (an outage): a line per request would bury the rest at hundreds a second, each
    request being answered already. Called before logging: None to stay quiet, else how many
    lines were left out since the last one (its `suppressed` field)."""

    __slots__ = ("_clock", "_interval", "_next", "_suppressed")

    def __init__(self, interval: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = interval
        self._clock = clock
        self._next = float("-inf")
        self._suppressed = 0

    def __call__(self) -> int | None:
        now = self._clock()
        if now < self._next:
            self._suppressed += 1
            return None
        suppressed, self._suppressed = self._suppressed, 0
        self._next = now + self._interval
        return suppressed

    def reset(self) -> None:
        """The failure is over: its next occurrence is said at once."""
        self._next = float("-inf")
        self._suppressed = 0


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        # An explicit `extra={"event_id": ...}` wins over the context.
        record.event_id = getattr(record, "event_id", None) or event_id_var.get()
        record.correlation_id = getattr(record, "correlation_id", None) or correlation_id_var.get()
        return True


class event_context:  # used like the function it replaced: `with event_context(...)`
    """Attach the ids to every log line emitted inside the block. A class, not a
    @contextmanager generator: it is entered for every message a consumer handles."""

    __slots__ = ("_correlation_id", "_event_id", "_tokens")

    def __init__(self, event_id: str | None, correlation_id: str | None) -> None:
        self._event_id = event_id
        self._correlation_id = correlation_id

    def __enter__(self) -> None:
        self._tokens = (
            event_id_var.set(self._event_id),
            correlation_id_var.set(self._correlation_id),
        )

    def __exit__(self, *exc_info: object) -> None:
        event_token, correlation_token = self._tokens
        event_id_var.reset(event_token)
        correlation_id_var.reset(correlation_token)


class ReconnectNoise(logging.Filter):
    """Leaves out the AMQP client's own lines about a connection lost, which the service says
    once in its own (`broker connection lost`, `... restored`, see `connection`): aiormq's
    traceback per connection whose socket failed, and aio-pika's `ERROR` per channel whose
    restore met the connection closed (the reconnect restores each channel). An alarm on
    `ERROR` lines went off at every reconnect. Their lines for any other cause pass: aiormq's
    about a frame it could not read, aio-pika's about any other failed callback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "aiormq.connection":
            lost = record.exc_info is not None and isinstance(record.exc_info[1], OSError)
            return not (lost and record.msg == "Cancelling cause reader exited abnormally")
        args = record.args
        if record.name == "aio_pika.tools" and isinstance(args, tuple) and len(args) == 3:
            callback, _, exc = args  # "Callback %r error: %s: %s"
            restoring = getattr(getattr(callback, "callback", None), "__func__", None)
            closed = isinstance(exc, ChannelInvalidStateError) or (
                type(exc) is RuntimeError and str(exc).endswith(" closed")
            )
            return not (restoring is RobustChannel._on_close and closed)
        return True


_RECONNECT_NOISE = ReconnectNoise()


def configure_logging(level: str = "INFO", service: str = "courier") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ContextFilter())
    handler.setFormatter(
        JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            static_fields={"service": service},
            # uvicorn's copy of its message with terminal colour codes: noise in a JSON line.
            reserved_attrs=[*RESERVED_ATTRS, "color_message"],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # What Python prints itself comes here too, as JSON lines: a library's warning, and an
    # exception nobody caught, in the main thread (the process then ends with code 1, as it
    # would) or in another.
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_in_thread
    # aio-pika's reconnect chatter is useful at WARNING and noise below it. httpx logs every
    # request at INFO with its whole URL: a webhook's path or query often holds a token, and a
    # webhook is named by its host alone (the notifier logs its own lines about each delivery).
    # aiosqlite logs every operation at DEBUG with its statement and values: thousands of lines
    # a minute, holding what the stores keep (an upload's targets and callback URL, tokens too).
    for chatty in ("aio_pika", "aiormq", "httpx", "httpcore", "aiosqlite"):
        logging.getLogger(chatty).setLevel(max(logging.getLevelName(level), logging.WARNING))
    for reconnecting in ("aiormq.connection", "aio_pika.tools"):
        logging.getLogger(reconnecting).addFilter(_RECONNECT_NOISE)  # once: the same filter


def _log_uncaught(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    logging.getLogger(ROOT_LOGGER).critical(
        "ended by an exception nobody caught", exc_info=(kind, exc, tb)
    )


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:  # how a thread ends on purpose: Python says nothing either
        return
    exc = args.exc_value if args.exc_value is not None else args.exc_type()
    logging.getLogger(ROOT_LOGGER).critical(
        "a thread ended by an exception nobody caught",
        exc_info=(args.exc_type, exc, args.exc_traceback),
        extra={"thread_name": args.thread.name if args.thread is not None else None},
    )
