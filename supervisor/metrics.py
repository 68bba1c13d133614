"""Metrics every role shares: naming, the per-daemon registry, build information.

Naming follows Prometheus practice (prefix ``gpusupervisor_``, base units, ``_total`` for
counters, bounded labels). Each role's collector lives with the role
(``supervisor/<role>/metrics.py``) and yields fresh families on every scrape
(client_python's custom-collector pattern), so a GPU, peer or finding that disappears
leaves no stale series behind.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from supervisor import __version__

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
