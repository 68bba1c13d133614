"""How fast the test cluster's API server takes the writes a fail-over makes: the ceiling
under ``controller_scale``'s storm figures.

Set-up: ``controller_scale``'s fleet at 1,024 nodes (GPU-sized Nodes, LWS pods as people
write them). Each group leader's readiness-gate condition is written with the strategic
merge patch the controller sends, from a client that does nothing else, at 32 requests in
flight (what the controller allows for first writes) and one at a time.

Figures: ``writes_per_second_32`` and ``write_ms_p50_32``/``write_ms_p99_32`` (32 in flight),
``write_ms_p50_1`` (one at a time: the API server's own time per write).
"""

from __future__ import annotations

import asyncio
import json
import ssl
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.fleet import SERVING, populate
from simulator.controlplane.cluster import KubeTestCluster, build_binary
from supervisor.controller.model import READINESS_GATE
from supervisor.kube import STRATEGIC_MERGE
from tests.kubeenv import manifests


async def _writes(cluster: KubeTestCluster, nodes: int) -> dict[str, Any]:
    async with await cluster.api_client() as admin:
        release = await manifests.install_rbac(admin)
        fleet = await populate(admin, nodes, 8, release.namespace,
                               release.service_account("agent"),
                               release.agent_pod_labels())
    leaders = sorted(pod for pod, group in fleet.pod_group.items()
                     if pod == f"llama-{group}")
    tls = ssl.create_default_context(cafile=str(cluster.ca_file))
    headers = {"Authorization": f"Bearer {cluster.admin_token}",
               "Content-Type": STRATEGIC_MERGE}
    figures: dict[str, Any] = {"writes": len(leaders)}
    async with aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(
            limit=100, ssl=tls)) as session:
        for in_flight, status in ((32, "False"), (1, "True")):
            slots = asyncio.Semaphore(in_flight)
            took: list[float] = []

            async def write(pod: str, status: str = status,
                            slots: asyncio.Semaphore = slots, took: list[float] = took
                            ) -> None:
                body = {"status": {"conditions": [{
                    "type": READINESS_GATE, "status": status, "reason": "Bench",
                    "message": "bench", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}}
                async with slots:
                    began = time.perf_counter()
                    async with session.patch(
                            f"{cluster.url}/api/v1/namespaces/{SERVING}/pods/{pod}/status",
                            data=json.dumps(body)) as resp:
                        await resp.read()
                        if resp.status != 200:
                            raise RuntimeError(f"PATCH {pod}: {resp.status}")
                    took.append(time.perf_counter() - began)

            began = time.perf_counter()
            await asyncio.gather(*(write(pod) for pod in leaders))
            elapsed = time.perf_counter() - began
            took.sort()
            if in_flight == 32:
                figures["writes_per_second_32"] = round(len(leaders) / elapsed, 1)
                figures["write_ms_p50_32"] = round(statistics.median(took) * 1000, 1)
                figures["write_ms_p99_32"] = round(
                    took[min(len(took) - 1, int(0.99 * len(took)))] * 1000, 1)
            else:
                figures["write_ms_p50_1"] = round(statistics.median(took) * 1000, 1)
    return figures


def run(quick: bool = False) -> dict[str, Any]:
    binary = build_binary()
    with tempfile.TemporaryDirectory(prefix="bench-writes-") as tmp:
        cluster = KubeTestCluster.start(Path(tmp) / "kube", binary)
        try:
            return asyncio.run(_writes(cluster, 256 if quick else 1024))
        finally:
            cluster.stop()
