"""Files end to end with real processes: upload → blob → processor analysis → gateway result."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.e2e.conftest import System
from tests.support.polling import eventually_sync
from tests.support.processes import base_url

pytestmark = [pytest.mark.e2e, pytest.mark.broker]

CSV = b"sku,price,qty\na,10,1\nb,30,\nc,20,3\n"


def upload(system: System, name: str, content: bytes, content_type: str) -> str:
    response = httpx.post(
        f"{base_url(system.gateway)}/v1/files",
        files={"file": (name, content, content_type)},
        timeout=10,
    )
    assert response.status_code == 202, response.text
    file_id: str = response.json()["id"]
    return file_id


def file_status(system: System, file_id: str) -> dict[str, Any]:
    response = httpx.get(f"{base_url(system.gateway)}/v1/files/{file_id}", timeout=5)
    assert response.status_code == 200, response.text
    found: dict[str, Any] = response.json()
    return found


def test_an_uploaded_csv_is_analysed_and_its_analysis_served(system: System) -> None:
    file_id = upload(system, "prices.csv", CSV, "text/csv")

    def analysed() -> dict[str, Any]:
        found = file_status(system, file_id)
        assert found["analysis"] is not None, found
        return found

    found = eventually_sync(analysed, timeout=30)
    assert found["status"] == "succeeded"
    analysis = found["analysis"]
    assert (analysis["format"], analysis["detected_type"], analysis["header"]) == (
        "csv",
        "text/csv",
        True,
    )
    assert (analysis["record_count"], analysis["line_count"], analysis["column_count"]) == (3, 4, 3)
    columns = {column["name"]: column for column in analysis["columns"]}
    assert columns["price"]["kind"] == "number"
    assert (columns["price"]["min"], columns["price"]["max"], columns["price"]["mean"]) == (
        10.0,
        30.0,
        20.0,
    )
    assert (columns["qty"]["count"], columns["qty"]["nulls"]) == (2, 1)
    assert (columns["sku"]["kind"], columns["sku"]["distinct"]) == ("string", 3)

    content = httpx.get(f"{base_url(system.gateway)}{found['content_url']}", timeout=5)
    assert content.content == CSV


def test_a_corrupt_file_is_dead_lettered_with_its_reason(system: System) -> None:
    file_id = upload(system, "broken.csv", b"a,b\n1,\xff\xfe\n", "text/csv")

    def failed() -> dict[str, Any]:
        found = file_status(system, file_id)
        assert found["status"] == "dead_lettered", found
        return found

    found = eventually_sync(failed, timeout=30)
    assert found["reason"] == "permanent"
    assert "not valid UTF-8 on line 2" in found["detail"]
    assert found["analysis"] is None
