"""Failure headers: attempts, the dead letter's story, and fingerprints."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from pamqp import encode
from pydantic import ValidationError

from contracts.events import EVENT_ADAPTER
from services.messaging import failure as f


def raise_at_a(exc: Exception) -> None:
    raise exc


def raise_at_b(exc: Exception) -> None:
    raise exc


def caught(raiser: object, exc: Exception) -> Exception:
    assert callable(raiser)
    try:
        raiser(exc)
    except Exception as err:  # noqa: BLE001
        return err
    raise AssertionError


def test_a_first_delivery_is_attempt_one() -> None:
    assert f.attempt_of({}) == 1
    assert f.attempt_of({f.ATTEMPT: 3}) == 3
    assert f.attempt_of({f.ATTEMPT: "junk"}) == 1


def test_an_attempt_header_no_store_column_holds_is_no_attempt() -> None:
    assert f.attempt_of({f.ATTEMPT: f.MAX_ATTEMPT}) == f.MAX_ATTEMPT
    assert f.attempt_of({f.ATTEMPT: 2**40}) == 1
    assert f.MAX_ATTEMPT + 1 < 2**31  # the next attempt's count fits too


def test_a_boolean_attempt_header_is_no_attempt() -> None:
    # `True` is an int to Python: reported as `"attempt": true`, it failed the gateway's
    # validation of the whole status report, with every other event's transitions in it.
    attempt = f.attempt_of({f.ATTEMPT: True})
    assert type(attempt) is int and attempt == 1  # `True == 1` too: the type tells them apart


def test_retry_headers_count_up_and_keep_the_first_failure_time() -> None:
    first = f.Failure.of(caught(raise_at_a, ValueError("x")), attempt=1)
    headers = first.retry_headers({"x-death": [], "x-delivery-count": 2, "custom": "kept"})
    assert headers[f.ATTEMPT] == 2 and headers["custom"] == "kept"
    assert "x-death" not in headers and "x-delivery-count" not in headers
    second = f.Failure.of(caught(raise_at_a, ValueError("y")), attempt=2)
    again = second.retry_headers(headers)
    assert again[f.FIRST_FAILURE] == first.at
    assert again[f.FIRST_FAILED_AT] == first.at.isoformat()  # to the microsecond


def test_a_first_failure_known_to_the_second_only_is_not_made_precise() -> None:
    # A message that failed first under an earlier version: its time is not this failure's.
    earlier = datetime(2030, 1, 1, 0, 0, 7, tzinfo=UTC)
    failure = f.Failure.of(caught(raise_at_a, ValueError("y")), attempt=2)
    headers = failure.retry_headers({f.FIRST_FAILURE: earlier})
    assert headers[f.FIRST_FAILURE] == earlier and f.FIRST_FAILED_AT not in headers


def test_a_dead_letter_carries_the_whole_story() -> None:
    failure = f.Failure.of(caught(raise_at_a, ValueError("boom")), attempt=4)
    headers = failure.dead_letter_headers(
        {}, reason="retries_exhausted", service="svc", queue="ns.svc", event_id="e", event_type="t"
    )
    assert headers[f.REASON] == "retries_exhausted"
    assert (headers[f.SERVICE], headers[f.QUEUE], headers[f.EVENT_ID]) == ("svc", "ns.svc", "e")
    assert headers[f.ATTEMPT] == 4
    assert headers[f.EXCEPTION_TYPE] == "builtins.ValueError"
    assert headers[f.EXCEPTION_MESSAGE] == "boom"
    assert "raise_at_a" in headers[f.TRACEBACK]
    assert headers[f.FIRST_FAILURE] == headers[f.LAST_FAILURE] == failure.at


def test_fingerprints_group_by_exception_type_and_raise_site() -> None:
    a1 = f.fingerprint(caught(raise_at_a, ValueError("one")))
    a2 = f.fingerprint(caught(raise_at_a, ValueError("two")))
    b = f.fingerprint(caught(raise_at_b, ValueError("one")))
    other_type = f.fingerprint(caught(raise_at_a, KeyError("one")))
    assert a1 == a2
    assert len({a1, b, other_type}) == 3


def test_tracebacks_are_trimmed() -> None:
    failure = f.Failure.of(caught(raise_at_a, ValueError("z" * 10_000)), attempt=1)
    headers = failure.dead_letter_headers(
        {}, reason="permanent", service="s", queue="q", event_id=None, event_type=None
    )
    assert len(headers[f.TRACEBACK]) <= f.MAX_TRACEBACK_CHARS + 1
    assert len(headers[f.EXCEPTION_MESSAGE]) <= f.MAX_MESSAGE_CHARS


def _frameable(headers: dict[str, Any]) -> bool:
    """Whether pamqp (the AMQP client's codec) can write the headers into a frame."""
    encode.field_table(headers)  # raises on what AMQP cannot carry
    return True


def test_an_error_text_no_header_can_carry_is_escaped() -> None:
    name = b"report-\xff.csv".decode("utf-8", "surrogateescape")  # as os.listdir gives it
    failure = f.Failure.of(caught(raise_at_a, ValueError(f"cannot read {name}")), attempt=1)
    dead = failure.dead_letter_headers(
        {}, reason="permanent", service="s", queue="q", event_id=None, event_type=None
    )
    assert dead[f.EXCEPTION_MESSAGE] == "cannot read report-\\udcff.csv"
    assert _frameable(dead) and _frameable(failure.retry_headers({}))
    assert failure.summary() == "builtins.ValueError: cannot read report-\\udcff.csv"


class BrokenStr(Exception):
    def __str__(self) -> str:
        raise IndexError("a bug in __str__")


def test_an_error_whose_text_cannot_be_rendered_still_has_a_story() -> None:
    failure = f.Failure.of(caught(raise_at_a, BrokenStr()), attempt=1)
    dead = failure.dead_letter_headers(
        {}, reason="permanent", service="s", queue="q", event_id=None, event_type=None
    )
    assert dead[f.EXCEPTION_MESSAGE] == "<BrokenStr: str() failed>"
    assert failure.summary().endswith("BrokenStr: <BrokenStr: str() failed>")
    assert "raise_at_a" in dead[f.TRACEBACK] and _frameable(dead)


def test_an_invalid_event_s_values_stay_out_of_its_story() -> None:
    """pydantic's rendering quotes the wrong value (`input_value=...`: here the `data` whose
    `subject` is missing, its webhook URL's token included) into the dead letter's headers,
    its log line, the public status detail and the callback; and links to pydantic's pages."""
    body = {
        "specversion": "1.0",
        "id": "evt-1",
        "source": "urn:test",
        "type": "notification.requested",
        "data": {"channel": "webhook", "recipient": "https://hooks.example.com/in?key=t0ken"},
    }
    try:
        EVENT_ADAPTER.validate_json(json.dumps(body))
    except ValidationError as exc:
        failure = f.Failure.of(exc, 1)
    headers = failure.dead_letter_headers(
        {},
        reason="invalid",
        service="notifier",
        queue="q",
        event_id=None,
        event_type=None,
    )
    told = [failure.summary(), *map(str, headers.values())]
    assert not [text for text in told if "t0ken" in text or "errors.pydantic.dev" in text]
    message = headers[f.EXCEPTION_MESSAGE]
    assert "data.subject" in message and "Field required" in message
    assert headers[f.EXCEPTION_TYPE].endswith("ValidationError")
