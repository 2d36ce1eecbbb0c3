"""Notification targets: the `notify` contract field and the upload form values it comes from."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from contracts.events import EVENT_ADAPTER
from contracts.files import FileUploaded, FileUploadedData
from contracts.notify import MAX_NOTIFY_TARGETS, Channel, NotifyTarget
from services.gateway.ingest import IngestError
from services.gateway.notify_targets import (
    MAX_VALUE_BYTES,
    add_target,
    decode_value,
    parse_target,
)

UPLOADED: dict[str, object] = {
    "file_id": "f",
    "blob": "f",
    "name": "a.csv",
    "content_type": "text/csv",
    "size": 1,
    "sha256": "a" * 64,
}


@pytest.mark.parametrize(
    ("raw", "channel", "recipient"),
    [
        ("webhook:https://example.com/hook?x=1", "webhook", "https://example.com/hook?x=1"),
        ("webhook:http://127.0.0.1:8080/h", "webhook", "http://127.0.0.1:8080/h"),
        # A-labels that the idna package will not decode (an emoji domain, a malformed one):
        # DNS and the POST take them as they are. They were a 500.
        ("webhook:https://xn--ls8h.la/", "webhook", "https://xn--ls8h.la/"),
        ("webhook:http://xn--a.com/", "webhook", "http://xn--a.com/"),
        # Unusual but resolvable hosts stay accepted by the DNS-name check.
        ("webhook:http://under_score.example/", "webhook", "http://under_score.example/"),
        ("webhook:http://a-.example.com/", "webhook", "http://a-.example.com/"),
        ("webhook:http://example.com./", "webhook", "http://example.com./"),
        ("webhook:http://[2001:db8::1]:8443/", "webhook", "http://[2001:db8::1]:8443/"),
        ("webhook:https://b\u00fccher.de/", "webhook", "https://b\u00fccher.de/"),
        (
            "webhook:https://" + "a" * 63 + ".example/",
            "webhook",
            "https://" + "a" * 63 + ".example/",
        ),
        ("email:ops@example.com", "email", "ops@example.com"),
        (" log: ops ", "log", "ops"),
    ],
)
def test_a_target_is_a_channel_and_a_recipient(raw: str, channel: str, recipient: str) -> None:
    assert parse_target(raw) == NotifyTarget.model_validate(
        {"channel": channel, "recipient": recipient}
    )


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ("ops@example.com", "expected <channel>:<recipient>"),
        ("sms:+4412345", "unknown channel 'sms'; use one of log, webhook, email"),
        ("webhook:ftp://example.com/x", "must be http or https"),
        ("webhook:https://user:pw@example.com/x", "must not carry credentials"),
        ("webhook:https:///nohost", "no host"),
        # Accepted with a 202, then retried through every delay tier before a dead letter:
        # refused as callback URLs already, the same URLs now are as targets.
        ("webhook:http://127.0.0.1:99999/", "is not a valid URL"),
        ("webhook:http://a b/", "must not contain spaces"),
        ("webhook:https://ex ample.com/", "must not contain spaces"),
        ("webhook:http://example.com:0/", "port 0"),
        # A label over 63 characters: the resolver raised on every try, retried as transient.
        ("webhook:http://" + "a" * 64 + ".example/", "not a valid DNS name"),
        ("webhook:http://example.com../", "not a valid DNS name"),
        ("webhook:http://a..b.example/", "not a valid DNS name"),
        ("webhook:http://a\u200bb.example/", "Invalid IDNA hostname"),
        ("email:not an address", "is not a valid recipient address"),
        ("email:Ops <ops@example.com>", "is not a valid recipient address"),
        ("email:ops@example.com\r\nBcc: x@example.com", "line break"),
        ("email:a b@example.com", "is not a valid recipient address"),  # was a 500
        ("email:é@example.com", "is not a valid recipient address"),
        ("log:", "1 to 2048 characters"),
        ("log:" + "x" * 2049, "1 to 2048 characters"),
    ],
)
def test_a_bad_target_is_a_422_that_says_why(raw: str, says: str) -> None:
    with pytest.raises(IngestError) as caught:
        parse_target(raw)
    assert caught.value.status == 422
    assert says in str(caught.value.detail)
    assert str(caught.value.detail).startswith("notify target ")


LOG_ONLY: tuple[Channel, ...] = ("log",)
WEBHOOK_ONLY: tuple[Channel, ...] = ("webhook",)


def test_a_target_on_a_channel_the_notifier_does_not_deliver_is_a_422() -> None:
    with pytest.raises(IngestError) as caught:
        parse_target("email:ops@example.com", ("log", "webhook"))
    assert caught.value.status == 422
    assert caught.value.detail == (
        "notify target 'email:ops@example.com': the notifier does not deliver on the 'email' "
        "channel here; it delivers on: log, webhook"
    )
    assert parse_target("log:ops", LOG_ONLY) == NotifyTarget(channel="log", recipient="ops")
    with pytest.raises(IngestError, match="on the 'log' channel"):
        add_target([], "log:ops", WEBHOOK_ONLY)


def test_targets_are_kept_once_and_bounded() -> None:
    targets: list[NotifyTarget] = []
    add_target(targets, "log:ops")
    add_target(targets, "log:ops")
    assert targets == [NotifyTarget(channel="log", recipient="ops")]
    for n in range(1, MAX_NOTIFY_TARGETS):
        add_target(targets, f"log:team-{n}")
    with pytest.raises(IngestError, match=f"at most {MAX_NOTIFY_TARGETS} notify targets"):
        add_target(targets, "log:one-too-many")
    add_target(targets, "log:ops")  # a repeat still fits


def test_form_values_are_bounded_utf8() -> None:
    assert decode_value("log:\u00e9quipe".encode(), "a target") == "log:\u00e9quipe"
    with pytest.raises(IngestError, match="a target is not valid UTF-8"):
        decode_value(b"log:\xff", "a target")
    with pytest.raises(IngestError, match="a target is longer than"):
        decode_value(b"x" * (MAX_VALUE_BYTES + 1), "a target")


def test_notify_defaults_to_empty_and_is_left_out_of_the_wire_form_then() -> None:
    plain = FileUploadedData.model_validate(UPLOADED)  # an event from before the field existed
    assert plain.notify == []
    event = FileUploaded(data=plain)
    assert "notify" not in event.model_dump()["data"]
    assert b"notify" not in EVENT_ADAPTER.dump_json(event)


def test_notify_travels_when_set_and_is_bounded() -> None:
    targets = [{"channel": "webhook", "recipient": "https://example.com/h"}]
    event = FileUploaded(data=FileUploadedData.model_validate({**UPLOADED, "notify": targets}))
    again = EVENT_ADAPTER.validate_json(EVENT_ADAPTER.dump_json(event))
    assert isinstance(again, FileUploaded)
    assert again.data.notify == [NotifyTarget(channel="webhook", recipient="https://example.com/h")]
    for bad in (
        [{"channel": "log", "recipient": f"r{n}"} for n in range(MAX_NOTIFY_TARGETS + 1)],
        [{"channel": "sms", "recipient": "x"}],
        [{"channel": "log", "recipient": ""}],
        [{"channel": "log", "recipient": "x", "extra": 1}],
    ):
        with pytest.raises(ValidationError):
            FileUploadedData.model_validate({**UPLOADED, "notify": bad})
