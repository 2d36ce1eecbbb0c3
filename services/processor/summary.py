"""Per-field statistics of a list of records: pure CPU work, run in a worker process.

For every field seen in any record: how many records have a value, how many lack one (missing or
null), and by kind — numbers: min/max/mean; strings: distinct count. Booleans count as their own
kind, never as numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from contracts.events import FieldKind, FieldSummary, Scalar


def finite_mean(numbers: Sequence[float]) -> float:
    """The mean of finite numbers (not empty), exactly rounded, finite even where their sum is
    not (`[1e308, 1e308]`): the mean lies between the smallest and the largest."""
    try:
        return math.fsum(numbers) / len(numbers)
    except OverflowError:  # the sum left the doubles' range: sum them scaled down
        count = len(numbers)
        # By a power of two, exactly, and enough that `count` of the largest double fit (the
        # shares `n / count`, each rounded, could still sum past it: three of the largest
        # raised OverflowError, retried as transient). Kept within the numbers' range, which
        # a rounding at the edge could leave by an ulp.
        scale = 2.0 ** -count.bit_length()
        mean = math.fsum(n * scale for n in numbers) / count / scale
        return min(max(mean, min(numbers)), max(numbers))


@dataclass
class _Accumulator:
    count: int = 0
    numbers: list[float] = field(default_factory=list)
    low: float = math.inf
    high: float = -math.inf
    strings: set[str] = field(default_factory=set)
    string_count: int = 0
    booleans: int = 0

    def add(self, value: Scalar) -> None:
        if value is None:
            return
        self.count += 1
        if isinstance(value, bool):
            self.booleans += 1
        elif isinstance(value, int | float):
            self.numbers.append(value)
            self.low = min(self.low, value)
            self.high = max(self.high, value)
        else:
            self.string_count += 1
            self.strings.add(value)

    def kind(self) -> FieldKind:
        kinds = [n for n in (len(self.numbers), self.string_count, self.booleans) if n]
        if not kinds:
            return "null"
        if len(kinds) > 1:
            return "mixed"
        if self.numbers:
            return "number"
        return "string" if self.string_count else "boolean"

    def summary(self, records: int) -> FieldSummary:
        has_numbers = bool(self.numbers)
        return FieldSummary(
            kind=self.kind(),
            count=self.count,
            nulls=records - self.count,
            min=float(self.low) if has_numbers else None,
            max=float(self.high) if has_numbers else None,
            mean=finite_mean(self.numbers) if has_numbers else None,
            distinct=len(self.strings) if self.string_count else None,
        )


def summarise(records: Sequence[Mapping[str, Scalar]]) -> dict[str, FieldSummary]:
    accumulators: dict[str, _Accumulator] = {}
    for record in records:
        for name, value in record.items():
            accumulators.setdefault(name, _Accumulator()).add(value)
    return {name: acc.summary(len(records)) for name, acc in accumulators.items()}
