"""Metrics every role shares: naming, the per-daemon registry, build information.

Naming follows Prometheus practice (prefix ``gpusupervisor_``, base units, ``_total`` for
counters, bounded labels). Each role's collector lives with the role
(``supervisor/<role>/metrics.py``) and yields fresh families on every scrape
(client_python's custom-collector pattern), so a GPU, peer or finding that disappears
leaves no stale series behind.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from supervisor import __version__
from supervisor.findings import FaultClass, FindingBook, Severity

P = "gpusupervisor_"


def build_info(role: str) -> InfoMetricFamily:
    family = InfoMetricFamily(f"{P}build", "Build information")
    family.add_metric([], {"version": __version__, "role": role})
    return family


def new_registry() -> CollectorRegistry:
    """A registry per daemon (not the global one), with process and runtime metrics."""
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def maybe(family: GaugeMetricFamily | CounterMetricFamily, labels: list[str],
          value: float | int | bool | None) -> None:
    """Add a sample unless the value is unknown (no series beats a fake 0)."""
    if value is not None:
        family.add_metric(labels, float(value))


def finding_families(book: FindingBook, classes: Iterable[FaultClass], where: str
                     ) -> Iterator[Metric]:
    """Active findings by class and severity (every class this role can raise, at 0 when
    none is active), and findings raised since start."""
    findings = GaugeMetricFamily(f"{P}findings", f"Active findings {where}",
                                 labels=["fault_class", "severity"])
    counts: dict[tuple[str, str], int] = {}
    for f in book.active():
        bucket = (str(f.fault_class), str(f.severity))
        counts[bucket] = counts.get(bucket, 0) + 1
    for fc in classes:
        for sev in Severity:
            findings.add_metric([str(fc), str(sev)], counts.get((str(fc), str(sev)), 0))
    yield findings
    raised = CounterMetricFamily(f"{P}findings_raised", "Findings raised since start",
                                 labels=["fault_class", "severity"])
    for (fc, sev), n in sorted(book.raised_total.items()):
        raised.add_metric([str(fc), str(sev)], n)
    yield raised


class Buckets:
    """A histogram kept by its owner and read at scrape time (the custom-collector pattern
    every role uses): cumulative counts, never reset, so rates over it are right."""

    __slots__ = ("_bounds", "_counts", "count", "sum")

    def __init__(self, bounds: Iterable[float]) -> None:
        self._bounds = sorted(bounds)
        self._counts = [0] * (len(self._bounds) + 1)  # the last one: above every bound
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self._counts[bisect.bisect_left(self._bounds, value)] += 1
        self.count += 1
        self.sum += value

    def add_to(self, family: HistogramMetricFamily, labels: list[str]) -> None:
        cumulative, out = 0, []
        for bound, n in zip([*self._bounds, float("inf")], self._counts, strict=True):
            cumulative += n
            out.append((_le(bound), cumulative))
        family.add_metric(labels, out, self.sum)


def _le(bound: float) -> str:
    """A bucket bound as client_python writes it ("0.5", "1.0", "+Inf")."""
    return "+Inf" if bound == float("inf") else repr(float(bound))
