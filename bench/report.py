"""Printing and saving benchmark figures: medians, spread, and a JSON record per scenario."""

from __future__ import annotations

import json
import os
import platform
import statistics
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Result:
    name: str
    unit: str
    median: float
    samples: list[float]

    @property
    def spread(self) -> float:
        """Half the range, relative to the median: a rough noise figure."""
        if len(self.samples) < 2 or not self.median:
            return 0.0
        return (max(self.samples) - min(self.samples)) / 2 / self.median


def print_table(title: str, results: list[Result]) -> None:
    print(f"\n{title}")
    width = max(len(r.name) for r in results)
    for r in results:
        figures = f"{r.median:>10.1f} {r.unit:<8} ±{r.spread:5.1%}  n={len(r.samples)}"
        print(f"  {r.name:<{width}}  {figures}")


def save(scenario: str, results: list[Result], extra: dict[str, Any]) -> Path:
    """Write the scenario's record; a run on a broker of its own (`bench.private_broker`,
    `BENCH_BROKER`) is saved beside the usual one, not over it."""
    RESULTS.mkdir(exist_ok=True)
    broker = os.environ.get("BENCH_BROKER")
    if broker:
        scenario = f"{scenario}_{broker}"
    path = RESULTS / f"{scenario}.json"
    record = {
        "scenario": scenario,
        "at": datetime.now(UTC).isoformat(),
        "machine": {"python": platform.python_version(), "cpus": _cpus()},
        "broker": broker or "the node at AMQP_URL",
        "results": [asdict(r) | {"spread": r.spread} for r in results],
        **extra,
    }
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def _cpus() -> int:
    return os.cpu_count() or 0


def median(values: list[float]) -> float:
    return statistics.median(values)
