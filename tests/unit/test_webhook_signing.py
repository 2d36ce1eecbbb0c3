"""Webhook signatures: HMAC-SHA256 over `<timestamp>.<body>`, Stripe-style header."""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from pathlib import Path
from typing import Any

import pytest

from services.notifier.signing import sign, signature, verify

SECRET = b"whsec-0123456789abcdef0123456789abcdef"
BODY = b'{"id":"e-1","type":"notification.requested"}'
T = 1_700_000_000


def test_the_header_carries_the_timestamp_and_the_hex_hmac_of_timestamp_dot_body() -> None:
    expected = hmac.new(SECRET, b"1700000000." + BODY, hashlib.sha256).hexdigest()
    assert sign(SECRET, T, BODY) == f"t={T},v1={expected}"
    assert signature(SECRET, T, BODY) == expected


def test_a_signed_body_verifies() -> None:
    assert verify(sign(SECRET, T, BODY), BODY, SECRET, now=T + 10)


@pytest.mark.parametrize(
    ("body", "secret"),
    [(BODY + b" ", SECRET), (BODY.replace(b"e-1", b"e-2"), SECRET), (BODY, b"another-secret")],
    ids=["appended", "altered", "other secret"],
)
def test_a_changed_body_or_another_secret_does_not_verify(body: bytes, secret: bytes) -> None:
    assert not verify(sign(SECRET, T, BODY), body, secret, now=T)


def test_an_old_or_future_timestamp_does_not_verify() -> None:
    header = sign(SECRET, T, BODY)
    assert not verify(header, BODY, SECRET, now=T + 301)
    assert not verify(header, BODY, SECRET, now=T - 301)
    assert verify(header, BODY, SECRET, now=T + 300)


def test_a_changed_timestamp_does_not_verify() -> None:
    digest = signature(SECRET, T, BODY)
    assert not verify(f"t={T + 1},v1={digest}", BODY, SECRET, now=T)


@pytest.mark.parametrize("header", ["", "t=abc,v1=00", f"v1={'0' * 64}", f"t={T}", "garbage"])
def test_malformed_headers_do_not_verify(header: str) -> None:
    assert not verify(header, BODY, SECRET, now=T)


HOSTILE = (f"t=\u00b2,v1={'0' * 64}", f"t={'9' * 400},v1={'0' * 64}", f"t={T},v1=\u00e9{'0' * 63}")


@pytest.mark.parametrize(
    "header", HOSTILE, ids=["superscript digit", "400-digit timestamp", "non-ASCII signature"]
)
def test_hostile_headers_do_not_verify_and_do_not_raise(header: str) -> None:
    assert not verify(header, BODY, SECRET, now=T + 0.5)  # a float, as `time.time()` is


def test_any_of_several_signatures_may_match_during_a_secret_rotation() -> None:
    old = signature(b"old-secret", T, BODY)
    header = f"t={T},v1={old},v1={signature(SECRET, T, BODY)}"
    assert verify(header, BODY, SECRET, now=T)
    assert verify(header, BODY, b"old-secret", now=T)


def test_the_readme_verification_snippet_verifies_what_the_notifier_signs() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?def verify_courier_signature.*?)```", readme, re.DOTALL)
    assert snippet, "README lost its webhook verification snippet"
    namespace: dict[str, Any] = {}
    exec(compile(snippet[1], "README.md", "exec"), namespace)  # noqa: S102  # our own README
    verify_courier_signature = namespace["verify_courier_signature"]
    now = int(time.time())
    header = sign(SECRET, now, BODY)
    assert verify_courier_signature(header, BODY, SECRET)
    assert not verify_courier_signature(header, BODY + b"x", SECRET)
    assert not verify_courier_signature(header, BODY, b"other-secret")
    assert not verify_courier_signature(sign(SECRET, now - 3600, BODY), BODY, SECRET)
    for hostile in (*HOSTILE, f"t={now},v1=\u00e9{'0' * 63}"):
        assert not verify_courier_signature(hostile, BODY, SECRET)
