"""controller_growth's split of the controller's CPU into a fixed part and a part per
report: recovered from the sizes' figures, and absent where it cannot be fitted."""

from __future__ import annotations

from bench.controller_growth import cost_split


def size(reports_per_second: float, fixed_ms: float, per_report_us: float) -> dict[str, float]:
    cpu_ms = fixed_ms + per_report_us * reports_per_second / 1e3
    return {"reports_per_second": reports_per_second,
            "cpu_us_per_report": cpu_ms * 1e3 / reports_per_second}


def test_the_fixed_cost_and_the_cost_per_report_are_recovered() -> None:
    sizes = [size(rps, 40.0, 150.0) for rps in (100.0, 400.0, 1600.0)]
    assert cost_split(sizes) == {"fixed_cpu_ms_per_s": 40.0, "cpu_us_per_added_report": 150.0}


def test_one_size_or_one_rate_fits_nothing() -> None:
    assert cost_split([size(100.0, 40.0, 150.0)]) == {}
    assert cost_split([size(100.0, 40.0, 150.0), size(100.0, 40.0, 150.0)]) == {}
