"""A flood of forged report tokens against the controller, and an agent's report in the
middle of it.

A real controller (TLS on, the chart's RBAC, ``token_reviews_per_second`` 10) on the test
cluster. Each round, 300 reports with distinct tokens shaped like ours (valid-looking JWTs
for our audience, bad signatures) arrive at once over up to 100 connections; 50 ms in, an
agent whose token is cached sends its report on a connection of its own (TLS handshake
included, as after a reconnect). Figures over the rounds:

- ``valid_report_ms_p50`` / ``valid_report_ms_max``: that report's latency seen by the agent;
- ``reviews_per_round_max``: TokenReviews the flood cost (the rate's burst plus its refill);
- ``throttled_fraction``: share of forged reports answered 429 without an API call.
"""

from __future__ import annotations

import asyncio
import base64
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from simulator.controlplane.cluster import REPORT_AUDIENCE, KubeTestCluster, build_binary
from simulator.processes import ControllerProcess, node_report
from tests.kubeenv import manifests

FLOOD = 300


def key_id(token: str) -> str:
    """The key id (``kid``) in a JWT's header: which of the issuer's keys signed it."""
    head = token.split(".", maxsplit=1)[0]
    return str(json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))["kid"])


def forged_token(serial: int, kid: str = "x") -> str:
    """Shaped like a ServiceAccount token for us (audience, expiry; the cluster's key id
    when ``kid`` is given), with a signature of the right length made by nobody."""
    def part(obj: dict[str, Any] | bytes) -> str:
        raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")
    claims = {"aud": [REPORT_AUDIENCE], "exp": int(time.time()) + 3600, "iss": "attacker",
              "sub": f"system:serviceaccount:x:bogus-{serial}"}
    signature = serial.to_bytes(8, "big") * 32  # 256 bytes, as an RSA-2048 signature
    return f"{part({'alg': 'RS256', 'kid': kid})}.{part(claims)}.{part(signature)}"


async def _round(ctl: ControllerProcess, token: str, serial: int) -> tuple[float, list[int]]:
    url = ctl.report_url + "/v1/reports/node"
    body = json.dumps(node_report("n1", []))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(
            ssl=ctl.tls or True, limit=100)) as session:

        async def post(tok: str) -> int:
            async with session.post(url, data=body, headers={
                    "Authorization": f"Bearer {tok}", "Content-Type": "application/json"}
                    ) as resp:
                return resp.status

        flood = [asyncio.create_task(post(forged_token(serial * FLOOD + i)))
                 for i in range(FLOOD)]
        await asyncio.sleep(0.05)
        started = time.monotonic()
        own_connection = aiohttp.TCPConnector(ssl=ctl.tls or True)
        async with aiohttp.ClientSession(connector=own_connection) as own, \
                own.post(url, data=json.dumps(node_report("n1", [])), headers={
                    "Authorization": f"Bearer {token}", "Content-Type": "application/json"}
                ) as resp:
            await resp.read()
            if resp.status != 202:
                raise RuntimeError(f"the valid report got {resp.status}")
        latency = time.monotonic() - started
        return latency, list(await asyncio.gather(*flood))


async def _scenario(cluster: KubeTestCluster, workdir: Path, rounds: int) -> dict[str, Any]:
    async with await cluster.api_client() as admin:
        release = await manifests.install_rbac(admin)
    ctl_token = await cluster.service_account_token(release.namespace,
                                                    release.service_account("controller"))
    agent = await cluster.service_account_token(
        release.namespace, release.service_account("agent"), audiences=[REPORT_AUDIENCE])
    ctl = ControllerProcess(workdir, cluster.write_kubeconfig(workdir / "kc", ctl_token),
                            "flood", settings=release.controller_settings(
                                token_reviews_per_second=10))
    await asyncio.to_thread(ctl.start)
    latencies, statuses, reviews = [], [], []
    try:
        if (await asyncio.to_thread(ctl.post_report, agent, node_report("n1", [])))[0] != 202:
            raise RuntimeError("the agent's token was not accepted")
        for serial in range(rounds):
            before = (await asyncio.to_thread(ctl.status))["token_reviews"]
            latency, got = await _round(ctl, agent, serial)
            reviews.append((await asyncio.to_thread(ctl.status))["token_reviews"] - before)
            latencies.append(latency * 1000)
            statuses += got
            await asyncio.sleep(3)  # the review rate refills between rounds
    finally:
        ctl.stop()
    return {"rounds": rounds, "flood": FLOOD,
            "valid_report_ms_p50": round(statistics.median(latencies), 1),
            "valid_report_ms_max": round(max(latencies), 1),
            "reviews_per_round_max": max(reviews),
            "throttled_fraction": round(statuses.count(429) / len(statuses), 3)}


def run(quick: bool = False) -> dict[str, Any]:
    binary = build_binary()
    with tempfile.TemporaryDirectory(prefix="bench-flood-") as tmp:
        cluster = KubeTestCluster.start(Path(tmp) / "kube", binary)
        try:
            return asyncio.run(_scenario(cluster, Path(tmp), 3 if quick else 10))
        finally:
            cluster.stop()
