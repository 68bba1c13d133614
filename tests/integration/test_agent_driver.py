"""A node whose driver is down, or whose GPUs NVML cannot all open, is *reported* — the
agent stays up, publishes and reports it — instead of crash-looping unseen.

Real agent processes on the NVML stand-in: ``init_error`` makes ``nvmlInit`` fail as on a
host whose driver is not loaded; ``gpu.N.handle_error`` makes one GPU impossible to open.
"""

from __future__ import annotations

import json
from pathlib import Path

from simulator.processes import AgentProcess, metric_value
from tests.integration.test_agent_reporting import ControllerStub

NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_UNKNOWN = 999


def node_findings(agent: AgentProcess, fault_class: str) -> list[dict[str, object]]:
    return [f for f in agent.status()["findings"] if f["fault_class"] == fault_class]


def test_driver_down_is_reported_and_recovery_is_picked_up(tmp_path: Path) -> None:
    """NVML init fails: the agent serves /livez and /readyz, reports a critical
    driver_error (also to the controller) and keeps retrying; once the driver answers the
    finding clears and every GPU is probed."""
    stub = ControllerStub()
    token = tmp_path / "token"
    token.write_text("t")
    agent = AgentProcess(tmp_path, gpus=4, settings={
        "nvml": {"init_retry_max_seconds": 1.0},
        "reporting": {"controller_url": f"http://127.0.0.1:{stub.port}",
                      "token_file": str(token), "heartbeat_seconds": 30.0}})
    agent.control.update({"init_error": NVML_ERROR_DRIVER_NOT_LOADED})
    try:
        agent.start()
        assert agent.get("/livez")[0] == 200
        (finding,) = agent.wait_for(lambda: node_findings(agent, "driver_error"),
                                    what="driver_error")
        assert finding["severity"] == "critical"
        assert "NVML" in str(finding["message"])
        assert agent.status()["driver"]["state"] == "down"
        assert agent.status()["conditions"]["GPUDriverProblem"]["status"] is True
        agent.wait_for(lambda: any(f["fault_class"] == "driver_error"
                                   for _, r in stub.reports for f in r["findings"]),
                       what="driver_error reported to the controller")
        agent.wait_for(lambda: agent.status()["driver"]["init_attempts"] >= 2,
                       what="another init attempt")  # it keeps trying

        agent.control.update({"init_error": 0})
        agent.wait_for(lambda: not node_findings(agent, "driver_error"), timeout=10,
                       what="driver_error cleared")
        agent.wait_for(lambda: len(agent.status()["gpus"]) == 4, what="GPUs probed")
        agent.wait_for(lambda: agent.status()["gpus"][3]["probe"]["samples"] > 0,
                       what="samples")
        assert agent.status()["driver"]["state"] == "up"
    finally:
        assert agent.stop() == 0, agent.log()[-3000:]
        stub.close()


def test_a_gpu_nvml_cannot_open_is_missing_and_the_rest_are_probed(tmp_path: Path) -> None:
    """GetHandleByIndex fails for GPU 2: the agent probes the other three and raises a
    critical gpu_missing naming GPU 2."""
    agent = AgentProcess(tmp_path, gpus=4)
    agent.control.update({"gpu.2.handle_error": NVML_ERROR_UNKNOWN})
    try:
        agent.start()
        (finding,) = agent.wait_for(lambda: node_findings(agent, "gpu_missing"),
                                    what="gpu_missing")
        assert finding["severity"] == "critical"
        assert "GPU 2: cannot get a handle" in str(finding["message"])
        assert [g["index"] for g in agent.status()["gpus"]] == [0, 1, 3]
        assert metric_value(agent.metrics(), "gpusupervisor_findings",
                            fault_class="gpu_missing", severity="critical") == 1.0
    finally:
        assert agent.stop() == 0, agent.log()[-3000:]


def test_fewer_gpus_than_expected_is_critical(tmp_path: Path) -> None:
    """nvml.expected_gpus 8 on a node where NVML counts 7: "7 of 8 GPUs visible"."""
    agent = AgentProcess(tmp_path, gpus=7, settings={"nvml": {"expected_gpus": 8}})
    try:
        agent.start()
        (finding,) = agent.wait_for(lambda: node_findings(agent, "gpu_missing"),
                                    what="gpu_missing")
        assert str(finding["message"]).startswith("7 of 8 GPUs visible")
        report = json.loads(agent.get("/status")[1])
        assert report["conditions"]["GPUMissing"]["status"] is True
    finally:
        assert agent.stop() == 0
