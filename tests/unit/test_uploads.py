"""Upload helpers: the type allow-list, safe file names, download headers; files not ingestible."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from contracts.events import EVENT_ADAPTER, INGEST_ADAPTER
from services.gateway.file_routes import content_disposition
from services.gateway.settings import GatewaySettings
from services.gateway.uploads import media_type_allowed, safe_file_name


@pytest.mark.parametrize(
    ("media", "allowed", "expected"),
    [
        ("text/csv", ("text/csv",), True),
        ("image/png", ("image/*",), True),
        ("image/png", ("text/*", "application/pdf"), False),
        ("application/x-msdownload", ("*/*",), True),
        ("text/csvx", ("text/csv",), False),
    ],
)
def test_the_allow_list_matches_types_and_families(
    media: str, allowed: tuple[str, ...], expected: bool
) -> None:
    assert media_type_allowed(media, allowed) is expected


def test_the_allow_list_is_read_from_a_comma_separated_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COURIER_UPLOAD_TYPES", "Text/CSV, image/*")
    monkeypatch.setenv("COURIER_MAX_UPLOAD_BYTES", "1024")
    settings = GatewaySettings(environment="development")
    assert settings.upload_types == ("text/csv", "image/*")
    assert settings.max_upload_bytes == 1024


@pytest.mark.parametrize(
    ("raw", "name"),
    [
        (b"report.csv", "report.csv"),
        (b"../../etc/passwd", "passwd"),
        (b"C:\\Users\\me\\data.csv", "data.csv"),
        ("r\u00e9sum\u00e9.txt".encode(), "r\u00e9sum\u00e9.txt"),
        (b"bad\x00\x1bname", "badname"),
        # C1 controls and bidi overrides reached notification subjects and headers.
        ("a\u0085b.csv".encode(), "ab.csv"),
        ("invoice\u202egnp.exe".encode(), "invoicegnp.exe"),
        ("zero\u200bwidth\ufeff.csv".encode(), "zerowidth.csv"),
        (b"dir/", "upload"),
        (None, "upload"),
        (b"x" * 300, "x" * 255),
    ],
)
def test_file_names_lose_directories_and_control_characters(raw: bytes | None, name: str) -> None:
    assert safe_file_name(raw) == name


def test_content_disposition_has_an_ascii_fallback_and_the_exact_name() -> None:
    assert content_disposition('a "b"\u00e9.csv') == (
        "attachment; filename=\"a _b__.csv\"; filename*=UTF-8''a%20%22b%22%C3%A9.csv"
    )


def test_file_events_travel_but_cannot_be_ingested() -> None:
    data: dict[str, object] = {
        "file_id": "f",
        "blob": "f",
        "name": "a.csv",
        "content_type": "text/csv",
        "size": 1,
        "sha256": "a" * 64,
    }
    uploaded = {"type": "file.uploaded", "data": data}
    assert EVENT_ADAPTER.validate_python(uploaded).type == "file.uploaded"
    with pytest.raises(ValidationError):
        INGEST_ADAPTER.validate_python(uploaded)
    for field, value in [("blob", "../x"), ("content_type", "Text/CSV"), ("size", -1)]:
        with pytest.raises(ValidationError):
            EVENT_ADAPTER.validate_python({**uploaded, "data": {**data, field: value}})
