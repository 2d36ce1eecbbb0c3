"""How result reports are cut: a bounded count of results and a bounded size each."""

from __future__ import annotations

from contracts.events import MAX_RESULTS
from services.messaging.results import MAX_REPORT_BYTES, _chunks


def test_a_report_holds_at_most_max_results() -> None:
    bodies = [b"{}"] * (MAX_RESULTS + 1)
    assert [len(chunk) for chunk in _chunks(bodies)] == [MAX_RESULTS, 1]


def test_a_report_ends_before_it_would_pass_the_size_bound() -> None:
    half = b"x" * (MAX_REPORT_BYTES // 2)
    assert list(_chunks([half, half, b"y", half])) == [[half, half], [b"y", half]]


def test_a_result_larger_than_the_bound_goes_alone_and_in_order() -> None:
    big = b"b" * (MAX_REPORT_BYTES + 1)
    assert list(_chunks([b"1", big, b"2"])) == [[b"1"], [big], [b"2"]]
