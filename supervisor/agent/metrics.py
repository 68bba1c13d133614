"""Prometheus metrics of the agent, read from its state at scrape time.

Every per-GPU series carries dcgm-exporter's labels — ``gpu``, ``UUID``, ``pci_bus_id``,
``device``, ``Hostname`` — so ``on(UUID) group_left`` joins with ``DCGM_FI_*`` series work
without ``label_replace``. dcgm-exporter's ``modelName`` is the one label we do not copy:
``promtool check metrics`` rejects camelCase label names, so the model is ``model_name`` on
``gpusupervisor_gpu_info`` only. XID codes, PIDs and pod names are never labels. Findings
are exported per GPU and fault class, pre-initialised to 0, and as NPD-style
``gpusupervisor_node_condition`` gauges.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric

from probes.observations import CLOCKS_EVENT_REASON_BITS
from supervisor.agent.conditions import evaluate
from supervisor.agent.role import Agent, GpuState
from supervisor.findings import (
    GPU_FAULT_CLASSES,
    NODE_FAULT_CLASSES,
    FaultClass,
    Severity,
)
from supervisor.metrics import P, build_info, finding_families, maybe

GPU_LABELS = ["gpu", "UUID", "pci_bus_id", "device", "Hostname"]
AGENT_FAULT_CLASSES = (*GPU_FAULT_CLASSES, *sorted(NODE_FAULT_CLASSES))


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
        yield build_info("agent")
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
            maybe(temp, lb, s.temperature_celsius)
            maybe(slow, lb, s.slowdown_celsius)
            maybe(shut, lb, s.shutdown_celsius)
            maybe(power, lb, s.power_watts)
            maybe(plimit, lb, s.power_limit_watts)
            maybe(energy, lb, s.energy_joules)
            maybe(ecc_vol, lb + ["corrected"], s.ecc_corrected_volatile)
            maybe(ecc_vol, lb + ["uncorrected"], s.ecc_uncorrected_volatile)
            maybe(ecc_agg, lb + ["corrected"], s.ecc_corrected_aggregate)
            maybe(ecc_agg, lb + ["uncorrected"], s.ecc_uncorrected_aggregate)
            maybe(retired, lb + ["single_bit_ecc"], s.retired_pages_sbe)
            maybe(retired, lb + ["double_bit_ecc"], s.retired_pages_dbe)
            maybe(retired_pending, lb, s.retired_pages_pending)
            maybe(remapped, lb + ["correctable"], s.remap_correctable)
            maybe(remapped, lb + ["uncorrectable"], s.remap_uncorrectable)
            maybe(remap_pending, lb, s.remap_pending)
            maybe(remap_failure, lb, s.remap_failure)
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
            maybe(pcie_gen, lb, s.pcie_generation)
            maybe(pcie_gen_max, lb, s.pcie_generation_max)
            maybe(pcie_w, lb, s.pcie_width)
            maybe(pcie_w_max, lb, s.pcie_width_max)
            maybe(replays, lb, s.pcie_replays)
        yield from (info, lost, temp, slow, shut, power, plimit, energy, ecc_vol, ecc_agg,
                    retired, retired_pending, remapped, remap_pending, remap_failure, throttle,
                    links, links_active, nvlink_err, pcie_gen, pcie_gen_max, pcie_w,
                    pcie_w_max, replays, misses, stuck, age, active)

        yield from finding_families(agent.book, AGENT_FAULT_CLASSES, "on this node")

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
