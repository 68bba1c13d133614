"""The agent's footprint as deployed: 8 stand-in GPUs at a 1 s probe interval, publishing
NodeConditions to a real API server and reporting to a real controller over TLS.

Set-up: the test cluster's kube-apiserver + etcd with the chart's RBAC, a GPU-sized Node
object with its agent pod (bench/fleet.py); the agent runs with its ServiceAccount's
credentials for the API server and, for reports, a token bound to its agent pod (as the
chart projects it), verifying the controller's certificate; the controller is a real process
with its report endpoint on TLS. Shipped defaults otherwise (detectors, 10 s heartbeat).
The agent runs on an interpreter with the image's dependencies only
(``deploy/image/requirements.lock``, built once and cached): the test venv's tools are not
in the image and would be counted in its memory.

Figures:
- ``cpu_percent_of_core``: CPU time the agent process used (user+system, from
  /proc/PID/stat) over a quiet window, as a percentage of one core;
- ``rss_mib``: resident memory at the end of the run (/proc/PID/status VmRSS);
- ``probe_round_ms_median``: the agent's own measure of a probe round — tick until all
  8 GPUs answered — median over the run;
- ``xid_to_finding_ms_p99`` (and p50, max): an XID line appended to the stand-in's event
  file → the finding visible in ``/status``, over distinct (GPU, XID) pairs so every
  sample is a new finding, not a dedup hit;
- ``condition_writes``, ``reports_sent``, ``controller_accepted``: proof that it published
  and reported while measured.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.fleet import populate
from simulator.controlplane.cluster import KubeTestCluster, build_binary
from simulator.processes import AgentProcess, ControllerProcess, image_python
from tests.kubeenv import manifests

CODES = [8, 11, 13, 31, 32, 48, 62, 64, 68, 74, 79, 94, 95, 109, 119]


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime, stime


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


async def _deployment(cluster: KubeTestCluster, workdir: Path
                      ) -> tuple[manifests.Release, str, Path, Path]:
    """RBAC, the node and its agent pod; the agent's report token file and kubeconfig."""
    async with await cluster.api_client() as admin:
        release = await manifests.install_rbac(admin)
        fleet = await populate(admin, 1, 1, release.namespace,
                               release.service_account("agent"),
                               release.agent_pod_labels())
    node = fleet.nodes[0]
    token_file = workdir / "report-token"
    token_file.write_text(fleet.tokens[node])
    api_token = await cluster.service_account_token(release.namespace,
                                                    release.service_account("agent"))
    return release, node, token_file, cluster.write_kubeconfig(workdir / "kc-agent", api_token)


def _measure(agent: AgentProcess, ctl: ControllerProcess, window: float, samples: int
             ) -> dict[str, Any]:
    assert agent.proc is not None
    pid = agent.proc.pid
    agent.wait_for(lambda: ctl.status()["nodes_reporting"] == 1, what="the first report")
    time.sleep(3.0)  # let start-up work (imports, first rounds, first writes) finish
    accepted0 = ctl.status()["reports"].get("accepted", 0)
    cpu0, t0 = _cpu_seconds(pid), time.monotonic()
    time.sleep(window)
    cpu1, t1 = _cpu_seconds(pid), time.monotonic()
    status = agent.status()
    accepted = ctl.status()["reports"].get("accepted", 0) - accepted0
    latencies = []
    pairs = [(gpu, code) for code in CODES for gpu in range(8)][:samples]
    for gpu, code in pairs:
        started = time.perf_counter()
        agent.control.inject_xid(gpu, code)
        while not any(f["detail"] == str(code) for f in agent.findings("xid", gpu)):
            if time.perf_counter() - started > 10:
                raise TimeoutError(f"XID {code} on GPU {gpu} never became a finding")
            time.sleep(0.002)
        latencies.append((time.perf_counter() - started) * 1000)
    probe = status["probe"]
    return {
        "gpus": 8,
        "probe_interval_seconds": 1.0,
        "window_seconds": round(t1 - t0, 1),
        "cpu_percent_of_core": round((cpu1 - cpu0) / (t1 - t0) * 100, 3),
        "rss_mib": round(_rss_mib(pid), 1),
        "probe_round_ms_median": probe["round_ms_median"],
        "probe_rounds": probe["rounds_completed"],
        "condition_writes": status["kubernetes"]["writes"],
        "reports_sent": status["reporting"]["sent"],
        "controller_accepted_in_window": accepted,
        "xid_samples": len(latencies),
        "xid_to_finding_ms_p50": round(statistics.median(latencies), 2),
        "xid_to_finding_ms_p99": round(_percentile(latencies, 0.99), 2),
        "xid_to_finding_ms_max": round(max(latencies), 2),
    }


def run(quick: bool = False) -> dict[str, Any]:
    window = 10.0 if quick else 60.0
    samples = 24 if quick else 100
    binary = build_binary()
    with tempfile.TemporaryDirectory(prefix="bench-agent-") as tmp:
        workdir = Path(tmp)
        cluster = KubeTestCluster.start(workdir / "kube", binary)
        try:
            release, node, token_file, kubeconfig = asyncio.run(_deployment(cluster, workdir))
            ctl_token = asyncio.run(cluster.service_account_token(
                release.namespace, release.service_account("controller")))
            ctl = ControllerProcess(workdir, cluster.write_kubeconfig(workdir / "kc", ctl_token),
                                    "bench", settings=release.controller_settings()).start()
            agent = AgentProcess(workdir / "agent", gpus=8, node_name=node,
                                 python=image_python(), settings={
                "nvml": {"probe_interval_seconds": 1.0, "call_timeout_seconds": 5.0},
                "kubernetes": {"enabled": "true", "kubeconfig": str(kubeconfig)},
                "reporting": {"controller_url": ctl.report_url, "token_file": str(token_file),
                              "ca_file": str(ctl.tls_dir / "ca.crt")}})
            # Bench with the shipped detector defaults, not the test suite's fast ones.
            agent.settings["detectors"] = {}
            try:
                agent.start()
                return _measure(agent, ctl, window, samples)
            finally:
                agent.stop()
                ctl.stop()
        finally:
            cluster.stop()
