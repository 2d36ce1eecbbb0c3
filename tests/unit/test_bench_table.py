"""The benchmarks' smoke test: saved results render into RESULTS.md (no broker, no processes)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bench import report, table
from bench.report import Result


@pytest.fixture
def results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    report.save(
        "consumer",
        [
            Result("bare aio-pika", "msgs/s", 5079.6, [6257.3, 4642.1, 5079.6]),
            Result("courier", "msgs/s", 4321.0, [4300.0, 4321.0, 4400.0]),
        ],
        {"events": 20_000, "ratio": 0.8507, "target": "ratio courier / bare aio-pika >= 0.80"},
    )
    report.save(
        "memory",
        [Result("gateway RSS", "MiB", 101.5, [100.0, 101.5, 103.0])],
        {
            "seconds": 300.0,
            "processes": {
                "gateway": {"warm_up_mib": 100.0, "end_mib": 103.0, "growth": 0.03, "ok": True}
            },
        },
    )
    return tmp_path


def test_every_scenario_gets_a_section_with_its_figures(
    results: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert table.main(["--results", str(results)]) == 0

    text = (results / "RESULTS.md").read_text()
    assert text == capsys.readouterr().out
    assert text.index("## consumer") < text.index("## memory")  # the scenarios' order
    assert "| courier | 4,321 | msgs/s | ±1.2% | 3 | 4,300 .. 4,400 |" in text
    assert "| bare aio-pika | 5,080 | msgs/s | ±15.9% | 3 | 4,642 .. 6,257 |" in text
    assert "**Target:** ratio courier / bare aio-pika >= 0.80" in text
    assert "- ratio: 0.851" in text
    assert "- events: 20,000" in text
    assert "| gateway RSS | 102 | MiB | ±1.5% | 3 | 100 .. 103 |" in text
    assert "|  | warm_up_mib | end_mib | growth | ok |" in text
    assert "| gateway | 100 | 103 | +3.0% | yes |" in text
    assert "cpus" in text  # the machine each scenario ran on


def test_a_broken_file_is_named_not_fatal(tmp_path: Path) -> None:
    (tmp_path / "gateway.json").write_text("{not json")
    (tmp_path / "odd.json").write_text(json.dumps([1, 2]))

    text = table.render(table.load(tmp_path), datetime.now(UTC), "test machine")

    assert "## gateway\n\nCould not read its results (JSONDecodeError" in text
    assert "## odd\n\nCould not read its results (not a result record)" in text
    assert "on test machine" in text


def test_a_run_on_a_private_broker_is_saved_beside_the_usual_one(
    results: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BENCH_BROKER", "private_unbound")
    report.save("consumer", [Result("courier", "msgs/s", 5000.0, [5000.0])], {})

    usual = json.loads((results / "consumer.json").read_text())
    private = json.loads((results / "consumer_private_unbound.json").read_text())
    assert [r["median"] for r in usual["results"]] == [5079.6, 4321.0]  # not overwritten
    assert private["broker"] == "private_unbound"
    text = table.render(table.load(results), datetime.now(UTC), "test machine")
    assert (
        text.index("## consumer\n")
        < text.index("## consumer_private_unbound")
        < text.index("## memory")
    )
