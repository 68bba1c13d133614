"""Controller at fleet scale: 4,096 nodes (32,768 GPUs, 512 groups of 8) on loopback.

Set-up on the test cluster (real kube-apiserver + etcd): 4,096 Node objects, 512
LeaderWorkerSet groups of 8 pods (one pod per node), the deploy/ RBAC, and a real
controller process acting as its own ServiceAccount. A load generator then plays every
agent: each node reports at the agents' default heartbeat (10 s) with the agent
ServiceAccount's report token (audience gpu-supervisor) over TLS, spread evenly over the
period. After a warm-up, 5 % of the nodes
report a lost GPU in the same second; the policy (no ``for:`` delay) fails over every
group they belong to.

Figures:
- ``nodes``: distinct nodes whose reports the controller accepted;
- ``decision_ms_p99`` (and p50, max, count): report received → first API request of the
  resulting action sent to the API server, measured inside the controller;
- ``reports_dropped``: reports the load generator could not deliver or that were not
  answered 202 (timeouts, errors, 4xx/5xx);
- ``rss_mib``: the controller's resident memory at the end;
- ``reports_per_second``: the offered heartbeat rate.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from kubernetes_asyncio import client

from bench.agent_footprint import _rss_mib
from bench.harness import ControllerProcess, gpu_finding, node_report
from supervisor.controller.model import LWS_GROUP, LWS_NAME, LWS_WORKER, READINESS_GATE
from tests.kubeenv import manifests
from tests.kubeenv.cluster import REPORT_AUDIENCE, KubeTestCluster, build_binary

POLICY = """
budgets: {max_groups_disrupted: 512, min_healthy_groups: 0}
circuit_breaker: {max_actions: 100000, window: 1m}
rules:
  - name: gpu-lost
    when: {fault_classes: [gpu_lost], min_severity: critical, scope: group, for: 0s}
    then:
      - action: fail_over
"""
HEARTBEAT = 10.0


async def _bounded(n: int, coros: list[Any]) -> None:
    sem = asyncio.Semaphore(n)

    async def one(c: Any) -> None:
        async with sem:
            await c

    await asyncio.gather(*(one(c) for c in coros))


async def _populate(api: client.ApiClient, nodes: int, group_size: int) -> list[str]:
    core: Any = client.CoreV1Api(api)  # plain dict bodies; the stubs want model objects
    names = [f"gpu-node-{i:05d}" for i in range(nodes)]
    await _bounded(32, [core.create_node({"apiVersion": "v1", "kind": "Node",
                                          "metadata": {"name": n}}) for n in names])
    await core.create_namespace({"metadata": {"name": "serving"}})
    pods = []
    for i, node in enumerate(names):
        group, worker = divmod(i, group_size)
        name = f"llama-{group}" if worker == 0 else f"llama-{group}-{worker}"
        pods.append((name, {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": {LWS_NAME: "llama", LWS_GROUP: str(group),
                                                  LWS_WORKER: str(worker)}},
            "spec": {"nodeName": node, "automountServiceAccountToken": False,
                     "readinessGates": [{"conditionType": READINESS_GATE}],
                     "containers": [{"name": "vllm", "image": "vllm"}]}}))
    await _bounded(32, [core.create_namespaced_pod("serving", body) for _, body in pods])
    status = {"status": {"phase": "Running", "conditions": [
        {"type": "ContainersReady", "status": "True"},
        {"type": READINESS_GATE, "status": "True"}]}}
    await _bounded(32, [core.patch_namespaced_pod_status(name, "serving", status)
                        for name, _ in pods])
    return names


class LoadGenerator:
    def __init__(self, url: str, token: str, nodes: list[str]) -> None:
        self.url = url + "/v1/reports/node"
        self.boot = {"id": "load-generator", "started_at": time.time()}
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self.nodes = nodes
        self.faulty: dict[str, list[dict[str, Any]]] = {}
        self.sent = 0
        self.dropped = 0
        self.sequence = 0

    async def _post(self, session: aiohttp.ClientSession, node: str) -> None:
        self.sequence += 1
        body = json.dumps(node_report(node, self.faulty.get(node, []), self.sequence,
                                      boot=self.boot))
        try:
            async with session.post(self.url, data=body, headers=self.headers,
                                    timeout=aiohttp.ClientTimeout(total=5)) as resp:
                await resp.read()
                if resp.status != 202:
                    self.dropped += 1
        except (aiohttp.ClientError, TimeoutError):
            self.dropped += 1
        self.sent += 1

    async def heartbeat(self, session: aiohttp.ClientSession, duration: float) -> None:
        """Every node once per HEARTBEAT seconds, spread evenly, for ``duration`` seconds."""
        start = time.monotonic()
        gap = HEARTBEAT / len(self.nodes)
        tasks: set[asyncio.Task[None]] = set()
        i = 0
        while time.monotonic() - start < duration:
            due = start + i * gap
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(self._post(session, self.nodes[i % len(self.nodes)]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
        await asyncio.gather(*tasks)

    async def burst(self, session: aiohttp.ClientSession, nodes: list[str]) -> None:
        """These nodes report a lost GPU, all within one second."""
        for node in nodes:
            self.faulty[node] = [gpu_finding(node, 3)]
        gap = 1.0 / len(nodes)
        tasks = []
        for node in nodes:
            tasks.append(asyncio.create_task(self._post(session, node)))
            await asyncio.sleep(gap)
        await asyncio.gather(*tasks)


async def _scenario(cluster: KubeTestCluster, workdir: Path, nodes: int, group_size: int,
                    warmup: float, settle: float) -> dict[str, Any]:
    async with await cluster.api_client() as admin:
        await manifests.install_rbac(admin)
        names = await _populate(admin, nodes, group_size)
    ctl_token = await cluster.service_account_token("gpu-supervisor",
                                                    "gpu-supervisor-controller")
    agent_token = await cluster.service_account_token("gpu-supervisor", "gpu-supervisor-agent",
                                                      audiences=[REPORT_AUDIENCE])
    kubeconfig = cluster.write_kubeconfig(workdir / "kc", ctl_token)
    ctl = ControllerProcess(workdir, kubeconfig, "bench", policy=POLICY,
                            settings={"controller": {
                                # the shipped defaults, not the test suite's short Lease
                                "lease_duration_seconds": 15.0, "renew_deadline_seconds": 10.0,
                                "retry_period_seconds": 2.0,
                                "evaluation_interval_seconds": 1.0}})
    await asyncio.to_thread(ctl.start)
    try:
        while True:  # leader, state loaded, watches synced
            status = await asyncio.to_thread(ctl.status)
            if status["leader"] and status["state_loaded"] and status["groups"] == \
                    nodes // group_size:
                break
            await asyncio.sleep(0.2)
        gen = LoadGenerator(ctl.report_url, agent_token, names)
        burst_nodes = random.Random(7).sample(names, max(1, nodes * 5 // 100))
        conn = aiohttp.TCPConnector(limit=256, ssl=ctl.tls or True)
        async with aiohttp.ClientSession(connector=conn) as session:
            steady = asyncio.create_task(gen.heartbeat(session, warmup + settle))
            await asyncio.sleep(warmup)
            await gen.burst(session, burst_nodes)
            await steady
        status = await asyncio.to_thread(ctl.status)
        assert ctl.proc is not None
        rss = _rss_mib(ctl.proc.pid)
    finally:
        ctl.stop()
        keep = os.environ.get("BENCH_KEEP_LOG")
        if keep:
            shutil.copy(ctl.log_path, keep)
    lat = status["decision_latency_ms"]
    affected = {names.index(n) // group_size for n in burst_nodes}
    return {
        "nodes": status["nodes"],
        "gpus": status["nodes"] * 8,
        "groups": status["groups"],
        "burst_nodes": len(burst_nodes),
        "groups_failed_over": status["actions"].get("fail_over/done", 0),
        "groups_affected": len(affected),
        "reports_per_second": round(nodes / HEARTBEAT, 1),
        "reports_sent": gen.sent,
        "reports_accepted": status["reports"].get("accepted", 0),
        "reports_dropped": gen.dropped,
        "decision_ms_p50": lat["p50"],
        "decision_ms_p99": lat["p99"],
        "decision_ms_max": lat["max"],
        "decisions_measured": lat["count"],
        "rss_mib": round(rss, 1),
    }


def run(quick: bool = False) -> dict[str, Any]:
    nodes = 512 if quick else 4096
    binary = build_binary()
    with tempfile.TemporaryDirectory(prefix="bench-ctl-") as tmp:
        cluster = KubeTestCluster.start(Path(tmp) / "kube", binary)
        try:
            return asyncio.run(_scenario(cluster, Path(tmp), nodes, 8,
                                         warmup=12.0 if quick else 25.0, settle=10.0))
        finally:
            cluster.stop()
