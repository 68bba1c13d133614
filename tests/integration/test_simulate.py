"""`gpu-supervisor simulate` through the real command: every shipped scenario passes its own
expectations on the simulated cluster (real control plane, kwok nodes, real daemons), a
scenario whose expectations fail exits 1, and a bad scenario exits 2 naming the field."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from simulator.processes import vllm_python
from simulator.scenario import (
    DEFAULT_SCENARIO,
    FAULT_KINDS,
    MODEL_LOAD_SECONDS,
    load,
    shipped_names,
)
from simulator.starve import cpu_hog

ROOT = Path(__file__).resolve().parents[2]


def simulate(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "supervisor", "simulate", *args],
                          capture_output=True, text=True, timeout=timeout, check=False,
                          cwd=ROOT, env=dict(os.environ))


@pytest.mark.kube
@pytest.mark.parametrize("name", shipped_names())
def test_every_shipped_scenario_passes_its_expectations(name: str, tmp_path: Path) -> None:
    report, plot = tmp_path / "report.json", tmp_path / "timeline.png"
    # The all-reduce workers need torch: the cached vLLM venv's (this venv has none).
    torch = ["--torch-python", vllm_python()] if load(name).collective else []
    # The default scenario (the README's first command) runs as shipped, its recreated group
    # loading the model for the default 120 s; the others with a short load, to keep CI
    # within its hour (their limits count the load on top, whatever it is).
    shipped = name == DEFAULT_SCENARIO
    loading = [] if shipped else ["--load-seconds", "5s"]
    proc = simulate("--scenario", name, "--report", str(report), "--plot", str(plot),
                    "--workdir", str(tmp_path / "work"), *torch, *loading)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert f"PASSED: every expectation of {name} held" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
    result = json.loads(report.read_text())
    assert result["passed"] is True
    assert result["failures"] == []
    for fault in result["faults"]:
        assert fault["injected_at"] > 0
    assert set(result["load_seconds"].values()) == {MODEL_LOAD_SECONDS if shipped else 5.0}
    if shipped:  # the recreated group served only after loading its model
        steps = result["faults"][0]["seconds_after_injection"]
        assert steps["recovered"] - steps["restarted"] >= MODEL_LOAD_SECONDS, steps
        assert steps["capacity_restored"] >= steps["recovered"], steps
    if load(name).fallbacks:  # degraded: clients (through the route or the front) reached it
        assert result["requests"].get("fallback", 0) > 0, result["requests"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The live timeline named every daemon's endpoint.
    assert "endpoints: controller" in proc.stdout
    assert "endpoints: agent gpu-0" in proc.stdout


@pytest.mark.kube
def test_on_a_machine_whose_cores_are_both_busy_nothing_unexplained_happens(
        tmp_path: Path) -> None:
    """The bystanders scenario (an XID in one of three groups; the other two must be left
    alone) with a busy loop pinned to each core for the whole run: every sidecar, engine,
    agent and controller shares its core with it. The faulted group is handled and nothing
    else happens — no group out of traffic, restarted or quarantined that no fault explains
    (under load like this, starved leader sidecars once failed healthy groups over)."""
    report = tmp_path / "report.json"
    with cpu_hog(os.getpid(), seconds=900, per_core=1) as hogs:
        assert len(hogs) == len(os.sched_getaffinity(0))
        proc = simulate("--scenario", "bystanders", "--report", str(report),
                        "--workdir", str(tmp_path / "work"), timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "UNATTRIBUTED" not in proc.stdout
    result = json.loads(report.read_text())
    assert result["passed"] is True, result["failures"]
    acted_on = {a["subject"] for a in result["actions"]
                if a["action"] in ("traffic_off", "restart")}
    assert acted_on == {"llama-70b-1"}, result["actions"]


@pytest.mark.kube
@pytest.mark.vllm
def test_a_worker_stopped_a_leader_killed_and_an_xid_on_real_vllm_split_over_the_pods(
        tmp_path: Path) -> None:
    """``simulate --engine vllm``: the group is a real vLLM, pipeline parallel 2 over its two
    pods (the leader pod's API server and first stage, the worker pod's second stage with
    no HTTP). A worker's stage stopped is seen by the leader's sidecar as a hang, the
    leader's processes killed as a crash, XID 79 by the agent — each recreates the group,
    which serves again only once the new vLLM has really loaded."""
    report = tmp_path / "report.json"
    work = tmp_path / "work"
    proc = simulate("--scenario", "engine-faults-in-turn", "--engine", "vllm",
                    "--report", str(report), "--workdir", str(work), timeout=1800)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    result = json.loads(report.read_text())
    assert result["engines"] == {"llama-70b": "vllm"}
    faults = {f["name"]: f for f in result["faults"]}
    assert [f["skipped"] for f in faults.values()] == [None, None, None]
    # Each fault hit a serving group: the one before it had been recreated and loaded.
    assert all(f["serving_at_injection"] for f in faults.values()), faults
    # The hang was the worker's: its pod has no engine endpoint, the leader's sidecar saw it.
    assert faults["hang"]["pod"] == "llama-70b-0-1"
    assert "stopped (SIGSTOP)" in faults["hang"]["detail"]["injected"]
    # Four incarnations of the group (the first and one per fault), each pod a real vLLM
    # node: the leader's serving the API, the worker's headless.
    logs = sorted((work / "daemons" / "pods").glob("*/vllm.log"))
    assert len(logs) == 8, logs
    texts = [log.read_text(errors="replace") for log in logs]
    assert sum("Worker_PP1" in t and "APIServer" not in t for t in texts) == 4
    assert sum("APIServer" in t for t in texts) == 4


@pytest.mark.kube
def test_without_the_supervisor_an_exited_engine_is_restarted_and_its_group_recreated_by_lws(
        tmp_path: Path) -> None:
    """``--supervisor off``, today's stack on the same cluster: none of our daemons, the
    pods of the upstream LWS + vLLM example (engine alone, TCP readiness probe, no gate).
    The leader's engine exits: the played kubelet sees its container gone (out of the
    EndpointSlice at once) and restarts it, the played LWS recreates the group; nothing of
    ours detects anything, and the replica serves again after its load."""
    report = tmp_path / "report.json"
    proc = simulate("--scenario", "engine-crash", "--supervisor", "off", "--load-seconds",
                    "5s", "--report", str(report), "--workdir", str(tmp_path / "work"))
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "daemons: none of ours" in proc.stdout
    assert "endpoints: controller" not in proc.stdout
    result = json.loads(report.read_text())
    assert result["supervised"] is False
    (crash,) = result["faults"]
    steps = crash["seconds_after_injection"]
    assert "detected" not in steps  # nothing of ours ran
    assert max(steps["traffic_off"], steps["restarted"]) < steps["recovered"], steps
    # The new leader is ready no sooner than its TCP probe's initial delay after it starts.
    assert steps["recovered"] - steps["restarted"] >= 15, steps
    assert not list((tmp_path / "work" / "daemons" / "pods").glob("*/sidecar-*.yaml"))
    assert proc.returncode == (0 if result["passed"] else 1), proc.stdout[-4000:]


def test_without_the_supervisor_a_fault_nothing_would_act_on_is_refused() -> None:
    proc = simulate("--scenario", "thermal-blip", "--supervisor", "off", timeout=60)
    assert proc.returncode == 2
    assert "--supervisor: off plays only faults" in proc.stderr
    assert "thermal-blip has clear, thermal" in proc.stderr


@pytest.mark.kube
def test_a_scenario_whose_expectation_fails_exits_1_and_says_which(tmp_path: Path) -> None:
    """An XID the controller handles, expected to be ignored: the run fails, naming it."""
    scenario = tmp_path / "wrong.yaml"
    scenario.write_text(
        "name: wrong\ncluster: {nodes: 4}\nmodels: [{name: m, replicas: 1, size: 2}]\n"
        "faults: [{name: xid, at: 2s, kind: xid, target: m/0/0, code: 79}]\n"
        "expect: [{fault: xid, quarantined: false}]\nduration: 30s\n")
    report = tmp_path / "report.json"
    proc = simulate("--scenario", str(scenario), "--report", str(report))
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "FAILED: xid: node quarantined (expected no quarantine)" in proc.stdout
    result = json.loads(report.read_text())
    assert result["passed"] is False
    (fault,) = result["faults"]
    assert "quarantined" in fault["seconds_after_injection"]


@pytest.mark.kube
def test_a_fault_no_pod_comes_to_hold_is_skipped_and_its_expectations_fail(
        tmp_path: Path) -> None:
    """Four nodes, four pods: once an XID quarantines a node, the recreated group cannot
    place its rank 1 anywhere, so a fault on that rank waits for a pod that never runs and
    is skipped, saying why; the run fails on its expectation, and nothing crashes."""
    scenario = tmp_path / "no-room.yaml"
    scenario.write_text(
        "name: no-room\ncluster: {nodes: 4}\nmodels: [{name: m, replicas: 2, size: 2}]\n"
        "faults: [{name: xid, at: 2s, kind: xid, target: m/0/1, code: 79},\n"
        "         {name: crash, at: 3s, kind: engine_crash, target: m/0/1}]\n"
        "expect: [{fault: crash, detected_within: 10s}]\nduration: 90s\n")
    report = tmp_path / "report.json"
    proc = simulate("--scenario", str(scenario), "--report", str(report))
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    why = "m-0-1 is not placed on a node after 60 s"
    assert f"FAILED: crash: skipped ({why}), so its expectations could not be checked" in \
        proc.stdout
    assert f"crash: skipped: {why}" in proc.stdout  # the summary
    result = json.loads(report.read_text())
    crash = next(f for f in result["faults"] if f["name"] == "crash")
    assert crash["skipped"] == why
    assert any(line.startswith("crash: skipped (") for line in result["failures"])


def test_a_collective_scenario_without_torch_exits_2_saying_how_to_get_it() -> None:
    proc = simulate("--scenario", "collective-hang", timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "need torch" in proc.stderr
    assert "--torch-python" in proc.stderr
    assert "control plane" not in proc.stdout  # refused before building anything
    proc = simulate("--scenario", "collective-hang", "--torch-python", "/no/such/python",
                    timeout=60)
    assert proc.returncode == 2
    assert "'/no/such/python' is not an executable" in proc.stderr


def test_a_bad_scenario_exits_2_naming_the_field(tmp_path: Path) -> None:
    scenario = tmp_path / "bad.yaml"
    scenario.write_text("cluster: {nodes: 4}\nmodels: [{name: m, replicas: 1, size: 2}]\n"
                        "faults: [{at: 1s, kind: meteor, target: m/0/0}]\n")
    proc = simulate("--scenario", str(scenario), timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "gpu-supervisor simulate: invalid scenario: faults[0].kind: must be one of "
        f"{', '.join(FAULT_KINDS)}, got 'meteor'"]
    proc = simulate("--scenario", "no-such-scenario", timeout=60)
    assert proc.returncode == 2
    assert "no shipped scenario of that name" in proc.stderr


@pytest.mark.netns
def test_cuts_left_by_a_killed_simulation_are_removed_and_a_running_ones_are_kept() -> None:
    """A simulation killed with SIGKILL leaves its iptables cuts; the next one removes them
    before it starts (they would cut its own links), but not a live simulation's."""
    from simulator.fleet import CUT_TAG, Runtime

    gone = subprocess.Popen(["true"])
    gone.wait()

    def rule(pid: int) -> list[str]:
        return ["INPUT", "-i", "lo", "-p", "udp", "-s", "127.0.1.250", "-d", "127.0.1.251",
                "-m", "comment", "--comment", f"{CUT_TAG} pid={pid}", "-j", "DROP"]

    def present(pid: int) -> bool:
        listed = subprocess.run(["iptables", "-w", "-S", "INPUT"], capture_output=True,
                                text=True, check=True).stdout
        return f"{CUT_TAG} pid={pid}" in listed

    for pid in (gone.pid, os.getpid()):
        subprocess.run(["iptables", "-w", "-I", *rule(pid)], check=True)
    try:
        assert Runtime.clear_stale_cuts() == 1
        assert not present(gone.pid)
        assert present(os.getpid())
    finally:
        for pid in (gone.pid, os.getpid()):
            subprocess.run(["iptables", "-w", "-D", *rule(pid)], check=False,
                           capture_output=True)
