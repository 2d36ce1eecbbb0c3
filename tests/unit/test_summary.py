"""Dataset summaries: per-field counts, nulls, numeric stats and distinct strings."""

from __future__ import annotations

import sys

import pytest

from services.processor.summary import finite_mean, summarise


def test_numbers_get_min_max_mean() -> None:
    fields = summarise([{"x": 1}, {"x": 2.5}, {"x": -3}])
    assert fields["x"].kind == "number"
    assert (fields["x"].min, fields["x"].max) == (-3.0, 2.5)
    assert fields["x"].mean == pytest.approx(0.1666666, rel=1e-5)
    assert fields["x"].distinct is None


def test_strings_get_a_distinct_count() -> None:
    fields = summarise([{"s": "a"}, {"s": "b"}, {"s": "a"}])
    assert fields["s"].kind == "string"
    assert fields["s"].distinct == 2 and fields["s"].count == 3 and fields["s"].mean is None


def test_missing_and_null_values_count_as_nulls() -> None:
    fields = summarise([{"a": 1, "b": None}, {"a": None}, {}])
    assert (fields["a"].count, fields["a"].nulls) == (1, 2)
    assert fields["b"].kind == "null" and fields["b"].nulls == 3


def test_booleans_are_not_numbers() -> None:
    fields = summarise([{"f": True}, {"f": False}])
    assert fields["f"].kind == "boolean" and fields["f"].mean is None


def test_mixed_kinds_are_reported_as_mixed() -> None:
    fields = summarise([{"m": 1}, {"m": "one"}])
    assert fields["m"].kind == "mixed"
    assert fields["m"].min == 1.0 and fields["m"].distinct == 1


def test_a_mean_is_given_where_the_sum_of_the_numbers_overflows() -> None:
    fields = summarise([{"big": 1e308}, {"big": 1e308}, {"big": 7e307}])
    assert fields["big"].mean == pytest.approx(9e307)


@pytest.mark.parametrize("count", [2, 3, 6, 7, 9, 12, 100, 1001])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_a_mean_of_the_largest_doubles_is_that_double(count: int, sign: float) -> None:
    # Summing their shares (each `n / count`, rounded) went past the largest double for three
    # of them: an OverflowError, retried as transient until the event was dead-lettered.
    largest = sign * sys.float_info.max
    assert finite_mean([largest] * count) == largest
    assert summarise([{"x": largest}] * count)["x"].mean == largest


def test_a_mean_past_overflow_stays_between_the_numbers() -> None:
    numbers = [sys.float_info.max, sys.float_info.max, 1.7e308, 1e308, -1e308, 5.0]
    mean = finite_mean(numbers)
    assert min(numbers) <= mean <= max(numbers)
    assert mean == pytest.approx(sum(n / len(numbers) for n in numbers))


def test_a_mean_is_exactly_rounded() -> None:
    # A running sum gives 0.0 here: 1e16 + 1 is 1e16 in doubles.
    fields = summarise([{"x": 1e16}, {"x": 1.0}, {"x": -1e16}, {"x": 1.0}])
    assert fields["x"].mean == 0.5
