"""Controller at fleet scale, loaded as a cluster loads it: 4,096 nodes (32,768 GPUs, 512
LeaderWorkerSet groups of 8) on loopback.

Set-up on the test cluster (real kube-apiserver + etcd, see bench/fleet.py): 4,096 Node
objects of a GPU node's size, 512 groups of 8 LWS pods Ready with our readiness gate, one
agent pod per node, the chart's RBAC, and a real controller process (TLS on, as its own
ServiceAccount). A load generator plays every agent as the agent reports: a stream (a
WebSocket over TLS) per agent with that node's own report token, bound to its agent pod (so
TokenReview runs per node and the node-binding check runs on every report), the full report
first, then a tick per heartbeat (10 s, the default) spread over the period; 429 on the
handshake is retried after ``Retry-After``, as the agent does; streams reconnect with a
rotated token at a steady fleet's rate (see ``LoadGenerator``). After a warm-up and one
measured heartbeat period, 60 nodes of distinct groups report a lost GPU one at a time (4 a
second), then — a storm — 5 % of the nodes (other groups) within one second; the policy (no
``for:`` delay) fails over every group they belong to, and a watch on the API server, in a
process of its own, sees it happen.

Figures:
- ``nodes``: nodes whose reports the controller accepted; ``gpus``: GPUs in those reports;
- ``reports_per_second``: reports accepted per second over one steady heartbeat period
  after the warm-up, and ``cpu_us_per_report``: the controller's CPU time over that period
  (everything it did: reports, token reviews, watches, evaluations) per accepted report
  (``BENCH_PROFILE=FILE`` records that period with py-spy);
- ``decision_ms_p99`` (and p50, max): for the faults one at a time, from the load
  generator sending a node's lost-GPU report to a watch on the API server seeing our
  readiness gate False on a pod of its group — the whole path a user would time;
- ``burst_decision_ms_p99`` (and p50, max): the same for the storm's groups (first report
  of the group sent → its gate seen). Every group costs the API server at least one pod
  status write; the storm's p99 is bounded by how fast the API server takes them;
- ``decision_internal_ms_p99``: report received → the action's first API request
  answered, measured inside the controller, over all faults;
- ``reports_dropped``: after the warm-up, reports the load generator could not deliver
  (connection refused or broken, stream ended by the controller) or that the controller
  refused;
- ``reconnects_measured``: streams reconnected (with a new token) in the measured period;
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

from bench.agent_footprint import _cpu_seconds, _rss_mib
from bench.fleet import SERVING, Fleet, agent_token, bounded, populate
from simulator.controlplane.cluster import KubeTestCluster, build_binary
from simulator.processes import ControllerProcess, gpu_finding, node_report
from supervisor.config import ControllerSettings, ReportingSettings
from supervisor.controller.model import READINESS_GATE
from supervisor.tls import lean_tls_buffers
from tests.kubeenv import manifests

POLICY = """
budgets: {max_groups_disrupted: 512, min_healthy_groups: 0}
circuit_breaker: {max_actions: 100000, window: 1m}
rules:
  - name: gpu-lost
    when: {fault_classes: [gpu_lost], min_severity: critical, scope: group, for: 0s}
    then:
      - action: fail_over
"""
# The daemons' defaults, as shipped: the agents' heartbeat, the controller's review rate
# for new tokens and the life of a report stream.
HEARTBEAT = ReportingSettings().heartbeat_seconds
REVIEWS_PER_SECOND = ControllerSettings().token_reviews_per_second
STREAM_SECONDS = ControllerSettings().report_stream_seconds
SINGLE_FAULTS = 60  # faults one at a time, on distinct groups
SINGLE_FAULT_SECONDS = 15.0  # ... over this long (4 a second)


class LoadGenerator:
    """Every agent, as the agent reports: a stream of its own to the controller (its own
    token, boot and sequence; 429 on the handshake retried after Retry-After), the full
    report first and on every change, a tick each heartbeat otherwise.

    A steady fleet's streams are of every age, so some reconnect at any moment (each once
    per ``report_stream_seconds``, with a token the kubelet has rotated meanwhile): after
    the warm-up each agent reconnects at a random time within that period, with a new
    token bound to its pod, so the measured period pays its share of TLS handshakes and
    TokenReviews."""

    def __init__(self, url: str, fleet: Fleet, tls: Any) -> None:
        self.url = "ws" + url.removeprefix("http") + "/v1/reports/node/stream"  # wss for https
        self.fleet = fleet
        self.tls = tls
        started = time.time()
        self.boots = {node: {"id": f"boot-{node}", "started_at": started}
                      for node in fleet.nodes}
        self.sequence = dict.fromkeys(fleet.nodes, 0)
        self.wake = {node: asyncio.Event() for node in fleet.nodes}
        self.faulty: dict[str, list[dict[str, Any]]] = {}
        self.reconnect_at: dict[str, float] = {}  # node → monotonic time of its reconnect
        self.renewed: dict[str, str] = {}  # node → the rotated token it reconnects with
        self.until = float("inf")  # when the agents stop (monotonic)
        self.counting = False  # drops count once the warm-up is over
        self.sent = 0
        self.connects = 0
        self.reconnects = 0  # after the warm-up
        self.dropped = 0
        self.throttled = 0  # 429s on the handshake (retried after Retry-After)
        self.fault_sent: dict[str, float] = {}  # node → monotonic time its fault was due

    def _drop(self) -> None:
        if self.counting:
            self.dropped += 1

    async def agent(self, session: aiohttp.ClientSession, node: str, start_at: float
                    ) -> None:
        """One agent from ``start_at`` (monotonic) until ``self.until``."""
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        token = self.fleet.tokens[node]
        while time.monotonic() < self.until:
            try:
                ws = await session.ws_connect(self.url, ssl=self.tls, headers={
                    "Authorization": f"Bearer {token}"}, timeout=aiohttp.ClientWSTimeout(
                        ws_close=5.0))
            except aiohttp.WSServerHandshakeError as exc:
                if exc.status == 429:
                    self.throttled += 1
                    retry = exc.headers.get("Retry-After", "1") if exc.headers else "1"
                    await asyncio.sleep(min(float(retry), 60.0))  # as the agent does
                    continue
                self._drop()
                await asyncio.sleep(1.0)
                continue
            except (aiohttp.ClientError, OSError, TimeoutError):
                self._drop()
                await asyncio.sleep(1.0)
                continue
            self.connects += 1
            async with ws:
                try:  # the controller opens with its epoch, which reports echo
                    hello = json.loads((await ws.receive(timeout=10.0)).data)
                    epoch = str(hello["epoch"])
                except (TypeError, ValueError, KeyError, TimeoutError):
                    self._drop()
                    continue
                reader = asyncio.create_task(self._replies(ws))
                try:
                    reconnect = await self._stream(ws, node, epoch)
                finally:
                    await ws.close()
                    await reader
            if reconnect:
                self.reconnects += 1
                token = self.renewed.get(node, token)

    async def _stream(self, ws: aiohttp.ClientWebSocketResponse, node: str, epoch: str
                      ) -> bool:
        """Reports on ``ws`` until ``self.until``; True when it is this agent's time to
        reconnect."""
        wake = self.wake[node]
        wake.set()  # the full state first
        while not ws.closed:
            if wake.is_set():
                wake.clear()
                body = node_report(node, self.faulty.get(node, []), 0, boot=self.boots[node],
                                   epoch=epoch)
            else:
                body = {"kind": "Tick", "sent_at": time.time()}
            self.sequence[node] += 1
            body["sequence"] = self.sequence[node]
            try:
                await ws.send_str(json.dumps(body))
            except ConnectionError:
                self._drop()
                return False
            self.sent += 1
            now = time.monotonic()
            due = min(now + HEARTBEAT, self.reconnect_at.get(node, self.until), self.until)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout=max(0.0, due - now))
            at = self.reconnect_at.get(node)
            if not wake.is_set() and at is not None and time.monotonic() >= at:
                del self.reconnect_at[node]
                return True
            if time.monotonic() >= self.until:
                return False
        self._drop()  # the controller ended the stream
        return False

    async def _replies(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT and json.loads(msg.data).get("status") != 202:
                self._drop()

    async def run(self, session: aiohttp.ClientSession) -> None:
        """Every agent, their heartbeats spread over the period, until ``self.until``."""
        # Connect at the rate the controller reviews new tokens (as a fleet rolling out
        # does), not all within one heartbeat: 16,384 agents at once would spend minutes
        # in 429s and TLS handshakes — a storm this bench does not measure (report_flood
        # does) and that would starve the API server sharing the load generator's core.
        start = time.monotonic()
        gap = max(HEARTBEAT / len(self.fleet.nodes), 1 / (0.9 * REVIEWS_PER_SECOND))
        await asyncio.gather(*(self.agent(session, node, start + i * gap)
                               for i, node in enumerate(self.fleet.nodes)))

    def plan_reconnects(self, rng: random.Random, window: float) -> dict[str, float]:
        """Each agent reconnects once per STREAM_SECONDS at a random phase: the nodes that
        do so within ``window`` seconds of the warm-up's end, and when."""
        offsets = {node: rng.uniform(0, STREAM_SECONDS) for node in self.fleet.nodes}
        return {node: at for node, at in offsets.items() if at < window}

    async def faults(self, nodes: list[str], seconds: float) -> None:
        """These nodes report a lost GPU, evenly over ``seconds``."""
        gap = seconds / len(nodes)
        for node in nodes:
            # Faulty from this report on: no heartbeat carries it earlier than the time
            # taken here (decision latency is measured from it).
            self.faulty[node] = [gpu_finding(node, 3)]
            self.fault_sent[node] = time.monotonic()
            self.wake[node].set()
            await asyncio.sleep(gap)


class GateWatch:
    """A watch on the serving pods in a process of its own (as a user's tooling would hold
    one; in the load generator's process its event loop's lag would be measured too): when
    each group first shows our readiness gate False. Times are CLOCK_MONOTONIC, which all
    processes on the machine share. Events are read as plain JSON: building client model
    objects for ~1,400 whole Pods would make the watch itself the slowest part."""

    def __init__(self, fleet: Fleet, cluster: KubeTestCluster) -> None:
        self.fleet = fleet
        self.gated: dict[int, float] = {}  # group → monotonic time first seen gated
        self._proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; from bench.controller_scale import "
             "watch_gates; watch_gates(*sys.argv[1:])", cluster.url, str(cluster.ca_file),
             cluster.admin_token], stdout=subprocess.PIPE, text=True)

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


def watch_gates(server: str, ca_file: str, token: str) -> None:
    """The watch process: prints ``watching``, then ``<monotonic> <pod>`` for every pod event
    that shows our gate False, until terminated."""
    import signal
    import ssl

    async def main() -> None:
        url = f"{server}/api/v1/namespaces/{SERVING}/pods"
        tls = ssl.create_default_context(cafile=ca_file)
        headers = {"Authorization": f"Bearer {token}"}
        async with aiohttp.ClientSession(headers=headers) as session:
            async with session.get(url, params={"limit": "1"}, ssl=tls) as resp:
                version = (await resp.json())["metadata"]["resourceVersion"]
            print("watching", flush=True)
            async with session.get(url, ssl=tls, timeout=aiohttp.ClientTimeout(total=None),
                                   params={"watch": "1", "resourceVersion": version,
                                           "timeoutSeconds": "3600"}) as resp:
                async for line in resp.content:
                    seen = time.monotonic()
                    pod = json.loads(line)["object"]
                    if any(c.get("type") == READINESS_GATE and c.get("status") == "False"
                           for c in pod.get("status", {}).get("conditions") or []):
                        print(f"{seen} {pod['metadata']['name']}", flush=True)

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


def _profile(pid: int, seconds: float, variable: str = "BENCH_PROFILE"
             ) -> subprocess.Popen[bytes] | None:
    """With BENCH_PROFILE=FILE, py-spy samples the controller at 1 kHz over the measured
    period into FILE (collapsed stacks, for flame graphs or a sort by self time); with
    BENCH_PROFILE_BURST=FILE, over the burst and the ten seconds after it."""
    out = os.environ.get(variable)
    if not out:
        return None
    return subprocess.Popen(["py-spy", "record", "--rate", "1000", "--pid", str(pid),
                             "--duration", str(max(1, int(seconds))), "--format", "raw",
                             "--output", out, "--nonblocking"], stdout=subprocess.DEVNULL)


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
                               release.service_account("agent"),
                               release.agent_pod_labels())
    ctl_token = await cluster.service_account_token(release.namespace,
                                                    release.service_account("controller"))
    kubeconfig = cluster.write_kubeconfig(workdir / "kc", ctl_token)
    ctl = ControllerProcess(workdir, kubeconfig, "bench", policy=POLICY,
                            settings=release.controller_settings(
                                # the shipped defaults, not the test suite's short Lease
                                lease_duration_seconds=15.0, renew_deadline_seconds=10.0,
                                retry_period_seconds=2.0, evaluation_interval_seconds=1.0,
                                # Every simulated agent connects from this one loopback
                                # address, where each real one has its own: its allowance
                                # is the whole review rate.
                                source_reviews_per_second=REVIEWS_PER_SECOND))
    await asyncio.to_thread(ctl.start)
    assert ctl.proc is not None
    _place(ctl.proc.pid, cluster.pids)
    watcher = GateWatch(fleet, cluster)
    try:
        while True:  # leader, state loaded, watches synced
            status = await asyncio.to_thread(ctl.status)
            if status["leader"] and status["state_loaded"] and status["groups"] == \
                    nodes // group_size:
                break
            await asyncio.sleep(0.2)
        gen = LoadGenerator(ctl.report_url, fleet, ctl.tls)
        rng = random.Random(7)
        # One fault at a time, then a storm: 5 % of the nodes (in other groups) at once.
        by_group: dict[int, list[str]] = {}
        for node in fleet.nodes:
            by_group.setdefault(fleet.group_of(node), []).append(node)
        groups = list(by_group)
        rng.shuffle(groups)
        single_nodes = [rng.choice(by_group[g]) for g in groups[:SINGLE_FAULTS]]
        spared = {n for g in groups[:SINGLE_FAULTS] for n in by_group[g]}
        burst_nodes = rng.sample([n for n in fleet.nodes if n not in spared],
                                 max(1, nodes * 5 // 100))
        after_warmup = HEARTBEAT + SINGLE_FAULT_SECONDS + settle + 1.0 + settle
        reconnects = gen.plan_reconnects(rng, after_warmup)
        async with await cluster.api_client() as admin:
            tokens = await bounded(32, [agent_token(
                admin, release.namespace, release.service_account("agent"),
                *fleet.agent_pods[node]) for node in reconnects])
        gen.renewed = dict(zip(reconnects, tokens, strict=True))
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            await asyncio.to_thread(watcher.wait_ready)
            steady = asyncio.create_task(gen.run(session))
            await asyncio.sleep(warmup)
            # Every agent admitted (token reviews run at their rate limit), then a heartbeat
            # period more, so each is in its steady rhythm.
            while (await asyncio.to_thread(ctl.status))["nodes_reporting"] < nodes:  # noqa: ASYNC110 (another process)
                await asyncio.sleep(1.0)
            await asyncio.sleep(HEARTBEAT)
            gen.until = time.monotonic() + after_warmup
            gen.counting = True
            now = time.monotonic()
            gen.reconnect_at = {node: now + at for node, at in reconnects.items()}
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
            reconnected = gen.reconnects
            if profile is not None:
                await asyncio.to_thread(profile.wait)
            # Then faults one at a time, and the storm, timed from outside.
            await gen.faults(single_nodes, SINGLE_FAULT_SECONDS)
            await asyncio.sleep(settle)
            profile = _profile(ctl.proc.pid, 11.0, "BENCH_PROFILE_BURST")
            await gen.faults(burst_nodes, 1.0)
            await steady
            if profile is not None:
                await asyncio.to_thread(profile.wait)
            status = await asyncio.to_thread(ctl.status)
        assert ctl.proc is not None
        rss = _rss_mib(ctl.proc.pid)
    finally:
        ctl.stop()
        watcher.stop()
        keep = os.environ.get("BENCH_KEEP_LOG")
        if keep:
            shutil.copy(ctl.log_path, keep)
    def seen(faulty: list[str]) -> tuple[dict[int, float], dict[str, float | None]]:
        """When each group's first fault was sent; and report sent → gate False seen."""
        first: dict[int, float] = {}
        for node in faulty:
            group, sent = fleet.group_of(node), gen.fault_sent[node]
            first[group] = min(sent, first.get(group, sent))
        return first, _percentiles([(watcher.gated[g] - t) * 1000 for g, t in first.items()
                                    if g in watcher.gated])

    single_groups, lat = seen(single_nodes)
    burst_groups, burst = seen(burst_nodes)
    inside = status["decision_latency_ms"]
    return {
        "nodes": status["nodes_reporting"],
        "gpus": status["gpus_reported"],
        "groups": status["groups"],
        "single_faults": len(single_groups),
        "single_faults_seen": sum(1 for g in single_groups if g in watcher.gated),
        "burst_nodes": len(burst_nodes),
        "burst_groups": len(burst_groups),
        "burst_groups_seen_failed_over": sum(1 for g in burst_groups if g in watcher.gated),
        "reports_per_second": round(accepted / measured_for, 1),
        # everything the controller did over one steady heartbeat period (reports, token
        # reviews, watches, evaluations, its /status) over the reports it accepted
        "cpu_us_per_report": round(cpu * 1e6 / max(1, accepted), 1),
        "reconnects_measured": reconnected,
        "reports_sent": gen.sent,
        "reports_throttled": gen.throttled,
        "reports_dropped": gen.dropped,
        "token_reviews": status["token_reviews"],
        "decision_ms_p50": lat["p50"],
        "decision_ms_p99": lat["p99"],
        "decision_ms_max": lat["max"],
        "burst_decision_ms_p50": burst["p50"],
        "burst_decision_ms_p99": burst["p99"],
        "burst_decision_ms_max": burst["max"],
        "decision_internal_ms_p50": inside["p50"],
        "decision_internal_ms_p99": inside["p99"],
        "decision_internal_ms_max": inside["max"],
        "evaluation_ms_p50": status["evaluation_ms"]["p50"],
        "evaluation_ms_max": status["evaluation_ms"]["max"],
        "rss_mib": round(rss, 1),
    }


def run(quick: bool = False) -> dict[str, Any]:
    lean_tls_buffers()  # the load generator holds a TLS stream per agent, as the controller
    nodes = 512 if quick else 4096
    binary = build_binary()
    with tempfile.TemporaryDirectory(prefix="bench-ctl-") as tmp:
        cluster = KubeTestCluster.start(Path(tmp) / "kube", binary)
        try:
            # After the warm-up the scenario also waits for every agent's first report,
            # whose token the controller reviews at token_reviews_per_second (100/s).
            return asyncio.run(_scenario(cluster, Path(tmp), nodes, 8, warmup=HEARTBEAT,
                                         settle=10.0))
        finally:
            cluster.stop()
