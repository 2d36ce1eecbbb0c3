"""How a webhook receiver's answer is classified, and how `Retry-After` is read."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from services.messaging.errors import PermanentError, RetryLater
from services.messaging.retry import RetryPolicy
from services.notifier.webhook import (
    MAX_ERROR_BODY,
    WebhookRejected,
    WebhookUnavailable,
    check_response,
    parse_retry_after,
)

NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
def test_2xx_is_delivered(status: int) -> None:
    check_response(status, {}, b"", NOW)


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504, 599])
def test_408_429_and_5xx_are_transient(status: int) -> None:
    with pytest.raises(WebhookUnavailable) as caught:
        check_response(status, {}, b"busy", NOW)
    assert caught.value.status == status
    assert isinstance(caught.value, RetryLater)
    assert not RetryPolicy(delays=(1,)).is_permanent(caught.value)
    assert caught.value.min_delay == 0


@pytest.mark.parametrize("status", [301, 302, 304, 400, 401, 403, 404, 405, 409, 410, 413, 422])
def test_other_statuses_are_permanent_with_the_status_and_body(status: int) -> None:
    with pytest.raises(WebhookRejected) as caught:
        check_response(status, {}, b'{"error": "bad\nsignature"}', NOW)
    assert isinstance(caught.value, PermanentError)
    assert caught.value.status == status
    assert str(caught.value) == f'webhook answered {status}: {{"error": "bad signature"}}'


def test_control_characters_in_the_body_are_escaped_in_the_error() -> None:
    # The message is stored with the dead letter: a receiver's escape sequences must not
    # reach whoever reads it in a terminal.
    body = b"\x1b[31mRED\x1b[0m \x1b]0;title\x07 \xc2\x9b2K"
    with pytest.raises(WebhookRejected) as caught:
        check_response(400, {}, body, NOW)
    assert caught.value.body == r"\x1b[31mRED\x1b[0m \x1b]0;title\x07 \x9b2K"


def test_a_long_body_is_trimmed() -> None:
    with pytest.raises(WebhookRejected) as caught:
        check_response(400, {}, b"x" * 100_000, NOW)
    assert len(caught.value.body) == MAX_ERROR_BODY


def test_retry_after_seconds_becomes_the_minimum_delay() -> None:
    with pytest.raises(WebhookUnavailable) as caught:
        check_response(429, {"retry-after": "2"}, b"", NOW)
    assert caught.value.min_delay == 2
    assert RetryPolicy(delays=(1, 2, 5), immediate=0).next_delay(1, caught.value) == 2


def test_retry_after_on_a_503_counts_too() -> None:
    with pytest.raises(WebhookUnavailable) as caught:
        check_response(503, {"retry-after": "40"}, b"", NOW)
    assert RetryPolicy(delays=(5, 30, 120)).next_delay(1, caught.value) == 120


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, None),
        ("0", 0.0),
        ("120", 120.0),
        (" 7 ", 7.0),
        (format_datetime(NOW + timedelta(seconds=90), usegmt=True), 90.0),
        (format_datetime(NOW - timedelta(seconds=90), usegmt=True), 0.0),  # in the past
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
        ("-5", None),
        ("soon", None),
        ("1.5", None),
        ("²", None),  # a digit to `str.isdigit`, not to `float`
        ("", None),
    ],
)
def test_retry_after_is_seconds_or_an_http_date(value: str | None, seconds: float | None) -> None:
    assert parse_retry_after(value, NOW) == seconds
