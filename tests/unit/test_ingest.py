"""Reading events from HTTP requests: the three CloudEvents modes, batches and bad input."""

from __future__ import annotations

import orjson
import pytest
from pydantic import ValidationError

from contracts.events import EVENT_ADAPTER, DatasetSubmitted, NotificationRequested
from contracts.notify import Channel
from services.gateway.ingest import IngestError, parse_batch, parse_event

NOTE = {"type": "notification.requested", "data": {"recipient": "r", "subject": "s"}}
PLAIN = orjson.dumps(NOTE)


def error_of(call: object) -> IngestError:
    assert callable(call)
    with pytest.raises(IngestError) as caught:
        call()
    return caught.value


def test_plain_json_is_an_event_with_type_and_data() -> None:
    event = parse_event("application/json", {}, PLAIN)
    assert isinstance(event, NotificationRequested) and event.data.subject == "s"


def test_structured_mode_keeps_the_given_attributes() -> None:
    body = orjson.dumps(
        {
            "specversion": "1.0",
            "id": "evt-1",
            "source": "urn:shop",
            "type": "notification.requested",
            "time": "2026-01-02T03:04:05Z",
            "subject": "order-9",
            "data": {"recipient": "r", "subject": "s"},
        }
    )
    event = parse_event("application/cloudevents+json; charset=utf-8", {}, body)
    assert (event.id, event.source, event.subject) == ("evt-1", "urn:shop", "order-9")
    assert event.time.year == 2026


def test_binary_mode_reads_attributes_from_ce_headers() -> None:
    headers = {
        "ce-specversion": "1.0",
        "ce-type": "notification.requested",
        "ce-id": "evt-2",
        "ce-source": "urn:crm",
        "ce-correlationid": "corr-7",
    }
    event = parse_event("application/json", headers, b'{"recipient": "r", "subject": "s"}')
    assert (event.id, event.source, event.correlationid) == ("evt-2", "urn:crm", "corr-7")


BINARY = {"ce-specversion": "1.0", "ce-type": "notification.requested", "ce-id": "evt-3"}


@pytest.mark.parametrize(
    ("headers", "body", "loc"),
    [
        ({**BINARY, "ce-type": "order.placed"}, b'{"recipient": "r", "subject": "s"}', "ce-type"),
        ({**BINARY, "ce-id": "x" * 200}, b'{"recipient": "r", "subject": "s"}', "ce-id"),
        ({**BINARY, "ce-id": ".."}, b'{"recipient": "r", "subject": "s"}', "ce-id"),
        ({**BINARY, "ce-time": "soon"}, b'{"recipient": "r", "subject": "s"}', "ce-time"),
        (
            {**BINARY, "ce-callbackurl": "ftp://x"},
            b'{"recipient": "r", "subject": "s"}',
            "ce-callbackurl",
        ),
    ],
)
def test_a_binary_mode_attributes_error_names_its_header(
    headers: dict[str, str], body: bytes, loc: str
) -> None:
    [error] = error_of(lambda: parse_event("application/json", headers, body)).detail
    assert error["loc"] == ("header", loc), error


def test_a_binary_mode_extension_courier_does_not_know_is_refused_as_in_structured_mode() -> None:
    # Structured mode refuses `"myext": "v"` (422); binary mode dropped `ce-myext` silently.
    body = b'{"recipient": "r", "subject": "s"}'
    [error] = error_of(
        lambda: parse_event("application/json", {**BINARY, "ce-myext": "v"}, body)
    ).detail
    assert (error["type"], error["loc"]) == ("extra_forbidden", ("header", "ce-myext"))
    structured = orjson.dumps({**NOTE, "specversion": "1.0", "myext": "v"})
    [same] = error_of(lambda: parse_event("application/cloudevents+json", {}, structured)).detail
    assert same["type"] == "extra_forbidden"


def test_a_binary_mode_datas_error_is_located_in_the_body() -> None:
    [error] = error_of(
        lambda: parse_event("application/json", BINARY, b'{"recipient": "r"}')
    ).detail
    assert error["loc"] == ("body", "subject"), error


def test_a_correlation_header_applies_when_the_event_has_none() -> None:
    event = parse_event("application/json", {"x-correlation-id": "c-1"}, PLAIN)
    assert event.correlationid == "c-1"


def test_a_correlation_header_in_utf8_is_read_as_utf8() -> None:
    # The server gives header values as Latin-1: `café` became `cafÃ©`.
    as_served = "café".encode().decode("latin-1")
    event = parse_event("application/json", {"x-correlation-id": as_served}, PLAIN)
    assert event.correlationid == "café"


@pytest.mark.parametrize(
    ("content_type", "body", "status"),
    [
        ("application/json", b"{not json", 400),
        ("application/json", b'{"type": "order.placed", "data": {}}', 422),
        ("application/json", b'{"data": {}}', 422),
        ("application/json", b'{"type": "notification.requested", "data": {"subject": "s"}}', 422),
        (
            "application/json",
            b'{"type": "notification.requested", "data": {"recipient": 1, "subject": "s"}}',
            422,
        ),
        ("text/plain", PLAIN, 415),
        (None, PLAIN, 415),
    ],
)
def test_bad_input_is_a_clear_client_error(
    content_type: str | None, body: bytes, status: int
) -> None:
    assert error_of(lambda: parse_event(content_type, {}, body)).status == status


@pytest.mark.parametrize("event_id", ["a\u0000b", "line\nbreak", "tab\tin", "del\u007f"])
def test_an_id_with_a_control_character_is_refused_with_422(event_id: str) -> None:
    """Ids key every store, and PostgreSQL refuses a NUL in text: refused at the door, not
    failing a batched statement beside other events' ids in a consumer."""
    body = orjson.dumps(
        {
            "id": event_id,
            "type": "notification.requested",
            "data": {"recipient": "r", "subject": "s"},
        }
    )
    assert error_of(lambda: parse_event("application/json", {}, body)).status == 422


def test_an_event_with_a_control_character_in_its_id_is_invalid_for_consumers_too() -> None:
    body = orjson.dumps(
        {
            "id": "a\u0000b",
            "type": "notification.requested",
            "data": {"recipient": "r", "subject": "s"},
        }
    )
    with pytest.raises(ValidationError, match="pattern"):
        EVENT_ADAPTER.validate_json(body)


@pytest.mark.parametrize("field", ["id", "correlationid", "causationid"])
def test_an_id_longer_than_an_amqp_short_string_is_refused_with_422(field: str) -> None:
    """128 characters, 256 bytes: an AMQP message or correlation id holds 255. Accepted, it
    failed the publish of every event framed with it."""
    body = orjson.dumps(
        {
            field: "é" * 128,
            "type": "notification.requested",
            "data": {"recipient": "r", "subject": "s"},
        }
    )
    assert error_of(lambda: parse_event("application/json", {}, body)).status == 422
    assert parse_event("application/json", {}, body.replace("é".encode(), b"e")).type


def test_a_correlation_header_that_is_no_valid_id_is_refused_with_422() -> None:
    error = error_of(
        lambda: parse_event("application/json", {"x-correlation-id": "a\u0000b"}, PLAIN)
    )
    assert (error.status, "X-Correlation-ID" in error.detail) == (422, True)


@pytest.mark.parametrize(("header", "kept"), [("a" * 200, "a" * 128), ("é" * 128, "é" * 127)])
def test_a_long_correlation_header_is_cut_to_what_an_id_holds(header: str, kept: str) -> None:
    # 128 characters and 255 bytes of UTF-8: two-byte characters were refused, not cut.
    event = parse_event("application/json", {"x-correlation-id": header}, PLAIN)
    assert event.correlationid == kept


@pytest.mark.parametrize("body", [b'{"type": "x", "data": {}}', b'{"data": {}}'])
def test_an_unknown_or_missing_type_is_the_type_fields_error_naming_the_known_ones(
    body: bytes,
) -> None:
    [error] = error_of(lambda: parse_event("application/json", {}, body)).detail
    assert error["loc"] == ("type",)
    assert "notification.requested" in error["msg"]


def test_a_batch_is_validated_as_a_whole() -> None:
    good = orjson.loads(PLAIN)
    events = parse_batch("application/cloudevents-batch+json", {}, orjson.dumps([good, good]), 10)
    assert len(events) == 2 and events[0].id != events[1].id
    error = error_of(
        lambda: parse_batch("application/json", {}, orjson.dumps([good, {"type": "x"}]), 10)
    )
    assert error.status == 422 and error.detail[0]["loc"] == (1, "type")


def test_a_batch_with_two_events_under_one_id_is_refused_naming_both() -> None:
    """The consumers would take the second as a resend of the first and skip it."""
    first, second = (
        {**NOTE, "id": "order-9", "data": {"recipient": r, "subject": "s"}} for r in "ab"
    )
    body = orjson.dumps([first, {**NOTE, "id": "other"}, second])
    error = error_of(lambda: parse_batch("application/json", {}, body, 10))
    assert error.status == 422
    [problem] = error.detail
    assert problem["loc"] == [2, "notification.requested", "id"]
    assert "event 0 of this batch has the same id" in problem["msg"]


@pytest.mark.parametrize(
    ("body", "status"),
    [(b"[]", 422), (b"{}", 422), (b"[", 400), (orjson.dumps([orjson.loads(PLAIN)] * 3), 413)],
)
def test_bad_batches_are_refused(body: bytes, status: int) -> None:
    assert error_of(lambda: parse_batch("application/json", {}, body, 2)).status == status


def test_a_batch_needs_a_batch_content_type() -> None:
    assert error_of(lambda: parse_batch("application/cloudevents+json", {}, b"[]", 2)).status == 415


# --- callbackurl ----------------------------------------------------------------------------

HOOK = "https://shop.example/hooks/courier?order=9"


def with_callback(name: str, url: object) -> bytes:
    return orjson.dumps({**orjson.loads(PLAIN), name: url})


@pytest.mark.parametrize("name", ["callbackurl", "callback_url"])
def test_a_callback_url_is_accepted_under_either_name_and_kept_as_callbackurl(name: str) -> None:
    event = parse_event("application/json", {}, with_callback(name, HOOK))
    assert isinstance(event, NotificationRequested) and event.callbackurl == HOOK
    serialised = orjson.loads(event.model_dump_json())
    assert serialised["callbackurl"] == HOOK and "callback_url" not in serialised


def test_binary_mode_reads_the_callback_url_from_its_ce_header() -> None:
    headers = {
        "ce-specversion": "1.0",
        "ce-type": "dataset.submitted",
        "ce-callbackurl": HOOK,
    }
    event = parse_event("application/json", headers, b'{"records": [{"a": 1}]}')
    assert event.callbackurl == HOOK


def test_an_event_without_a_callback_url_serialises_as_before_the_attribute_existed() -> None:
    """Consumers of the previous version forbid unknown attributes: an absent callback URL must
    not reach them as `"callbackurl": null` while a deployment is upgraded."""
    event = parse_event("application/json", {}, PLAIN)
    assert event.callbackurl is None
    assert "callbackurl" not in orjson.loads(EVENT_ADAPTER.dump_json(event))
    assert "callbackurl" not in event.model_dump()


def test_a_batch_keeps_each_events_callback_url() -> None:
    good = orjson.loads(PLAIN)
    body = orjson.dumps([{**good, "callback_url": HOOK}, good])
    first, second = parse_batch("application/json", {}, body, 10)
    assert (first.callbackurl, second.callbackurl) == (HOOK, None)


@pytest.mark.parametrize(
    "url",
    [
        "ftp://shop.example/hook",
        "javascript:alert(1)",
        "file:///etc/passwd",
        "shop.example/hook",
        "https://user:secret@shop.example/hook",
        "https://token@shop.example/hook",
        "https:///no-host",
        "https://shop.example:99999/hook",
        "https://shop.example/a hook",
        "https://shop.example/\nhook",
        "https://shop.example/" + "a" * 2048,
        "",
        7,
    ],
)
def test_an_unusable_callback_url_is_refused_with_422(url: object) -> None:
    error = error_of(
        lambda: parse_event("application/json", {}, with_callback("callback_url", url))
    )
    assert error.status == 422
    assert error.detail[0]["loc"][-1] in {"callbackurl", "callback_url"}, error.detail


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("https://shop.example:0/hook", "port 0"),
        ("https://" + "a" * 64 + ".example/hook", "not a valid DNS name"),
        ("https://a\u0085b.example/hook", "Invalid IDNA hostname"),
    ],
)
def test_a_callback_url_the_notifier_would_refuse_is_a_422_not_a_dead_letter(
    url: str, says: str
) -> None:
    # They were taken (202), then their callbacks dead-lettered or retried through every tier.
    error = error_of(lambda: parse_event("application/json", {}, with_callback("callbackurl", url)))
    assert error.status == 422
    [problem] = error.detail
    assert problem["loc"] == ["notification.requested", "callbackurl"] and says in problem["msg"]
    assert problem["msg"].startswith("the callback URL")
    batch = orjson.dumps([NOTE, orjson.loads(with_callback("callbackurl", url))])
    error = error_of(lambda: parse_batch("application/json", {}, batch, 10))
    assert error.status == 422 and error.detail[0]["loc"] == [
        1,
        "notification.requested",
        "callbackurl",
    ]


@pytest.mark.parametrize("event_id", [".", ".."])
def test_an_id_its_status_url_could_not_name_is_refused_with_422(event_id: str) -> None:
    # `/v1/events/..` is `/v1/`, and browsers resolve `%2E%2E` as a dot segment too.
    body = orjson.dumps({**NOTE, "id": event_id})
    error = error_of(lambda: parse_event("application/json", {}, body))
    assert error.status == 422 and error.detail[0]["loc"] == ["notification.requested", "id"]
    batch = orjson.dumps([{**NOTE, "id": "fine"}, {**NOTE, "id": event_id}])
    error = error_of(lambda: parse_batch("application/json", {}, batch, 10))
    assert error.status == 422 and error.detail[0]["loc"] == [1, "notification.requested", "id"]


def test_an_unusable_callback_url_in_a_ce_header_is_refused_with_422() -> None:
    headers = {
        "ce-specversion": "1.0",
        "ce-type": "dataset.submitted",
        "ce-callbackurl": "gopher://x",
    }
    assert (
        error_of(
            lambda: parse_event("application/json", headers, b'{"records": [{"a": 1}]}')
        ).status
        == 422
    )


# --- what the notifier could never deliver ------------------------------------------------------


LOG_ONLY: tuple[Channel, ...] = ("log",)
WEBHOOK_ONLY: tuple[Channel, ...] = ("webhook",)


def notification(channel: str, recipient: str) -> dict[str, object]:
    return {
        "type": "notification.requested",
        "data": {"channel": channel, "recipient": recipient, "subject": "s"},
    }


@pytest.mark.parametrize(
    ("channel", "recipient", "says"),
    [
        ("webhook", "hooks@example.org", "must be an absolute http or https URL"),
        ("webhook", "https://user:pw@example.com/x", "must not carry credentials"),
        ("webhook", "http://example.com:0/", "port 0"),
        ("webhook", "http://" + "a" * 64 + ".example/", "not a valid DNS name"),
        ("email", "not an address", "is not a valid recipient address"),
        ("email", "ops@example.com\r\nBcc: x@example.com", "line break"),
    ],
)
def test_a_notification_to_a_recipient_its_channel_refuses_is_a_422_not_a_dead_letter(
    channel: str, recipient: str, says: str
) -> None:
    # Taken with a 202 before, then dead-lettered by the notifier's own check; an upload's
    # targets were refused at once with the same check.
    body = orjson.dumps(notification(channel, recipient))
    error = error_of(lambda: parse_event("application/json", {}, body))
    assert error.status == 422
    [problem] = error.detail
    assert (
        problem["loc"] == ["notification.requested", "data", "recipient"] and says in problem["msg"]
    )
    batch = orjson.dumps([NOTE, notification(channel, recipient)])
    error = error_of(lambda: parse_batch("application/json", {}, batch, 10))
    assert error.status == 422 and error.detail[0]["loc"] == [
        1,
        "notification.requested",
        "data",
        "recipient",
    ]


@pytest.mark.parametrize(
    ("channel", "recipient"),
    [
        ("webhook", "https://hooks.example.org/deploys"),
        ("webhook", "http://127.0.0.1:8080/hook"),  # the notifier decides on addresses
        ("email", "ops@example.org"),
        ("log", "anything at all: a label"),
    ],
)
def test_a_notification_its_channel_can_deliver_is_accepted(channel: str, recipient: str) -> None:
    event = parse_event("application/json", {}, orjson.dumps(notification(channel, recipient)))
    assert isinstance(event, NotificationRequested) and event.data.recipient == recipient


def test_a_notification_on_a_channel_the_notifier_does_not_deliver_is_a_422() -> None:
    body = orjson.dumps(notification("email", "ops@example.org"))
    error = error_of(lambda: parse_event("application/json", {}, body, ("log", "webhook")))
    assert error.status == 422
    [problem] = error.detail
    assert problem["loc"] == ["notification.requested", "data", "channel"]
    assert problem["msg"] == (
        "the notifier does not deliver on the 'email' channel here; it delivers on: log, webhook"
    )
    batch = orjson.dumps([NOTE, notification("email", "ops@example.org")])
    error = error_of(lambda: parse_batch("application/json", {}, batch, 10, ("log", "webhook")))
    assert error.status == 422 and error.detail[0]["loc"] == [
        1,
        "notification.requested",
        "data",
        "channel",
    ]
    assert parse_event("application/json", {}, PLAIN, LOG_ONLY).type == "notification.requested"


def test_a_callback_url_without_a_webhook_channel_is_a_422() -> None:
    # Callbacks are posted by the notifier's webhook channel: without it, each one would be
    # dead-lettered as not configured.
    body = orjson.dumps(
        {"type": "dataset.submitted", "callbackurl": HOOK, "data": {"records": [{"a": 1}]}}
    )
    error = error_of(lambda: parse_event("application/json", {}, body, ("log", "email")))
    assert error.status == 422
    [problem] = error.detail
    assert problem["loc"] == ["dataset.submitted", "callbackurl"]
    assert problem["msg"].startswith("callbacks are posted as webhooks, and the notifier does not")
    assert parse_event("application/json", {}, body, WEBHOOK_ONLY).callbackurl == HOOK


def dataset(notify: str) -> dict[str, object]:
    return {"type": "dataset.submitted", "data": {"records": [{"a": 1}], "notify": notify}}


@pytest.mark.parametrize(
    "notify",
    [
        "webhook:https://hooks.example.org/datasets",
        "webhook:http://127.0.0.1:19001/ok/ds",  # the notifier decides on addresses
        "email:a@b.example",
        "log:team:alpha",  # a log label with a ':' of its own
        "me",
        "bench@example.org",  # no ':': a log label, as it always was
    ],
)
def test_a_dataset_notify_its_channel_can_deliver_is_accepted_as_given(notify: str) -> None:
    event = parse_event("application/json", {}, orjson.dumps(dataset(notify)))
    assert isinstance(event, DatasetSubmitted) and event.data.notify == notify


@pytest.mark.parametrize(
    ("notify", "says"),
    [
        ("email:not an address", "is not a valid recipient address"),
        ("webhook:ftp://hooks.example.org/x", "must be http or https"),
        ("webhook:http://example.com:0/", "port 0"),
        ("webhook:", "the recipient must be 1 to 2048 characters"),
        # Delivered to the log channel under the whole value before: nobody meant that.
        ("https://hooks.example.org/x", "unknown channel 'https'"),
        ("sms:+4412345", "unknown channel 'sms'"),
    ],
)
def test_a_dataset_notify_naming_a_target_its_channel_refuses_is_a_422(
    notify: str, says: str
) -> None:
    error = error_of(lambda: parse_event("application/json", {}, orjson.dumps(dataset(notify))))
    assert error.status == 422
    [problem] = error.detail
    assert problem["loc"] == ["dataset.submitted", "data", "notify"] and says in problem["msg"]
    batch = orjson.dumps([NOTE, dataset(notify)])
    error = error_of(lambda: parse_batch("application/json", {}, batch, 10))
    assert error.status == 422 and error.detail[0]["loc"] == [
        1,
        "dataset.submitted",
        "data",
        "notify",
    ]


def test_a_dataset_notify_on_a_channel_the_notifier_does_not_deliver_is_a_422() -> None:
    body = orjson.dumps(dataset("email:a@b.example"))
    error = error_of(lambda: parse_event("application/json", {}, body, ("log", "webhook")))
    assert error.status == 422
    [problem] = error.detail
    assert problem["loc"] == ["dataset.submitted", "data", "notify"]
    assert problem["msg"].startswith("the notifier does not deliver on the 'email' channel here")
    assert parse_event("application/json", {}, orjson.dumps(dataset("me")), LOG_ONLY)
