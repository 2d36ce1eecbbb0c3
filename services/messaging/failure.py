"""What a failed delivery carries: its attempt count, and on a dead letter the whole story.

Counters live in Courier's own headers (`courier-*`), never in `x-death`, which newer brokers
own. A fingerprint (exception type + the innermost frame in project code) groups failures that
share a cause.
"""

from __future__ import annotations

import hashlib
import traceback
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import ValidationError

FailureReason = Literal["permanent", "retries_exhausted", "delivery_limit", "invalid"]

ATTEMPT: Final = "courier-attempt"
FIRST_FAILURE: Final = "courier-first-failure"
LAST_FAILURE: Final = "courier-last-failure"
FAILED_AT: Final = "courier-failed-at"
"""A dead letter's failure time to the microsecond (ISO 8601): AMQP timestamps, as in
`LAST_FAILURE`, keep whole seconds, too coarse to order it after the attempt's `processing`."""
FIRST_FAILED_AT: Final = "courier-first-failed-at"
"""`FIRST_FAILURE` to the microsecond (ISO 8601); absent from messages that failed first under
an earlier version."""
LAST_ERROR: Final = "courier-last-error"
REASON: Final = "courier-reason"
SERVICE: Final = "courier-service"
QUEUE: Final = "courier-queue"
EVENT_ID: Final = "courier-event-id"
EVENT_TYPE: Final = "courier-event-type"
EXCEPTION_TYPE: Final = "courier-exception-type"
EXCEPTION_MESSAGE: Final = "courier-exception-message"
TRACEBACK: Final = "courier-traceback"
FINGERPRINT: Final = "courier-fingerprint"
DEAD_LETTER_ID: Final = "courier-dead-letter-id"
REPLAYS: Final = "courier-replays"

# Headers that describe one failure; a replayed message starts without them.
FAILURE_HEADERS: Final = frozenset(
    {
        ATTEMPT, FIRST_FAILURE, FIRST_FAILED_AT, LAST_FAILURE, FAILED_AT, LAST_ERROR, REASON,
        SERVICE, QUEUE, EVENT_ID, EVENT_TYPE, EXCEPTION_TYPE, EXCEPTION_MESSAGE, TRACEBACK,
        FINGERPRINT, DEAD_LETTER_ID,
    }
)  # fmt: skip

# Headers the broker sets on a redelivered or dead-lettered message; never carried forward.
BROKER_HEADERS: Final = frozenset(
    {
        "x-death",
        "x-delivery-count",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
    }
)

MAX_TRACEBACK_CHARS: Final = 4_000
MAX_MESSAGE_CHARS: Final = 1_000
_PROJECT_ROOT: Final = Path(__file__).resolve().parents[2]


MAX_ATTEMPT: Final = 2**31 - 2
"""The largest attempt count taken from a header: it and the next attempt's fit the stores'
32-bit columns (the inbox, the status projection). Anyone may publish to a work queue."""


def attempt_of(headers: Mapping[str, Any]) -> int:
    """The attempt this delivery is (1 for a first delivery, or a count that is not one)."""
    value = headers.get(ATTEMPT, 1)
    # Not a bool (an int to Python): the status report's attempt is a strict integer, and one
    # `true` would fail the whole report, up to 1000 transitions of other events.
    return value if type(value) is int and 1 <= value <= MAX_ATTEMPT else 1


def carried_headers(headers: Mapping[str, Any]) -> dict[str, Any]:
    """The headers a republished message keeps: Courier's and the sender's, not the broker's."""
    return {k: v for k, v in headers.items() if k not in BROKER_HEADERS}


def _project_frame(exc: BaseException) -> str:
    """`module:function` of the innermost frame in project code, or of the last frame."""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        path = Path(frame.filename).resolve()
        if path.is_relative_to(_PROJECT_ROOT) and "site-packages" not in path.parts:
            module = ".".join(path.relative_to(_PROJECT_ROOT).with_suffix("").parts)
            return f"{module}:{frame.name}"
    return f"{Path(frames[-1].filename).stem}:{frames[-1].name}" if frames else "<unknown>"


def fingerprint(exc: BaseException) -> str:
    key = f"{type(exc).__module__}.{type(exc).__qualname__}|{_project_frame(exc)}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _validation_text(exc: ValidationError) -> str:
    """A validation error as pydantic renders it, without what it quotes: each wrong value
    (`input_value=`, a whole `data` object with a webhook URL's token, say), which would reach
    the log, the letter, the public status detail and the callback, and a link to its pages."""
    errors = exc.errors(include_url=False, include_context=False, include_input=False)
    lines = [f"{len(errors)} validation error{'s' if len(errors) != 1 else ''} for {exc.title}"]
    for error in errors:
        where = ".".join(str(part) for part in error["loc"])
        lines.append(f"{where}\n  {error['msg']} [type={error['type']}]")
    return "\n".join(lines)


def _str(exc: BaseException) -> str:
    return _validation_text(exc) if isinstance(exc, ValidationError) else str(exc)


def _text(exc: BaseException) -> str:
    """`str(exc)` and its notes (PEP 678: what the raiser added, such as which of several
    targets failed), as an AMQP header can carry it: never raising (a broken `__str__`), lone
    surrogates escaped (UTF-8 cannot encode them: the header could not be framed)."""
    try:
        text = _str(exc)
    except Exception:  # noqa: BLE001
        text = f"<{type(exc).__qualname__}: str() failed>"
    notes = getattr(exc, "__notes__", None)
    if isinstance(notes, list):
        text = "; ".join([text, *map(str, notes)])
    return _encodable(text)


def _encodable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _exception_name(exc: BaseException) -> str:
    return f"{type(exc).__module__}.{type(exc).__qualname__}"


def _trimmed_traceback(exc: BaseException) -> str:
    if isinstance(exc, ValidationError):  # its last line without the values (`_text`)
        frames = "".join(traceback.format_tb(exc.__traceback__))
        told = f"Traceback (most recent call last):\n{frames}{_exception_name(exc)}: {_str(exc)}\n"
    else:
        told = "".join(traceback.format_exception(exc))
    text = _encodable(told)
    # Keep the end: the raise site and the exception line are what an operator needs.
    return text if len(text) <= MAX_TRACEBACK_CHARS else "…" + text[-MAX_TRACEBACK_CHARS:]


@dataclass(frozen=True)
class Failure:
    """One failed attempt, ready to be written into headers."""

    exc: BaseException
    attempt: int
    at: datetime

    @classmethod
    def of(cls, exc: BaseException, attempt: int) -> Failure:
        return cls(exc, attempt, datetime.now(UTC))

    def summary(self) -> str:
        return f"{_exception_name(self.exc)}: {_text(self.exc)}"[:MAX_MESSAGE_CHARS]

    def _first_failure(self, headers: Mapping[str, Any]) -> dict[str, Any]:
        """When the message first failed: kept from an earlier attempt, else this one."""
        if FIRST_FAILURE not in headers:
            return {FIRST_FAILURE: self.at, FIRST_FAILED_AT: self.at.isoformat()}
        # An earlier version's first failure has whole seconds only: not made up here.
        first = {FIRST_FAILURE: headers[FIRST_FAILURE]}
        if FIRST_FAILED_AT in headers:
            first[FIRST_FAILED_AT] = headers[FIRST_FAILED_AT]
        return first

    def retry_headers(self, headers: Mapping[str, Any]) -> dict[str, Any]:
        """Headers for the next attempt of a message whose attempt failed transiently."""
        return {
            **carried_headers(headers),
            ATTEMPT: self.attempt + 1,
            **self._first_failure(headers),
            LAST_FAILURE: self.at,
            LAST_ERROR: self.summary(),
        }

    def dead_letter_headers(
        self,
        headers: Mapping[str, Any],
        *,
        reason: FailureReason,
        service: str,
        queue: str,
        event_id: str | None,
        event_type: str | None,
    ) -> dict[str, Any]:
        return {
            **carried_headers(headers),
            DEAD_LETTER_ID: str(uuid.uuid4()),
            REASON: reason,
            SERVICE: service,
            QUEUE: queue,
            EVENT_ID: event_id,
            EVENT_TYPE: event_type,
            ATTEMPT: self.attempt,
            **self._first_failure(headers),
            LAST_FAILURE: self.at,
            FAILED_AT: self.at.isoformat(),
            EXCEPTION_TYPE: _exception_name(self.exc),
            EXCEPTION_MESSAGE: _text(self.exc)[:MAX_MESSAGE_CHARS],
            TRACEBACK: _trimmed_traceback(self.exc),
            FINGERPRINT: fingerprint(self.exc),
        }
