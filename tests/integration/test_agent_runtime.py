"""The agent survives the faults it watches: a wedged NVML call, SIGTERM, a bad config."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

from simulator.processes import AgentProcess, metric_value


def test_nvml_call_hanging_30s_is_a_finding_and_livez_keeps_answering(tmp_path: Path) -> None:
    """GPU 3's NVML hangs 30 s: gpu_unresponsive is raised, /livez and GPU 0 keep going."""
    agent = AgentProcess(tmp_path, gpus=4).start()
    try:
        agent.control.hang(3, 30.0)
        hung_at = time.monotonic()
        finding = agent.wait_finding("gpu_unresponsive", 3, timeout=10)
        assert finding["reason"] == "NVMLCallTimedOut"
        assert "probe stuck" in finding["message"]
        assert agent.status()["conditions"]["GPUUnresponsive"]["status"] is True
        assert metric_value(agent.metrics(), "gpusupervisor_probe_stuck", gpu="3") == 1
        assert metric_value(agent.metrics(), "gpusupervisor_gpu_finding_active", gpu="3",
                            fault_class="gpu_unresponsive") == 1
        samples_before = agent.status()["gpus"][0]["probe"]["samples"]
        livez_answers = 0
        # Keep asking for the whole hang: the daemon must never be wedged by it.
        while time.monotonic() - hung_at < 28:
            code, body = agent.get("/livez", timeout=2)
            assert code == 200, body
            livez_answers += 1
            time.sleep(0.25)
        assert livez_answers > 50
        status = agent.status()
        assert status["gpus"][0]["probe"]["samples"] > samples_before + 50
        assert status["gpus"][3]["probe"]["stuck_seconds"] > 20
        # The hang ends by itself after 30 s; the GPU answers again and the finding clears.
        agent.control.clear_hang(3)
        agent.wait_clear("gpu_unresponsive", 3, timeout=20)
    finally:
        assert agent.stop() == 0


def test_sigterm_stops_promptly_even_with_a_wedged_nvml_call(tmp_path: Path) -> None:
    """A stuck NVML thread does not hold the process: SIGTERM exits 0 within the grace."""
    agent = AgentProcess(tmp_path, gpus=2).start()
    agent.control.hang(1, 60.0)
    agent.wait_finding("gpu_unresponsive", 1, timeout=10)
    started = time.monotonic()
    code = agent.stop(timeout=20)
    assert code == 0
    assert time.monotonic() - started < 15
    events = [json.loads(line)["event"] for line in agent.log().splitlines()
              if line.startswith("{")]
    assert "stopped" in events


def test_bad_config_exits_2_without_starting(tmp_path: Path) -> None:
    """A config with an invalid field exits 2, names it, and never opens its port."""
    config = tmp_path / "bad.yaml"
    config.write_text("nvml:\n  probe_interval_seconds: 0\n")
    proc = subprocess.run(
        ["python", "-m", "supervisor", "agent", "--config", str(config), "--simulate-gpus", "2",
         "--listen", "127.0.0.1:0"], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert "nvml.probe_interval_seconds: must be greater than 0" in proc.stderr
    assert "http listening" not in proc.stderr


def test_metrics_pass_promtool(tmp_path: Path) -> None:
    """`promtool check metrics` finds no problem in a scrape with faults present."""
    agent = AgentProcess(tmp_path, gpus=8).start()
    try:
        agent.control.inject_xid(2, 79)
        agent.control.update({"gpu.1.temp": 90})
        agent.wait_finding("xid", 2)
        agent.wait_finding("thermal", 1)
        text = agent.metrics()
    finally:
        agent.stop()
    for name in ("gpusupervisor_build_info", "gpusupervisor_gpu_temperature_celsius",
                 "gpusupervisor_probe_duration_seconds_bucket", "gpusupervisor_findings",
                 "gpusupervisor_gpu_energy_joules_total", "process_resident_memory_bytes"):
        assert name in text, name
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                           text=True, timeout=60, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.strip() == "" and check.stderr.strip() == ""
    # Every series the agent's alert rules use exists in a real scrape (no silently dead
    # alerts; the controller's and sidecars' are checked with theirs in test_dashboard).
    rules = (Path(__file__).parents[2] / "deploy/prometheus/gpu-supervisor.rules.yaml")
    used = set(re.findall(r'(gpusupervisor_[a-z_]+)\{job="gpu-supervisor-agent"',
                          rules.read_text()))
    assert len(used) >= 4 and all(f"\n{name}{{" in text for name in used), used
