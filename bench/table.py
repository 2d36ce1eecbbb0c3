"""All saved benchmark figures in one Markdown file: bench/results/RESULTS.md.

    python -m bench.table        # reads bench/results/*.json, writes RESULTS.md there, prints it

One section per scenario (each JSON that `bench.report.save` wrote): when and on what it ran, its
target if it has one, a table of its results (median, spread, runs, range), then whatever else
the scenario saved (ratios, parameters, per-process figures) as lists and tables. It knows no
scenario by name beyond their order, so a new benchmark's figures appear without changes here.
Figures from different runs are not comparable on a shared machine: only ratios within a
scenario, measured in the same run, are.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.report import RESULTS

OUTPUT = "RESULTS.md"
ORDER = (
    "gateway",
    "consumer",
    "batch",
    "e2e_latency",
    "replay",
    "dlq_drain",
    "dlq_store",
    "memory",
    "upload_memory",
)
HEADER = frozenset({"scenario", "at", "machine", "results", "target", "targets"})
PERCENT = frozenset({"spread", "growth", "growth_of_file"})


def load(directory: Path) -> list[dict[str, Any]]:
    """Every result record in `directory`, in ORDER and then by name; unreadable ones say why."""
    records = []
    for path in directory.glob("*.json"):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            record = {"error": f"{type(error).__name__}: {error}"}
        if not isinstance(record, dict) or not isinstance(record.get("results", []), list):
            record = {"error": "not a result record"}
        record.setdefault("scenario", path.stem)
        records.append(record)
    return sorted(records, key=lambda r: (_rank(str(r["scenario"])), str(r["scenario"])))


def _rank(scenario: str) -> int:
    for rank, prefix in enumerate(ORDER):
        if scenario == prefix or scenario.startswith(f"{prefix}_"):
            return rank
    return len(ORDER)


def fmt(value: Any, key: str = "") -> str:
    """A figure for a table cell: a few significant digits, percentages for relative figures."""
    if value is None or value == {} or value == []:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if key in PERCENT:
            return f"{value:+.1%}" if key == "growth" else f"{value:.1%}"
        if "slope" in key:
            return f"{value:+.3g}"
        size = abs(value)
        if size >= 100:
            return f"{value:,.0f}"
        if size >= 10:
            return f"{value:.1f}"
        if size >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    if isinstance(value, str):
        return value.replace("|", "\\|").replace("\n", " ")
    return fmt(json.dumps(value))


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [*lines, ""]


def _results(results: list[Any]) -> list[str]:
    rows = []
    for result in results:
        if not isinstance(result, Mapping):
            continue
        samples = [s for s in result.get("samples", []) if isinstance(s, int | float)]
        spread = result.get("spread")
        rows.append(
            [
                fmt(result.get("name")),
                fmt(result.get("median")),
                fmt(result.get("unit")),
                f"±{spread:.1%}" if isinstance(spread, int | float) else "—",
                fmt(len(samples)),
                f"{fmt(min(samples))} .. {fmt(max(samples))}" if samples else "—",
            ]
        )
    if not rows:
        return []
    return _table(["result", "median", "unit", "spread", "n", "range"], rows)


def _mapping(name: str, value: Mapping[str, Any]) -> list[str]:
    """A dict of figures as a two-column table, a dict of dicts as a table with a row each."""
    if value and all(isinstance(v, Mapping) for v in value.values()):
        columns = list(dict.fromkeys(k for v in value.values() for k in v))
        rows = [[fmt(row)] + [fmt(v.get(c), c) for c in columns] for row, v in value.items()]
        return [f"**{name}**", "", *_table(["", *columns], rows)]
    return [f"**{name}**", "", *_table(["", "value"], [[k, fmt(v, k)] for k, v in value.items()])]


def section(record: Mapping[str, Any]) -> list[str]:
    lines = [f"## {record['scenario']}", ""]
    if "error" in record:
        return [*lines, f"Could not read its results ({record['error']}).", ""]
    machine = record.get("machine") or {}
    about = [fmt(record.get("at", "unknown time"))]
    about += [f"{k} {fmt(v)}" for k, v in machine.items()] if isinstance(machine, Mapping) else []
    lines += [f"_{' · '.join(about)}_", ""]
    for key in ("target", "targets"):
        target = record.get(key)
        if isinstance(target, Mapping):
            lines += [f"**Target:** {', '.join(f'{k}: {fmt(v)}' for k, v in target.items())}", ""]
        elif target is not None:
            lines += [f"**Target:** {fmt(target)}", ""]
    lines += _results(record.get("results", []))
    rest = {k: v for k, v in record.items() if k not in HEADER}
    scalars = {k: v for k, v in rest.items() if not isinstance(v, Mapping | list) or not v}
    if scalars:
        lines += [f"- {k}: {fmt(v, k)}" for k, v in scalars.items()] + [""]
    for key, value in rest.items():
        if key in scalars:
            continue
        if isinstance(value, Mapping):
            lines += _mapping(key, value)
        elif isinstance(value, list):
            if value and all(isinstance(v, Mapping) for v in value):
                lines += _mapping(key, {str(i + 1): v for i, v in enumerate(value)})
            else:
                lines += [f"- {key}: {', '.join(fmt(v, key) for v in value)}", ""]
    return lines


def host() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    parts = [platform.platform(), f"Python {platform.python_version()}", f"{os.cpu_count()} CPUs"]
    return " · ".join(parts + ([model] if model else []))


def render(records: Sequence[Mapping[str, Any]], generated: datetime, machine: str) -> str:
    lines = [
        "# Benchmark results",
        "",
        f"Generated {generated.isoformat(timespec='seconds')} on {machine}, from "
        f"{len(records)} result file(s) in bench/results/. Each scenario ran at its own time "
        "(below its name) on a shared, noisy machine: compare ratios measured in the same run, "
        "not absolute figures across scenarios.",
        "",
    ]
    if not records:
        lines += ["No results yet: run `make bench`.", ""]
    for record in records:
        lines += section(record)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.table", description=__doc__)
    parser.add_argument("--results", type=Path, default=RESULTS, help="directory of *.json")
    parser.add_argument("--output", type=Path, help=f"default: <results>/{OUTPUT}")
    args = parser.parse_args(argv)
    text = render(load(args.results), datetime.now(UTC), host())
    output = args.output or args.results / OUTPUT
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
