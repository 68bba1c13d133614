"""Controller at fleet scale, loaded as a cluster loads it: 4,096 nodes (32,768 GPUs, 512
LeaderWorkerSet groups of 8) on loopback.

Set-up on the test cluster (real kube-apiserver + etcd, see bench/fleet.py): 4,096 Node
objects of a GPU node's size, 512 groups of 8 LWS pods Ready with our readiness gate, one
agent pod per node, the chart's RBAC, and a real controller process (TLS on, as its own
ServiceAccount). A load generator plays every agent with that node's own report token,
bound to its agent pod (so TokenReview runs per node, at the cache's rate, and the
node-binding check runs on every report), at the agents' default heartbeat (10 s) spread
over the period, retrying after ``Retry-After`` on 429 as the agent does. After a warm-up,
5 % of the nodes report a lost GPU within one second; the policy (no ``for:`` delay) fails
over every group they belong to, and a watch on the API server sees it happen.

Figures:
- ``nodes``: nodes whose reports the controller accepted; ``gpus``: GPUs in those reports;
- ``reports_per_second``: reports accepted per second over one steady heartbeat period
  after the warm-up, and ``cpu_us_per_report``: the controller's CPU time over that period
  (everything it did: reports, token reviews, watches, evaluations) per accepted report
  (``BENCH_PROFILE=FILE`` records that period with py-spy);
- ``decision_ms_p99`` (and p50, max): from the load generator sending a node's lost-GPU
  report to a watch on the API server seeing our readiness gate False on a pod of its group
  — the whole path a user would time;
- ``decision_internal_ms_p99``: report received → first API request of the action sent,
  measured inside the controller;
- ``reports_dropped``: reports the load generator could not deliver or that were not
  answered 202 (timeouts, errors, 4xx/5xx) after the warm-up;
- ``rss_mib``: the controller's resident memory at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from kubernetes_asyncio import client, watch

from bench.agent_footprint import _cpu_seconds, _rss_mib
from bench.fleet import SERVING, Fleet, populate
from bench.harness import ControllerProcess, gpu_finding, node_report
from supervisor.controller.model import READINESS_GATE
from tests.kubeenv import manifests
from tests.kubeenv.cluster import KubeTestCluster, build_binary

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


class LoadGenerator:
    """Every agent: its own token, boot and sequence; one report per node per heartbeat."""

    def __init__(self, url: str, fleet: Fleet) -> None:
        self.url = url + "/v1/reports/node"
        self.fleet = fleet
        started = time.time()
        self.boots = {node: {"id": f"boot-{node}", "started_at": started}
                      for node in fleet.nodes}
        self.sequence = dict.fromkeys(fleet.nodes, 0)
        self.faulty: dict[str, list[dict[str, Any]]] = {}
        self.counting = False  # drops count once the warm-up is over
        self.sent = 0
        self.dropped = 0
        self.throttled = 0  # 429s (retried after Retry-After, as the agent does)
        self.burst_sent: dict[str, float] = {}  # node → monotonic send time of its fault
        # Nodes whose reports go over connections of their own, as each real agent's do:
        # their lost-GPU report must not queue behind other agents' in a shared pool.
        self.own: dict[str, aiohttp.ClientSession] = {}

    async def _post(self, session: aiohttp.ClientSession, node: str) -> None:
        session = self.own.get(node, session)
        headers = {"Authorization": f"Bearer {self.fleet.tokens[node]}",
                   "Content-Type": "application/json"}
        for _ in range(5):
            self.sequence[node] += 1
            body = json.dumps(node_report(node, self.faulty.get(node, []),
                                          self.sequence[node], boot=self.boots[node]))
            status = 0
            try:
                async with session.post(self.url, data=body, headers=headers,
                                        timeout=aiohttp.ClientTimeout(total=5)) as resp:
                    await resp.read()
                    status = resp.status
                    retry_after = float(resp.headers.get("Retry-After", "1"))
            except (aiohttp.ClientError, TimeoutError):
                pass
            if status != 429:
                break
            self.throttled += 1
            await asyncio.sleep(min(retry_after, HEARTBEAT))
        self.sent += 1
        if status != 202 and self.counting:
            self.dropped += 1

    async def heartbeat(self, session: aiohttp.ClientSession, duration: float) -> None:
        """Every node once per HEARTBEAT seconds, spread evenly, for ``duration`` seconds."""
        start = time.monotonic()
        nodes = self.fleet.nodes
        gap = HEARTBEAT / len(nodes)
        tasks: set[asyncio.Task[None]] = set()
        i = 0
        while time.monotonic() - start < duration:
            delay = start + i * gap - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(self._post(session, nodes[i % len(nodes)]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
        await asyncio.gather(*tasks)

    async def burst(self, session: aiohttp.ClientSession, nodes: list[str]) -> None:
        """These nodes report a lost GPU, all within one second."""
        gap = 1.0 / len(nodes)
        tasks = []
        for node in nodes:
            # Faulty from this report on: no heartbeat carries it earlier than the time
            # taken here (decision latency is measured from it).
            self.faulty[node] = [gpu_finding(node, 3)]
            self.burst_sent[node] = time.monotonic()
            tasks.append(asyncio.create_task(self._post(session, node)))
            await asyncio.sleep(gap)
        await asyncio.gather(*tasks)


class GateWatch:
    """A watch on the serving pods in a process of its own (as a user's tooling would hold
    one; in the load generator's process its event loop's lag would be measured too): when
    each group first shows our readiness gate False. Times are CLOCK_MONOTONIC, which all
    processes on the machine share."""

    def __init__(self, fleet: Fleet, kubeconfig: Path) -> None:
        self.fleet = fleet
        self.gated: dict[int, float] = {}  # group → monotonic time first seen gated
        self._proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; from bench.controller_scale import "
             "watch_gates; watch_gates(sys.argv[1])", str(kubeconfig)],
            stdout=subprocess.PIPE, text=True)

    def wait_ready(self) -> None:
        assert self._proc.stdout is not None
        if self._proc.stdout.readline().strip() != "watching":
            raise RuntimeError("the gate watch did not start")

    def stop(self) -> None:
        self._proc.terminate()
        out, _ = self._proc.communicate(timeout=30)
        for line in out.splitlines():
            seen, _, pod = line.partition(" ")
            group = self.fleet.pod_group.get(pod)
            if group is not None and group not in self.gated:
                self.gated[group] = float(seen)


def watch_gates(kubeconfig: str) -> None:
    """The watch process: prints ``watching``, then ``<monotonic> <pod>`` for every pod event
    that shows our gate False, until terminated."""
    import signal

    async def main() -> None:
        from kubernetes_asyncio import config

        api = await config.new_client_from_config(config_file=kubeconfig)
        async with api:
            core = client.CoreV1Api(api)
            listed = await core.list_namespaced_pod(SERVING, limit=1)
            print("watching", flush=True)
            async with watch.Watch() as w:
                async for event in w.stream(core.list_namespaced_pod, SERVING,
                                            resource_version=listed.metadata.resource_version,
                                            timeout_seconds=3600, _request_timeout=3700):
                    seen = time.monotonic()
                    pod = event["object"]
                    if any(c.type == READINESS_GATE and c.status == "False"
                           for c in pod.status.conditions or []):
                        print(f"{seen} {pod.metadata.name}", flush=True)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    asyncio.run(main())


def _place(controller: int, control_plane: list[int]) -> None:
    """As deployed, the controller has a node's CPU to itself; the agents and the API
    server are other machines. Here they share two cores: give the controller one (with
    BENCH_SHARED_CPUS=1, leave everything to the scheduler)."""
    cpus = sorted(os.sched_getaffinity(0))
    if os.environ.get("BENCH_SHARED_CPUS") or len(cpus) < 2:
        return
    own, rest = {cpus[-1]}, set(cpus[:-1])

    def pin(pid: int, where: set[int]) -> None:
        for task in Path(f"/proc/{pid}/task").iterdir():  # every thread (Go has many)
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(int(task.name), where)

    pin(controller, own)
    for pid in [*control_plane, os.getpid()]:
        pin(pid, rest)


def _profile(pid: int, seconds: float) -> subprocess.Popen[bytes] | None:
    """With BENCH_PROFILE=FILE, py-spy samples the controller over the measured period into
    FILE (collapsed stacks, for flame graphs or a sort by self time)."""
    out = os.environ.get("BENCH_PROFILE")
    if not out:
        return None
    return subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--duration",
                             str(max(1, int(seconds))), "--format", "raw", "--output", out,
                             "--nonblocking"], stdout=subprocess.DEVNULL)


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "max": None}
    ordered = sorted(values)
    return {"p50": round(statistics.median(ordered), 1),
            "p99": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 1),
            "max": round(ordered[-1], 1)}


async def _scenario(cluster: KubeTestCluster, workdir: Path, nodes: int, group_size: int,
                    warmup: float, settle: float) -> dict[str, Any]:
    async with await cluster.api_client() as admin:
        release = await manifests.install_rbac(admin)
        fleet = await populate(admin, nodes, group_size, release.namespace,
                               release.service_account("agent"))
    ctl_token = await cluster.service_account_token(release.namespace,
                                                    release.service_account("controller"))
    kubeconfig = cluster.write_kubeconfig(workdir / "kc", ctl_token)
    ctl = ControllerProcess(workdir, kubeconfig, "bench", policy=POLICY,
                            settings=release.controller_settings(
                                # the shipped defaults, not the test suite's short Lease
                                lease_duration_seconds=15.0, renew_deadline_seconds=10.0,
                                retry_period_seconds=2.0, evaluation_interval_seconds=1.0))
    await asyncio.to_thread(ctl.start)
    assert ctl.proc is not None
    _place(ctl.proc.pid, cluster.pids)
    watcher = GateWatch(fleet, cluster.write_kubeconfig(workdir / "kc-watch",
                                                         cluster.admin_token))
    try:
        while True:  # leader, state loaded, watches synced
            status = await asyncio.to_thread(ctl.status)
            if status["leader"] and status["state_loaded"] and status["groups"] == \
                    nodes // group_size:
                break
            await asyncio.sleep(0.2)
        gen = LoadGenerator(ctl.report_url, fleet)
        burst_nodes = random.Random(7).sample(fleet.nodes, max(1, nodes * 5 // 100))
        conn = aiohttp.TCPConnector(limit=256, ssl=ctl.tls or True)
        own = aiohttp.TCPConnector(limit=0, ssl=ctl.tls or True)
        async with aiohttp.ClientSession(connector=conn) as session, \
                aiohttp.ClientSession(connector=own) as burst_session:
            gen.own = dict.fromkeys(burst_nodes, burst_session)
            await asyncio.to_thread(watcher.wait_ready)
            steady = asyncio.create_task(gen.heartbeat(session, warmup + HEARTBEAT + settle))
            await asyncio.sleep(warmup)
            gen.counting = True
            # Steady state, one heartbeat period: what every report costs the controller.
            assert ctl.proc is not None
            before = (await asyncio.to_thread(ctl.status))["reports"].get("accepted", 0)
            cpu_before = _cpu_seconds(ctl.proc.pid)
            measured_from = time.monotonic()
            profile = _profile(ctl.proc.pid, HEARTBEAT)
            await asyncio.sleep(HEARTBEAT)
            cpu = _cpu_seconds(ctl.proc.pid) - cpu_before
            measured_for = time.monotonic() - measured_from
            accepted = (await asyncio.to_thread(ctl.status))["reports"].get("accepted", 0) \
                - before
            if profile is not None:
                await asyncio.to_thread(profile.wait)
            # Then the burst, timed from outside.
            await gen.burst(session, burst_nodes)
            await steady
            status = await asyncio.to_thread(ctl.status)
        assert ctl.proc is not None
        rss = _rss_mib(ctl.proc.pid)
    finally:
        ctl.stop()
        watcher.stop()
        keep = os.environ.get("BENCH_KEEP_LOG")
        if keep:
            shutil.copy(ctl.log_path, keep)
    first_sent: dict[int, float] = {}
    for node, sent in gen.burst_sent.items():
        group = fleet.group_of(node)
        first_sent[group] = min(sent, first_sent.get(group, sent))
    outside = [(watcher.gated[g] - t) * 1000 for g, t in first_sent.items()
               if g in watcher.gated]
    lat = _percentiles(outside)
    inside = status["decision_latency_ms"]
    return {
        "nodes": status["nodes_reporting"],
        "gpus": status["gpus_reported"],
        "groups": status["groups"],
        "burst_nodes": len(burst_nodes),
        "groups_affected": len(first_sent),
        "groups_seen_failed_over": len(outside),
        "reports_per_second": round(accepted / measured_for, 1),
        # everything the controller did over one steady heartbeat period (reports, token
        # reviews, watches, evaluations, its /status) over the reports it accepted
        "cpu_us_per_report": round(cpu * 1e6 / max(1, accepted), 1),
        "reports_sent": gen.sent,
        "reports_throttled": gen.throttled,
        "reports_dropped": gen.dropped,
        "token_reviews": status["token_reviews"],
        "decision_ms_p50": lat["p50"],
        "decision_ms_p99": lat["p99"],
        "decision_ms_max": lat["max"],
        "decision_internal_ms_p50": inside["p50"],
        "decision_internal_ms_p99": inside["p99"],
        "decision_internal_ms_max": inside["max"],
        "evaluation_ms_p50": status["evaluation_ms"]["p50"],
        "evaluation_ms_max": status["evaluation_ms"]["max"],
        "rss_mib": round(rss, 1),
    }


def run(quick: bool = False) -> dict[str, Any]:
    nodes = 512 if quick else 4096
    binary = build_binary()
    with tempfile.TemporaryDirectory(prefix="bench-ctl-") as tmp:
        cluster = KubeTestCluster.start(Path(tmp) / "kube", binary)
        try:
            # The warm-up covers every agent's first report, whose token the controller
            # reviews at token_reviews_per_second (100/s): 41 s for 4,096 new tokens.
            warmup = 2 * HEARTBEAT + nodes / 100
            return asyncio.run(_scenario(cluster, Path(tmp), nodes, 8, warmup=warmup,
                                         settle=10.0))
        finally:
            cluster.stop()
