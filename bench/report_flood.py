"""Forged report tokens flooding the controller while agents it has never seen connect.

The attack: a pod on the cluster (or anything that reaches the report endpoint) sends
report after report, each with a new token shaped like ours — our audience, a future
expiry, the key id the cluster's issuer really uses — signed by nobody. Before tokens were
checked locally, each cost a TokenReview from the one shared budget, and a few hundred a
second locked out every agent that had to reconnect.

A real controller process (TLS, the chart's RBAC and settings, its own core as deployed)
on the test cluster; ``FLOOD_PER_SECOND`` (2,000) forged tokens a second arrive over
keep-alive TLS connections from ``FLOOD_SOURCES`` source addresses — sent request after
request, each answered before the next on its connection, so the rate is what the
controller actually served. Meanwhile ``AGENTS`` agents, each from its own address with a
token bound to its own agent pod, connect one after another: TLS handshake, stream
upgrade (the token's signature and its TokenReview), the controller's Hello, a first
report and its acknowledgement. Figures:

- ``new_agent_connect_s_p50`` / ``_p99`` / ``_max``: an agent's connect-to-acknowledged,
  over ``AGENTS`` (≥ 100) fresh agents;
- ``flood_per_second``: forged tokens the controller answered per second, and how
  (``flood_refused_401`` by the signature check, ``flood_refused_429`` by the source's
  allowance, before any check);
- ``controller_cpu_cores``: the controller's CPU over the flood (user + system / wall);
- ``token_reviews``: TokenReviews the run cost (the fresh agents' own: the flood none).

Percentiles rank-based: p99 of n samples is the ⌈0.99 n⌉-th smallest.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import ssl
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.controller_scale import _place
from bench.fleet import populate
from simulator.controlplane.cluster import REPORT_AUDIENCE, KubeTestCluster, build_binary
from simulator.processes import ControllerProcess, node_report
from tests.kubeenv import manifests

FLOOD_PER_SECOND = 2000
# The flood comes from many addresses, each within a few tokens a second of the allowance
# one source gets before its tokens are refused unchecked: most forged tokens cost the
# controller a signature check — the attacker's best case, ours worst.
FLOOD_SOURCES = 250  # addresses the flood comes from (127.0.2.1 ...)
FLOOD_CONNECTIONS = 1  # keep-alive connections per source
AGENTS = 120  # fresh agents, each from its own address (127.0.3.1 ...)
AGENT_GAP_SECONDS = 0.25  # between one fresh agent and the next


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


def percentile(values: list[float], q: float) -> float:
    """Rank-based: the ⌈q·n⌉-th smallest (q = 0.99: with 120 samples, the 119th)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


class Flood:
    """Forged-token reports at ``rate`` a second over keep-alive TLS connections, each
    written as raw HTTP/1.1 and its answer read before the next (what a cheap attacker
    does; aiohttp's client would cost this machine more CPU than the server it measures)."""

    def __init__(self, url: str, tls: ssl.SSLContext, kid: str, rate: float) -> None:
        parts = url.removeprefix("https://").split(":")
        self.host, self.port = parts[0], int(parts[1])
        self.tls = tls
        self.kid = kid
        self.rate = rate
        self.statuses: dict[int, int] = {}
        self.sent = 0
        self.stop = asyncio.Event()
        self._body = json.dumps(node_report("n-flood", [])).encode()

    def _request(self, serial: int) -> bytes:
        return (f"POST /v1/reports/node HTTP/1.1\r\nHost: {self.host}\r\n"
                f"Authorization: Bearer {forged_token(serial, self.kid)}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(self._body)}\r\n"
                "\r\n").encode() + self._body

    async def _connection(self, source: str, index: int, per_second: float) -> None:
        serial = index * 10_000_000
        while not self.stop.is_set():
            try:
                reader, writer = await asyncio.open_connection(
                    self.host, self.port, ssl=self.tls, server_hostname=self.host,
                    local_addr=(source, 0))
            except OSError:
                await asyncio.sleep(0.1)
                continue
            try:
                next_at = time.monotonic()
                while not self.stop.is_set():
                    writer.write(self._request(serial))
                    serial += 1
                    self.sent += 1
                    status_line = await reader.readline()
                    length = 0
                    while (line := await reader.readline()) not in (b"\r\n", b""):
                        if line.lower().startswith(b"content-length:"):
                            length = int(line.split(b":")[1])
                    if not status_line:
                        break
                    await reader.readexactly(length)
                    status = int(status_line.split()[1])
                    self.statuses[status] = self.statuses.get(status, 0) + 1
                    next_at += 1 / per_second
                    await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
                pass
            finally:
                writer.close()

    async def run(self) -> None:
        per_connection = self.rate / (FLOOD_SOURCES * FLOOD_CONNECTIONS)
        await asyncio.gather(*(self._connection(f"127.0.2.{s + 1}", s * FLOOD_CONNECTIONS + c,
                                                per_connection)
                               for s in range(FLOOD_SOURCES)
                               for c in range(FLOOD_CONNECTIONS)))


async def _fresh_agent(ctl: ControllerProcess, node: str, token: str, source: str) -> float:
    """Seconds from opening a connection to the first report's acknowledgement."""
    url = "wss" + ctl.report_url.removeprefix("https") + "/v1/reports/node/stream"
    started = time.monotonic()
    connector = aiohttp.TCPConnector(ssl=ctl.tls or True, local_addr=(source, 0))
    async with aiohttp.ClientSession(connector=connector) as session:
        while True:
            try:
                ws = await session.ws_connect(url, headers={"Authorization": f"Bearer {token}"},
                                              timeout=aiohttp.ClientWSTimeout(ws_close=5.0))
            except aiohttp.WSServerHandshakeError as exc:
                if exc.status != 429:  # as the agent does: come back when told
                    raise
                after = exc.headers.get("Retry-After", "1") if exc.headers else "1"
                await asyncio.sleep(float(after))
                continue
            async with ws:
                hello = await ws.receive_json(timeout=30)
                await ws.send_json(node_report(node, [], epoch=hello["epoch"]))
                answer = await ws.receive_json(timeout=30)
                if answer.get("status") != 202:
                    raise RuntimeError(f"fresh agent on {node} refused: {answer}")
                return time.monotonic() - started


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _scenario(cluster: KubeTestCluster, workdir: Path, agents: int) -> dict[str, Any]:
    async with await cluster.api_client() as admin:
        release = await manifests.install_rbac(admin)
        fleet = await populate(admin, agents, 8, release.namespace,
                               release.service_account("agent"), release.agent_pod_labels())
    ctl_token = await cluster.service_account_token(release.namespace,
                                                    release.service_account("controller"))
    ctl = ControllerProcess(workdir, cluster.write_kubeconfig(workdir / "kc", ctl_token),
                            "flood", fast=False, settings=release.controller_settings())
    await asyncio.to_thread(ctl.start)
    assert ctl.proc is not None
    tls = ctl.tls
    assert tls is not None
    _place(ctl.proc.pid, cluster.pids)
    try:
        # Watches synced and the issuer's keys fetched (both at start).
        await asyncio.to_thread(ctl.wait_for, lambda: ctl.get("/readyz")[0] == 200
                                and ctl.status()["issuer_keys"]["keys"], 60.0, "ready")
        flood = Flood(ctl.report_url, tls, key_id(fleet.tokens[fleet.nodes[0]]),
                      FLOOD_PER_SECOND)
        flooding = asyncio.create_task(flood.run())
        await asyncio.sleep(3.0)  # the flood at full rate before the first agent
        before = await asyncio.to_thread(ctl.status)
        cpu0, wall0, sent0 = _cpu_seconds(ctl.proc.pid), time.monotonic(), flood.sent
        answered0 = sum(flood.statuses.values())
        statuses0 = dict(flood.statuses)
        took = []
        for i, node in enumerate(fleet.nodes):
            took.append(await _fresh_agent(ctl, node, fleet.tokens[node],
                                           f"127.0.3.{i % 250 + 1}"))
            await asyncio.sleep(AGENT_GAP_SECONDS)
        wall = time.monotonic() - wall0
        cpu = _cpu_seconds(ctl.proc.pid) - cpu0
        answered = sum(flood.statuses.values()) - answered0
        refused = {code: flood.statuses.get(code, 0) - statuses0.get(code, 0)
                   for code in (401, 429, 202)}
        flood.stop.set()
        await flooding
        after = await asyncio.to_thread(ctl.status)
    finally:
        await asyncio.to_thread(ctl.stop)
    return {
        "agents": len(took),
        "new_agent_connect_s_p50": round(statistics.median(took), 3),
        "new_agent_connect_s_p99": round(percentile(took, 0.99), 3),
        "new_agent_connect_s_max": round(max(took), 3),
        "flood_per_second": round(answered / wall, 1),
        "flood_sent": flood.sent - sent0,
        "flood_refused_401": refused[401],
        "flood_refused_429": refused[429],
        "flood_accepted": refused[202],
        "controller_cpu_cores": round(cpu / wall, 3),
        "seconds": round(wall, 1),
        "token_reviews": after["token_reviews"] - before["token_reviews"],
        "tokens_forged": after["tokens_forged"],
        "tokens_source_throttled": after["tokens_source_throttled"],
    }


def run(quick: bool = False) -> dict[str, Any]:
    binary = build_binary()
    with tempfile.TemporaryDirectory(prefix="bench-flood-") as tmp:
        cluster = KubeTestCluster.start(Path(tmp) / "kube", binary)
        try:
            return asyncio.run(_scenario(cluster, Path(tmp), 24 if quick else AGENTS))
        finally:
            cluster.stop()
