"""Prometheus metrics of the agent, read from its state at scrape time.

Naming follows Prometheus practice (prefix ``gpusupervisor_``, base units, ``_total`` for
counters, bounded labels). Every per-GPU series carries dcgm-exporter's labels — ``gpu``,
``UUID``, ``pci_bus_id``, ``device``, ``Hostname`` — so ``on(UUID) group_left`` joins with
``DCGM_FI_*`` series work without ``label_replace``. dcgm-exporter's ``modelName`` is the
one label we do not copy: ``promtool check metrics`` rejects camelCase label names, so the
model is ``model_name`` on ``gpusupervisor_gpu_info`` only. XID codes, PIDs and pod names
are never labels.

The collector yields fresh families on every scrape (client_python's custom-collector
pattern), so a GPU that disappears or a finding that clears leaves no stale series behind.
Findings are exported per GPU and fault class, pre-initialised to 0, and as NPD-style
``gpusupervisor_node_condition`` gauges.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from probes.observations import CLOCKS_EVENT_REASON_BITS
from supervisor import __version__
from supervisor.conditions import evaluate
from supervisor.findings import NODE_FAULT_CLASSES, FaultClass, Severity
from supervisor.roles.agent import Agent, GpuState

if TYPE_CHECKING:
    from supervisor.roles.controller import Controller

GPU_LABELS = ["gpu", "UUID", "pci_bus_id", "device", "Hostname"]
GPU_FAULT_CLASSES = [fc for fc in FaultClass if fc not in NODE_FAULT_CLASSES]
P = "gpusupervisor_"


def _build_info(role: str) -> InfoMetricFamily:
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


class ProbeHistograms:
    """Probe timings, recorded as they happen (the only non-scrape-time metrics).

    Implements the agent's ``ProbeObserver`` protocol.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        buckets = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
        self.sample = Histogram(f"{P}probe_duration_seconds",
                                "Time one probe call took, by probe family",
                                ["probe"], buckets=buckets, registry=registry)
        self.round = Histogram(f"{P}probe_round_duration_seconds",
                               "Time from a probe tick until every GPU answered or was skipped",
                               buckets=buckets, registry=registry)

    def sample_done(self, seconds: float) -> None:
        self.sample.labels("nvml_sample").observe(seconds)

    def round_done(self, seconds: float) -> None:
        self.round.observe(seconds)


class AgentCollector:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def describe(self) -> Iterable[Metric]:
        return []  # families are dynamic; describing them would freeze the label sets

    def _labels(self, gpu: GpuState) -> list[str]:
        ident = gpu.identity
        return [str(ident.index), ident.uuid, ident.pci_bus_id, ident.device, self.agent.node]

    def collect(self) -> Iterator[Metric]:
        agent = self.agent
        yield _build_info("agent")
        if agent.driver is not None:
            driver = InfoMetricFamily(f"{P}nvml_driver", "NVIDIA driver seen through NVML")
            driver.add_metric([], {"driver_version": agent.driver.driver_version,
                                   "nvml_version": agent.driver.nvml_version})
            yield driver

        def gauge(name: str, doc: str, extra: list[str] | None = None) -> GaugeMetricFamily:
            return GaugeMetricFamily(P + name, doc, labels=GPU_LABELS + (extra or []))

        def counter(name: str, doc: str, extra: list[str] | None = None) -> CounterMetricFamily:
            return CounterMetricFamily(P + name, doc, labels=GPU_LABELS + (extra or []))

        info = gauge("gpu_info", "Always 1 per GPU; carries DCGM-joinable labels",
                     ["model_name"])
        lost = gauge("gpu_lost", "1 when NVML reports the GPU lost (fallen off the bus)")
        temp = gauge("gpu_temperature_celsius", "GPU core temperature")
        slow = gauge("gpu_slowdown_temperature_celsius", "The GPU's own slowdown threshold")
        shut = gauge("gpu_shutdown_temperature_celsius", "The GPU's own shutdown threshold")
        power = gauge("gpu_power_watts", "Current board power draw")
        plimit = gauge("gpu_power_limit_watts", "Enforced power limit")
        energy = counter("gpu_energy_joules", "Energy consumed since driver load")
        ecc_vol = counter("gpu_ecc_volatile_errors",
                          "ECC errors since driver load", ["error_type"])
        ecc_agg = counter("gpu_ecc_aggregate_errors",
                          "ECC errors over the GPU's lifetime", ["error_type"])
        retired = gauge("gpu_retired_pages", "Retired framebuffer pages", ["cause"])
        retired_pending = gauge("gpu_retired_pages_pending",
                                "1 when a page retirement waits for a GPU reset")
        remapped = gauge("gpu_remapped_rows", "Remapped memory rows", ["error_type"])
        remap_pending = gauge("gpu_row_remap_pending", "1 when a row remap waits for a reset")
        remap_failure = gauge("gpu_row_remap_failure", "1 when row remapping has failed")
        throttle = gauge("gpu_clocks_event_reason_active",
                         "1 while this clock event (throttle) reason is active", ["reason"])
        links = gauge("gpu_nvlink_links", "NVLinks present")
        links_active = gauge("gpu_nvlink_links_active", "NVLinks up")
        nvlink_err = counter("gpu_nvlink_errors", "NVLink error counters summed over links",
                             ["counter"])
        pcie_gen = gauge("gpu_pcie_link_generation", "Current PCIe link generation")
        pcie_gen_max = gauge("gpu_pcie_link_generation_max", "Rated PCIe link generation")
        pcie_w = gauge("gpu_pcie_link_width", "Current PCIe link width (lanes)")
        pcie_w_max = gauge("gpu_pcie_link_width_max", "Rated PCIe link width (lanes)")
        replays = counter("gpu_pcie_replays", "PCIe replay counter")
        misses = counter("probe_deadline_misses", "NVML samples that missed their deadline")
        stuck = gauge("probe_stuck", "1 while an NVML call on this GPU has not returned")
        age = gauge("gpu_last_sample_timestamp_seconds",
                    "Wall-clock time of the last completed NVML sample")
        active = gauge("gpu_finding_active",
                       "1 while a finding of this fault class is active on the GPU",
                       ["fault_class"])

        active_by_gpu: dict[tuple[str, FaultClass], Severity] = {}
        for finding in agent.book.active():
            if finding.subject.kind == "gpu":
                k = (finding.subject.id, finding.fault_class)
                prev = active_by_gpu.get(k)
                if prev is None or finding.severity.rank > prev.rank:
                    active_by_gpu[k] = finding.severity

        for gpu in agent.gpus.values():
            lb = self._labels(gpu)
            info.add_metric(lb + [gpu.identity.name], 1)
            s = gpu.last_sample
            lost.add_metric(lb, 1 if s is not None and s.lost else 0)
            misses.add_metric(lb, gpu.deadline_misses)
            stuck.add_metric(lb, 0 if gpu.stuck_since is None else 1)
            if gpu.last_sample_wall is not None:
                age.add_metric(lb, gpu.last_sample_wall)
            for fc in GPU_FAULT_CLASSES:
                sev = active_by_gpu.get((gpu.identity.uuid, fc))
                active.add_metric(lb + [str(fc)], 0 if sev is None else 1)
            if s is None or s.lost:
                continue
            _maybe(temp, lb, s.temperature_celsius)
            _maybe(slow, lb, s.slowdown_celsius)
            _maybe(shut, lb, s.shutdown_celsius)
            _maybe(power, lb, s.power_watts)
            _maybe(plimit, lb, s.power_limit_watts)
            _maybe(energy, lb, s.energy_joules)
            _maybe(ecc_vol, lb + ["corrected"], s.ecc_corrected_volatile)
            _maybe(ecc_vol, lb + ["uncorrected"], s.ecc_uncorrected_volatile)
            _maybe(ecc_agg, lb + ["corrected"], s.ecc_corrected_aggregate)
            _maybe(ecc_agg, lb + ["uncorrected"], s.ecc_uncorrected_aggregate)
            _maybe(retired, lb + ["single_bit_ecc"], s.retired_pages_sbe)
            _maybe(retired, lb + ["double_bit_ecc"], s.retired_pages_dbe)
            _maybe(retired_pending, lb, s.retired_pages_pending)
            _maybe(remapped, lb + ["correctable"], s.remap_correctable)
            _maybe(remapped, lb + ["uncorrectable"], s.remap_uncorrectable)
            _maybe(remap_pending, lb, s.remap_pending)
            _maybe(remap_failure, lb, s.remap_failure)
            if s.clocks_event_reasons is not None:
                for name, bit in CLOCKS_EVENT_REASON_BITS.items():
                    throttle.add_metric(lb + [name], 1 if s.clocks_event_reasons & bit else 0)
            if s.nvlink is not None:
                links.add_metric(lb, s.nvlink.links)
                links_active.add_metric(lb, s.nvlink.active)
                for name, value in (("replay", s.nvlink.replay_errors),
                                    ("recovery", s.nvlink.recovery_errors),
                                    ("crc_flit", s.nvlink.crc_flit_errors),
                                    ("crc_data", s.nvlink.crc_data_errors)):
                    nvlink_err.add_metric(lb + [name], value)
            _maybe(pcie_gen, lb, s.pcie_generation)
            _maybe(pcie_gen_max, lb, s.pcie_generation_max)
            _maybe(pcie_w, lb, s.pcie_width)
            _maybe(pcie_w_max, lb, s.pcie_width_max)
            _maybe(replays, lb, s.pcie_replays)
        yield from (info, lost, temp, slow, shut, power, plimit, energy, ecc_vol, ecc_agg,
                    retired, retired_pending, remapped, remap_pending, remap_failure, throttle,
                    links, links_active, nvlink_err, pcie_gen, pcie_gen_max, pcie_w,
                    pcie_w_max, replays, misses, stuck, age, active)

        findings = GaugeMetricFamily(f"{P}findings", "Active findings on this node",
                                     labels=["fault_class", "severity"])
        counts: dict[tuple[str, str], int] = {}
        for f in agent.book.active():
            bucket = (str(f.fault_class), str(f.severity))
            counts[bucket] = counts.get(bucket, 0) + 1
        for fc in FaultClass:
            for sev in Severity:
                findings.add_metric([str(fc), str(sev)], counts.get((str(fc), str(sev)), 0))
        yield findings

        raised = CounterMetricFamily(f"{P}findings_raised", "Findings raised since start",
                                     labels=["fault_class", "severity"])
        for (fc, sev), n in sorted(agent.book.raised_total.items()):
            raised.add_metric([str(fc), str(sev)], n)
        yield raised

        cond = GaugeMetricFamily(f"{P}node_condition",
                                 "1 while our NodeCondition of this type is True (a problem)",
                                 labels=["type", "reason"])
        for ctype, c in evaluate(agent.book.active()).items():
            cond.add_metric([ctype, c.reason], 1 if c.status else 0)
        yield cond

        if agent.xid is not None:
            xids = CounterMetricFamily(f"{P}xid_events", "XID events received from NVML",
                                       labels=["outcome"])
            xids.add_metric(["finding"], agent.xid.events_total - agent.xid.ignored_total)
            xids.add_metric(["ignored"], agent.xid.ignored_total)
            yield xids


def _maybe(family: GaugeMetricFamily | CounterMetricFamily, labels: list[str],
           value: float | int | bool | None) -> None:
    """Add a sample unless the field is unsupported on this GPU (no series beats a fake 0)."""
    if value is not None:
        family.add_metric(labels, float(value))


class ControllerCollector:
    """Controller state at scrape time: leadership, guards, reports, actions, capacity."""

    def __init__(self, controller: Controller) -> None:
        self.c = controller

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        c = self.c
        yield _build_info("controller")

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(P + name, doc, value=value)

        yield gauge("controller_leader", "1 while this replica holds the Lease and may act",
                    1 if c.may_act() else 0)
        yield gauge("controller_suspect", "1 while the quorum guard stops this leader acting",
                    1 if c.suspect else 0)
        yield gauge("policy_breaker_open", "1 while the circuit breaker stops all actions",
                    1 if c.engine.breaker_open else 0)
        yield gauge("policy_reload_failed", "1 while the policy file on disk is invalid "
                    "(the last good policy stays in force)", 1 if c.policy_error else 0)
        yield gauge("incidents_open", "Open incidents", len(c.engine.incidents()))
        yield gauge("nodes_reporting", "Nodes whose agent has reported",
                    sum(1 for n in c.model.nodes.values() if n.last_report is not None))
        yield gauge("nodes_silent", "Nodes whose agent stopped reporting",
                    len(c.model.silent_nodes()))
        reports = CounterMetricFamily(f"{P}reports", "Reports received, by outcome",
                                      labels=["outcome"])
        for outcome in ("accepted", "unauthenticated", "forbidden", "malformed", "invalid",
                        "too_large", "bad_content_type", "auth_unavailable", "throttled",
                        "stale", "skewed"):
            reports.add_metric([outcome], c.ingest.outcomes.get(outcome, 0))
        yield reports
        reviews = CounterMetricFamily(f"{P}token_reviews", "TokenReviews of report tokens "
                                      "not in the cache, by outcome", labels=["outcome"])
        reviews.add_metric(["reviewed"], c.tokens.reviews)
        reviews.add_metric(["not_plausible"], c.tokens.prefiltered)
        reviews.add_metric(["throttled"], c.tokens.throttled)
        yield reviews
        actions = CounterMetricFamily(f"{P}actions", "Actions carried out, by outcome",
                                      labels=["action", "outcome"])
        for (action, outcome), n in sorted(c.executor.outcomes.items()):
            actions.add_metric([action, outcome], n)
        yield actions
        view = c.model.view()
        healthy = GaugeMetricFamily(f"{P}model_healthy_groups",
                                    "Pipeline groups of a model that can serve now",
                                    labels=["model"])
        total = GaugeMetricFamily(f"{P}model_groups", "Pipeline groups of a model",
                                  labels=["model"])
        counts: dict[str, list[int]] = {}
        for g in view.groups.values():
            bucket = counts.setdefault(g.model, [0, 0])
            bucket[0] += 1 if g.healthy else 0
            bucket[1] += 1
        for model, (ok, n) in sorted(counts.items()):
            healthy.add_metric([model], ok)
            total.add_metric([model], n)
        yield healthy
        yield total
        lat = SummaryMetricFamily(f"{P}decision_latency_seconds",
                                  "Report received → first API request of the action",
                                  count_value=len(c.executor.latencies),
                                  sum_value=sum(c.executor.latencies))
        yield lat
