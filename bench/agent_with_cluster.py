"""The agent's memory when it publishes NodeConditions to a real API server.

``agent_footprint`` runs without a cluster, as the agent issue specifies; this one starts
the test suite's kube-apiserver + etcd, gives the agent the deploy/ RBAC and its own
ServiceAccount token, and measures the same agent (8 stand-in GPUs, 1 s interval) with
Kubernetes publishing on.

Figures: ``rss_mib`` after ``settle_seconds``, ``condition_writes`` (proof it published).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.agent_footprint import _rss_mib
from bench.harness import AgentProcess
from tests.kubeenv import manifests
from tests.kubeenv.cluster import KubeTestCluster, build_binary


async def _prepare(cluster: KubeTestCluster, node: str) -> str:
    async with await cluster.api_client() as api:
        await manifests.install_rbac(api, manifests.NAMESPACE, "agent")
        await api.call_api("/api/v1/nodes", "POST", body={
            "apiVersion": "v1", "kind": "Node", "metadata": {"name": node}},
            header_params={"Content-Type": "application/json"}, auth_settings=["BearerToken"])
    return await cluster.service_account_token("gpu-supervisor", "gpu-supervisor-agent")


def run(quick: bool = False) -> dict[str, Any]:
    settle = 5.0 if quick else 20.0
    binary = build_binary()
    with tempfile.TemporaryDirectory(prefix="bench-agent-kube-") as tmp:
        cluster = KubeTestCluster.start(Path(tmp) / "kube", binary)
        try:
            token = asyncio.run(_prepare(cluster, "gpu-node-0"))
            kubeconfig = cluster.write_kubeconfig(Path(tmp) / "kc", token)
            agent = AgentProcess(Path(tmp), gpus=8, node_name="gpu-node-0", settings={
                "nvml": {"probe_interval_seconds": 1.0, "call_timeout_seconds": 5.0},
                "kubernetes": {"enabled": "true", "kubeconfig": str(kubeconfig)}})
            agent.settings["detectors"] = {}  # the shipped defaults
            agent.start()
            try:
                assert agent.proc is not None
                time.sleep(settle)
                rss = _rss_mib(agent.proc.pid)
                writes = agent.status()["kubernetes"]["writes"]
            finally:
                agent.stop()
        finally:
            cluster.stop()
    return {"gpus": 8, "settle_seconds": settle, "rss_mib": round(rss, 1),
            "condition_writes": writes}
