"""Metrics every role shares: naming, the per-daemon registry, build information.

Naming follows Prometheus practice (prefix ``gpusupervisor_``, base units, ``_total`` for
counters, bounded labels). Each role's collector lives with the role
(``supervisor/<role>/metrics.py``) and yields fresh families on every scrape
(client_python's custom-collector pattern), so a GPU, peer or finding that disappears
leaves no stale series behind.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
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
