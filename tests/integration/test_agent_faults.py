"""Every GPU fault class end to end: stand-in state → real pynvml → agent → /status, /metrics.

One agent process with 8 stand-in GPUs serves the whole module; each scenario uses its own
GPU, injects the fault through the stand-in's state directory while the agent runs, waits
for the finding, checks the metric series and the NodeCondition the agent would publish,
then restores the GPU and waits for the finding to clear.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from simulator.processes import AgentProcess, metric_value


@pytest.fixture(scope="module", name="agent")
def _agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    agent = AgentProcess(tmp_path_factory.mktemp("agent"), gpus=8)
    agent.start()
    try:
        yield agent
    finally:
        assert agent.stop() == 0, agent.log()[-3000:]


def finding_metric(agent: AgentProcess, gpu: int, fault_class: str) -> float | None:
    return metric_value(agent.metrics(), "gpusupervisor_gpu_finding_active", gpu=str(gpu),
                        fault_class=fault_class)


# (id, gpu, fault injection, fault class, condition type, condition reason)
STATE_FAULTS: list[tuple[str, int, dict[str, int], str, str, str]] = [
    ("uncorrectable-ecc", 0, {"ecc.uncorrected.volatile": 3, "ecc.uncorrected.aggregate": 3},
     "ecc_uncorrectable", "GPUMemoryError", "UncorrectableECCError"),
    ("retired-page-pending", 1, {"retired.pending": 1}, "retired_pages", "GPUMemoryError",
     "RetiredPagePending"),
    ("row-remap-failure", 2, {"remap.failure": 1}, "row_remap", "GPUMemoryError",
     "RowRemapFailure"),
    ("row-remap-pending", 3, {"remap.pending": 1}, "row_remap", "GPUMemoryError",
     "RowRemapPending"),
    ("thermal", 4, {"temp": 86}, "thermal", "GPUThermalSlowdown", "GPUTemperatureHigh"),
    ("hw-slowdown", 5, {"clocks_event_reasons": 0x8}, "clock_throttle", "GPUThermalSlowdown",
     "ClocksThrottled"),
    ("nvlink-down", 6, {"nvlink.3.active": 0}, "nvlink_down", "GPUNVLinkProblem", "NVLinkDown"),
    ("pcie-width", 0, {"pcie.width": 8}, "pcie_degraded", "GPUPCIeProblem",
     "PCIeLinkWidthDegraded"),
]


@pytest.mark.parametrize(("gpu", "inject", "fault_class", "ctype", "reason"),
                         [pytest.param(*f[1:], id=f[0]) for f in STATE_FAULTS])
def test_state_fault_raises_finding_metric_and_condition_then_clears(
        agent: AgentProcess, gpu: int, inject: dict[str, int], fault_class: str, ctype: str,
        reason: str) -> None:
    """Injecting the fault raises one finding with evidence, a metric and a True condition."""
    agent.control.update({f"gpu.{gpu}.{k}": v for k, v in inject.items()})
    finding = agent.wait_finding(fault_class, gpu)
    assert finding["reason"] == reason
    assert finding["subject"]["id"] == agent.status()["gpus"][gpu]["uuid"]
    assert finding["evidence"]
    cond = agent.status()["conditions"][ctype]
    assert cond["status"] is True and cond["reason"] == reason
    assert f"GPU {gpu}" in cond["message"]
    assert metric_value(agent.metrics(), "gpusupervisor_gpu_finding_active", gpu=str(gpu),
                        fault_class=fault_class) == 1
    assert metric_value(agent.metrics(), "gpusupervisor_node_condition", type=ctype) == 1

    agent.control.unset(*(f"gpu.{gpu}.{k}" for k in inject))  # back to the healthy defaults
    agent.wait_clear(fault_class, gpu)
    assert metric_value(agent.metrics(), "gpusupervisor_gpu_finding_active", gpu=str(gpu),
                        fault_class=fault_class) == 0


def test_correctable_ecc_storm(agent: AgentProcess) -> None:
    """Correctable ECC errors climbing faster than the storm rate raise a warning."""
    gpu = 7
    for count in range(0, 2000, 200):
        agent.control.update({f"gpu.{gpu}.ecc.corrected.volatile": count})
        agent.wait_for(lambda c=count: agent.status()["gpus"][gpu]["sample"]
                       ["ecc_corrected_volatile"] == c, what=f"ECC count {count}")
    finding = agent.wait_finding("ecc_correctable_storm", gpu)
    assert finding["severity"] == "warning"
    assert finding["evidence"]["per_minute"] >= 100
    assert agent.status()["conditions"]["GPUMemoryError"]["status"] is True
    assert finding_metric(agent, gpu, "ecc_correctable_storm") == 1


@pytest.mark.parametrize("per_link", [False, True], ids=["field-values", "per-link"])
def test_nvlink_error_storm(agent: AgentProcess, per_link: bool) -> None:
    """NVLink CRC counters growing past the per-second limit raise nvlink_errors — read as
    NVML's field values (one call for every link), or, where a driver has no field values,
    link by link."""
    gpu = 1 if not per_link else 2
    if per_link:
        agent.control.unsupported(gpu, ["nvmlDeviceGetFieldValues"])
    for step in range(1, 8):
        agent.control.update({f"gpu.{gpu}.nvlink.0.crc_flit": step * 1000})
        agent.wait_for(lambda s=step: agent.status()["gpus"][gpu]["sample"]["nvlink"]
                       ["crc_flit_errors"] == s * 1000, what="NVLink counter")
    finding = agent.wait_finding("nvlink_errors", gpu)
    assert finding["reason"] == "NVLinkErrorStorm"
    assert finding_metric(agent, gpu, "nvlink_errors") == 1
    assert agent.status()["conditions"]["GPUNVLinkProblem"]["status"] is True
    assert metric_value(agent.metrics(), "gpusupervisor_gpu_nvlink_errors_total", gpu=str(gpu),
                        counter="crc_flit") == 7000


def test_pcie_replay_storm(agent: AgentProcess) -> None:
    """The PCIe replay counter jumping raises pcie_replays with the rate as evidence."""
    gpu = 2
    agent.control.update({f"gpu.{gpu}.pcie.replay": 5000})
    finding = agent.wait_finding("pcie_replays", gpu)
    assert finding["reason"] == "PCIeReplayStorm"
    assert agent.status()["conditions"]["GPUPCIeProblem"]["status"] is True
    assert finding_metric(agent, gpu, "pcie_replays") == 1


def test_xid_79_is_critical_and_recommends_reboot(agent: AgentProcess) -> None:
    """XID 79 delivered through the NVML event set is a critical finding with its action."""
    agent.control.inject_xid(3, 79)
    finding = agent.wait_finding("xid", 3)
    assert finding["detail"] == "79"
    assert finding["severity"] == "critical"
    assert finding["action"] == "reboot_node"
    cond = agent.status()["conditions"]["GPUXidError"]
    assert cond["status"] is True and cond["reason"] == "XidCriticalDetected"
    assert finding_metric(agent, 3, "xid") == 1


def test_ten_thousand_identical_xids_are_one_finding(agent: AgentProcess) -> None:
    """A flood of 10,000 identical XIDs is one finding whose count reaches 10,000."""
    agent.control.inject_xid(4, 48, count=10_000)
    agent.wait_for(lambda: (f := agent.findings("xid", 4)) and f[0]["count"] == 10_000,
                   what="10,000 XID 48 counted")
    findings = [f for f in agent.findings("xid", 4) if f["detail"] == "48"]
    assert len(findings) == 1
    assert findings[0]["evidence"]["occurrences"] == 10_000
    assert metric_value(agent.metrics(), "gpusupervisor_findings_raised_total",
                        fault_class="xid", severity="critical") is not None


def test_ignored_xid_makes_no_finding(agent: AgentProcess) -> None:
    """A catalog 'ignore' XID is counted but raises nothing."""
    before = agent.status()["xid"]["ignored_total"]
    agent.control.inject_xid(5, 43)
    agent.wait_for(lambda: agent.status()["xid"]["ignored_total"] == before + 1,
                   what="ignored XID counted")
    assert not [f for f in agent.findings("xid", 5) if f["detail"] == "43"]


def test_unsupported_fields_are_not_faults(agent: AgentProcess) -> None:
    """A GPU without row remapping or NVLink shows those fields as null and no finding."""
    gpu = 6
    agent.control.unsupported(gpu, ["nvmlDeviceGetRemappedRows", "nvmlDeviceGetNvLinkState"])
    # NVLink is among the detailed fields, read every nvml.detail_every samples.
    agent.wait_for(lambda: (s := agent.status()["gpus"][gpu]["sample"])["remap_failure"] is None
                   and s["nvlink"] is None, what="remap and NVLink unsupported")
    assert not agent.findings("row_remap", gpu) and not agent.findings("nvlink_down", gpu)
    agent.control.unsupported(gpu, [])


def test_lost_gpu_is_reported_and_others_keep_answering(agent: AgentProcess) -> None:
    """A GPU that falls off the bus raises gpu_lost; the other GPUs keep being sampled."""
    gpu = 7
    agent.control.lose(gpu)
    finding = agent.wait_finding("gpu_lost", gpu)
    assert finding["severity"] == "critical" and finding["reason"] == "GPUFellOffBus"
    status = agent.status()
    assert status["gpus"][gpu]["lost"] is True
    assert status["conditions"]["GPULost"]["status"] is True
    assert finding_metric(agent, gpu, "gpu_lost") == 1
    assert metric_value(agent.metrics(), "gpusupervisor_gpu_lost", gpu=str(gpu)) == 1
    before = status["gpus"][0]["probe"]["samples"]
    agent.wait_for(lambda: agent.status()["gpus"][0]["probe"]["samples"] > before + 2,
                   what="GPU 0 still sampled")
    assert agent.get("/livez")[0] == 200


def test_status_lists_every_gpu_with_identity(agent: AgentProcess, tmp_path: Path) -> None:
    """/status names the node and every GPU with index, UUID, PCI bus id and name."""
    status = agent.status()
    assert status["node"] == "node-under-test"
    assert [g["index"] for g in status["gpus"]] == list(range(8))
    for gpu in status["gpus"]:
        assert gpu["uuid"].startswith("GPU-")
        assert gpu["pci_bus_id"].startswith("00000000:")
        assert gpu["name"] == "NVIDIA H100 80GB HBM3"
    assert status["probe"]["rounds_completed"] > 0
    assert status["driver"]["driver_version"]
