"""The simulator's container runtime: the real process behind every simulated pod.

kwok marks pods Running; nothing would run in them. :class:`Runtime` follows the pods on
the API server and runs what their containers would:

- the agent DaemonSet's pod on a node → ``gpu-supervisor agent`` on that node's NVML
  stand-in (its own GPUs, its own fault state), publishing NodeConditions as the agent
  ServiceAccount and reporting to the controllers with a token bound to that pod;
- each controller Deployment pod → ``gpu-supervisor controller`` (two replicas, one Lease),
  acting as the controller ServiceAccount;
- each inference pod → its part of the group's engine and ``gpu-supervisor sidecar``
  beside it, reporting as the pod's ServiceAccount with a token bound to it — laid out as
  ``deploy/examples/lws-vllm-with-sidecar.yaml`` ships a group: the leader pod (rank 0)
  runs the stand-in engine's API server (a vLLM look-alike) and its sidecar probes it;
  each worker pod runs a worker process with no HTTP at all, which the leader's engine
  needs at every step over TCP between the two pods' addresses, and its sidecar has engine
  probing off (it watches the group's reachability). A stopped, killed or cut-off worker
  is seen, as in production, only as the leader's engine stalling or dying. A model on
  real vLLM (``engine: vllm``) runs the same layout with vLLM itself: the leader pod's
  ``vllm serve --node-rank 0`` (API server, engine core, first pipeline stage), each
  worker pod's ``--headless`` stage (:class:`~simulator.processes.VllmNodeProcess`).

Processes listen on loopback: the two controllers on 127.0.0.2 and 127.0.0.3 (same report
port; the reporters are given both addresses, as a headless Service would resolve); each
node has an address of its own, 127.0.1.N, on which its pod's sidecar exchanges the group's
heartbeats — so a cut between two nodes is an iptables rule between two addresses
(:meth:`Runtime.cut`). A pod's processes start once every member of its group is scheduled
(its peers' addresses follow from their nodes). A pod's IP in the API is kwok's;
:attr:`Runtime.engines` maps it to the engine that serves it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import structlog

from simulator.processes import (
    AgentProcess,
    ControllerProcess,
    EngineProcess,
    EngineWorkerProcess,
    SidecarProcess,
    VllmNodeProcess,
    free_port,
    merged,
    metric_value,
    report_tls,
)
from simulator.starve import cpu_quota, throttled_seconds
from simulator.world import (
    FALLBACK_LABEL,
    GROUP_LABEL,
    REPORT_AUDIENCE,
    SERVING,
    SYSTEM,
    GroupRef,
    token_for_pod,
)
from supervisor.errors import KubeError
from supervisor.kube import KubeClient, rfc3339
from supervisor.metrics import P

log = structlog.get_logger("simulator")

CONTROLLER_HOSTS = ("127.0.0.2", "127.0.0.3")
PEER_PORT = 18088  # every node's sidecar heartbeats on its node's own address
CUT_TAG = "gpu-supervisor-simulate"  # the comment on our iptables rules, with our pid
REPORT_HOST = "localhost"  # the name on the report certificate; the addresses are listed
PLEG_RELIST_S = 1.0  # unsupervised: how often the played kubelet looks for exited containers


@dataclass
class Probe:
    """One container's readiness probe, as the pod spec states it."""

    url: str
    period: float
    failure_threshold: int
    due: float = 0.0  # on the event loop's clock: the first after initialDelaySeconds
    tcp: bool = False  # a tcpSocket probe: the port accepting a connection is a pass
    failures: int = 0
    ready: bool = False


@dataclass
class PodProcesses:
    uid: str
    node: str
    # The API server on a leader, else a worker; a stand-in's or a real vLLM's part.
    engine: EngineProcess | EngineWorkerProcess | VllmNodeProcess
    sidecar: SidecarProcess | None  # a fallback model's pod runs its engine alone
    probes: list[Probe] = field(default_factory=list)
    containers_ready: bool = False  # what we last wrote
    exited: float | None = None  # unsupervised: when the engine's container was seen gone


class Stall:
    """One process held back with SIGSTOP/SIGCONT from a thread of its own (the way a
    debugger would freeze it): stopped for good, or run ``share`` of each slice.

    The slice is long because short ones hardly slow an all-reduce: loopback's socket
    buffers take a peer's whole message while the rank is stopped, and the rank catches
    up within its next few milliseconds. Stopped for most of every 200 ms, each step of a
    ring all-reduce waits for it."""

    SLICE_SECONDS = 0.2

    def __init__(self, pid: int, share: float) -> None:
        self.pid = pid
        self.share = share
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"stall-{pid}", daemon=True)

    def start(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)
        if self.share > 0:
            self._thread.start()

    def _run(self) -> None:
        run, stop = self.SLICE_SECONDS * self.share, self.SLICE_SECONDS * (1 - self.share)
        try:
            while not self._done.is_set():
                os.kill(self.pid, signal.SIGCONT)
                time.sleep(run)
                os.kill(self.pid, signal.SIGSTOP)
                time.sleep(stop)
        except ProcessLookupError:
            return  # the worker is gone (its pod was deleted): nothing left to hold

    def end(self) -> None:
        self._done.set()
        if self._thread.is_alive():
            self._thread.join()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGCONT)


def _container_gone(engine: EngineProcess | EngineWorkerProcess | VllmNodeProcess) -> bool:
    """Whether the engine's container has exited. A stand-in worker's process plays the
    rank only: in the example the worker pod's container runs ``ray start --block``, which
    outlives the rank's process (a Ray actor), so a rank lost there ends no container and
    restarts no group — the leader's engine holds its step until its own timeout. A
    leader's engine process, or a real vLLM node's main process, is its container's."""
    if isinstance(engine, EngineWorkerProcess):
        return False
    return engine.proc is not None and engine.proc.poll() is not None


def _probes(pod: dict[str, Any], urls: dict[str, str]) -> list[Probe]:
    """Each container's readiness probe as its spec states it (httpGet or tcpSocket, period,
    failure threshold, initial delay), against the process that plays the container."""
    out: list[Probe] = []
    now = asyncio.get_running_loop().time()
    for container in pod["spec"]["containers"]:
        spec = container.get("readinessProbe")
        if not spec or container["name"] not in urls:
            continue
        tcp = "tcpSocket" in spec
        out.append(Probe(urls[container["name"]] + ("" if tcp else spec["httpGet"]["path"]),
                         float(spec.get("periodSeconds", 10)),
                         int(spec.get("failureThreshold", 3)),
                         due=now + float(spec.get("initialDelaySeconds", 0)), tcp=tcp))
    return out


class Starving:
    """A sidecar held to ``millicores`` of CPU for ``seconds`` by a cgroup quota of its own
    (a small ``resources.limits.cpu`` beside an engine that fills the host), from a thread
    that keeps the group open and asks the sidecar for more work than the quota pays for
    (its metrics and status, back to back); afterwards :attr:`throttled` is how long the
    kernel held the sidecar back and :attr:`pauses` how many late wakes it counted."""

    def __init__(self, sidecar: SidecarProcess, millicores: int, seconds: float) -> None:
        assert sidecar.proc is not None
        self.sidecar = sidecar
        self.pid = sidecar.proc.pid
        self.millicores = millicores
        self.seconds = seconds
        self.throttled: float | None = None
        self.pauses: int | None = None
        self.error = ""
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"starve-{self.pid}",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        before = self._pauses()
        try:
            with cpu_quota(self.pid, self.millicores) as group:
                end = time.monotonic() + self.seconds
                # Work beyond the quota, or the limit would never bite an idle sidecar:
                # its metrics and status asked for back to back (a scraper gone wild).
                while not self._done.is_set() and time.monotonic() < end:
                    if self.sidecar.proc is None or self.sidecar.proc.poll() is not None:
                        self.error = "the sidecar exited (its pod deleted)"
                        break
                    try:
                        self.sidecar.get("/metrics", timeout=2.0)
                        self.sidecar.get("/status", timeout=2.0)
                    except Exception:  # whatever went wrong: try again shortly
                        self._done.wait(0.1)  # not answering: no busy loop of our own
                self.throttled = throttled_seconds(group)
        except (OSError, RuntimeError) as e:  # no cgroup to use, or the sidecar gone
            self.error = str(e)
            return
        after = self._pauses()
        if before is not None and after is not None:
            self.pauses = after - before

    def _pauses(self) -> int | None:
        try:
            value = metric_value(self.sidecar.metrics(), f"{P}sidecar_pauses_total")
        except OSError:
            return None
        return None if value is None else int(value)

    def end(self) -> None:
        self._done.set()
        if self._thread.is_alive():
            self._thread.join()

    def result(self) -> str:
        """What the starvation did, once it is over."""
        if self.throttled is None:
            return f"the sidecar was never held back: {self.error}"
        held = (f"the kernel held the sidecar back {self.throttled:.1f} s of "
                f"{self.seconds:g} s at {self.millicores}m")
        if self.error:
            return f"ended early ({self.error}); {held}"
        if self.pauses is None:
            return held
        return f"{held}; the sidecar counted {self.pauses} pause" + \
            ("" if self.pauses == 1 else "s")


@dataclass
class Runtime:
    workdir: Path
    kube: KubeClient
    api_url: str
    ca_file: Path
    groups: list[GroupRef]
    gpus: int
    agent_settings: dict[str, Any]
    controller_settings: dict[str, Any]
    policy: str
    topology: dict[str, Any] | None
    sidecar_settings: dict[str, Any] = field(default_factory=dict)  # merged over each pod's
    agents: dict[str, AgentProcess] = field(default_factory=dict)
    controllers: dict[str, ControllerProcess] = field(default_factory=dict)
    pods: dict[str, PodProcesses] = field(default_factory=dict)  # pod name → its processes
    engines: dict[str, str] = field(default_factory=dict)  # pod IP → engine URL
    node_ips: dict[str, str] = field(default_factory=dict)  # node → its loopback address
    cuts: list[list[str]] = field(default_factory=list)  # iptables rules in place
    stalls: list[Stall | Starving] = field(default_factory=list)  # processes held back
    store_ports: dict[str, int] = field(default_factory=dict)  # group → rendezvous port
    worker_ports: dict[str, int] = field(default_factory=dict)  # group → its workers' port
    # Whether a new leader's engine loads its model (its model's load_seconds) before it
    # serves: off while the cluster first comes up (the run starts from a serving cluster),
    # on once it serves — every pod created after that is a recreated one.
    loading: bool = False
    report_port: int = 0
    vllm_python: str = ""  # the vLLM venv's interpreter, when a model runs on real vLLM
    # False: today's stack, measured beside us — no sidecar in the pods, and the kubelet's
    # restart of an exited engine container played, on which LWS recreates the group.
    supervised: bool = True

    def __post_init__(self) -> None:
        self.tls_dir = report_tls(self.workdir / "report-tls")
        self.report_port = free_port(CONTROLLER_HOSTS[0])

    def node_ip(self, node: str) -> str:
        if node not in self.node_ips:
            self.node_ips[node] = f"127.0.1.{len(self.node_ips) + 1}"
        return self.node_ips[node]

    # --- credentials ---------------------------------------------------------------------

    def _kubeconfig(self, name: str, token: str) -> Path:
        path = self.workdir / "kubeconfigs" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            "apiVersion: v1\nkind: Config\n"
            f"clusters: [{{name: sim, cluster: {{server: '{self.api_url}', "
            f"certificate-authority: '{self.ca_file}'}}}}]\n"
            f"users: [{{name: {name}, user: {{token: '{token}'}}}}]\n"
            f"contexts: [{{name: sim, context: {{cluster: sim, user: {name}}}}}]\n"
            "current-context: sim\n")
        path.chmod(0o600)
        return path

    async def _token_file(self, name: str, namespace: str, account: str,
                          pod: dict[str, Any]) -> Path:
        token = await token_for_pod(self.kube, namespace, account, pod, [REPORT_AUDIENCE])
        path = self.workdir / "tokens" / f"{name}.token"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(token)
        path.chmod(0o600)
        return path

    def _reporting(self, token_file: Path) -> dict[str, Any]:
        return {"controller_url": f"https://{REPORT_HOST}:{self.report_port}",
                "controller_addresses": list(CONTROLLER_HOSTS),
                "token_file": str(token_file), "ca_file": str(self.tls_dir / "ca.crt")}

    # --- the chart's daemons -------------------------------------------------------------

    async def start_controllers(self) -> None:
        """One controller per pod of the chart's Deployment, in pod-name order."""
        pods = await self._pods(SYSTEM, "app.kubernetes.io/component=controller")
        for host, pod in zip(CONTROLLER_HOSTS, sorted(pods, key=_name), strict=False):
            name = _name(pod)
            token = await token_for_pod(self.kube, SYSTEM, "gpu-supervisor-controller", pod,
                                        [])
            settings = {"controller": {**self.controller_settings,
                                       "report_listen": f"{host}:{self.report_port}",
                                       "namespace": SYSTEM},
                        "node_name": pod["spec"]["nodeName"]}
            proc = ControllerProcess(self.workdir / "controllers", self._kubeconfig(name, token),
                                     name, settings=settings, policy=self.policy,
                                     topology=self.topology, tls_dir=self.tls_dir, fast=False,
                                     listen=f"{host}:0")
            await asyncio.to_thread(proc.start, False)  # its reporters retry
            self.controllers[name] = proc

    async def start_agents(self) -> None:
        """One agent per pod of the chart's DaemonSet: on its node, with its node's GPUs."""
        pods = await self._pods(SYSTEM, "app.kubernetes.io/component=agent")

        async def one(pod: dict[str, Any]) -> None:
            node = pod["spec"]["nodeName"]
            token = await token_for_pod(self.kube, SYSTEM, "gpu-supervisor-agent", pod, [])
            report_token = await self._token_file(f"agent-{node}", SYSTEM,
                                                  "gpu-supervisor-agent", pod)
            settings = {**self.agent_settings,
                        "kubernetes": {"enabled": "true",
                                       "kubeconfig": str(self._kubeconfig(f"agent-{node}",
                                                                          token))},
                        "reporting": self._reporting(report_token),
                        "http": {"listen": "127.0.0.1:0"}}
            agent = AgentProcess(self.workdir / "agents" / node, gpus=self.gpus,
                                 settings=settings, node_name=node, fast=False)
            self.agents[node] = agent
            await asyncio.to_thread(agent.start, False)

        await asyncio.gather(*(one(p) for p in pods))

    async def _pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        found = await self.kube.request("GET", f"/api/v1/namespaces/{namespace}/pods",
                                        query={"labelSelector": selector})
        return [p for p in found.get("items", []) if p.get("spec", {}).get("nodeName")]

    # --- inference pods --------------------------------------------------------------------

    async def follow_pods(self) -> None:
        """Run each inference pod's engine and sidecar while the pod exists (a new UID is a
        new pod: fresh processes). Polls twice a second, as a kubelet's sync loop would."""
        by_name = {g.name: g for g in self.groups}
        while True:
            try:
                found = await self.kube.request("GET", f"/api/v1/namespaces/{SERVING}/pods")
            except KubeError as exc:
                # An API server too slow to answer within the client's deadline (both cores
                # busy): a kubelet's sync loop tries again at its next tick, so do we.
                log.warning("pods not listed", error=str(exc))
                await asyncio.sleep(0.5)
                continue
            live: dict[str, dict[str, Any]] = {}
            for pod in found.get("items", []):
                group = by_name.get(pod["metadata"].get("labels", {}).get(GROUP_LABEL, ""))
                if (group is None or pod["metadata"].get("deletionTimestamp")
                        or pod.get("status", {}).get("phase") != "Running"):
                    continue
                live[_name(pod)] = pod
            nodes = {name: pod["spec"]["nodeName"] for name, pod in live.items()}
            fallbacks = {_name(p): p for p in found.get("items", [])
                         if p["metadata"].get("labels", {}).get(FALLBACK_LABEL)
                         and not p["metadata"].get("deletionTimestamp")
                         and p.get("status", {}).get("phase") == "Running"}
            for name, procs in list(self.pods.items()):
                pod = live.get(name) or fallbacks.get(name)
                if pod is None or pod["metadata"]["uid"] != procs.uid:
                    await asyncio.to_thread(self._stop_pod, name)
            starts = []
            for name, pod in live.items():
                group = by_name[pod["metadata"]["labels"][GROUP_LABEL]]
                members = [nodes.get(group.pod_name(r)) for r in range(group.model.size)]
                leader = live.get(group.pod_name(0))
                if name not in self.pods and all(members) and leader is not None:
                    starts.append(self._start_pod(group, pod, [str(m) for m in members],
                                                  leader["metadata"]["uid"]))
            starts += [self._start_fallback(pod) for name, pod in fallbacks.items()
                       if name not in self.pods]
            for outcome in await asyncio.gather(*starts, return_exceptions=True):
                if isinstance(outcome, Exception):
                    log.warning("pod processes did not start", error=str(outcome))
            await asyncio.sleep(0.5)

    async def _start_pod(self, group: GroupRef, pod: dict[str, Any],
                         member_nodes: list[str], leader_uid: str) -> None:
        name = _name(pod)
        rank = int(pod["metadata"]["labels"]["sim.gpu-supervisor.io/rank"])
        workdir = self.workdir / "pods" / f"{name}-{pod['metadata']['uid'][:8]}"
        # Every worker of a group listens on its own node's address, all on one port.
        port = self.worker_ports.setdefault(group.name, free_port())
        engine: EngineProcess | EngineWorkerProcess | VllmNodeProcess
        if group.model.engine == "vllm":
            # One port per incarnation of the group (its leader's UID): the processes of
            # the one being deleted may still hold the last one's.
            master = self.node_ip(member_nodes[0])
            engine = VllmNodeProcess(
                workdir, host=self.node_ip(pod["spec"]["nodeName"]), node_rank=rank,
                nnodes=group.model.size, master=master,
                master_port=self.worker_ports.setdefault(f"{group.name}/{leader_uid}",
                                                         free_port(master)),
                cache=self.workdir / "vllm-cache", python=self.vllm_python)
        elif rank == 0:
            workers = [f"{self.node_ip(node)}:{port}" for node in member_nodes[1:]]
            extra: list[str] = []
            if workers:
                extra += ["--workers", ",".join(workers), "--bind",
                          self.node_ip(pod["spec"]["nodeName"])]
            if self.loading and group.model.load_seconds > 0:
                extra += ["--load-seconds", str(group.model.load_seconds)]
            engine = EngineProcess(workdir, name="engine", extra=extra)
        else:
            engine = EngineWorkerProcess(workdir, self.node_ip(pod["spec"]["nodeName"]), port)
        if not self.supervised:
            await asyncio.to_thread(engine.start)
            await self._run_alone(name, pod, engine)
            return
        token = await self._token_file(name, SERVING, "default", pod)  # before any process
        await asyncio.to_thread(engine.start)
        peers = [f"{self.node_ip(node)}:{PEER_PORT}" for node in member_nodes]
        lws = group.model.kind == "lws"
        settings = {
            "node_name": pod["spec"]["nodeName"],
            "sidecar": {"pod_name": name, "pod_namespace": SERVING,
                        "group_name": group.model.name if lws else group.model.kind,
                        "group_index": str(group.index) if lws else group.name,
                        "group_size": group.model.size, "rank": rank, "peers": peers,
                        "peer_listen": peers[rank]},
            # As the example configures them: the leader's sidecar probes the engine's API,
            # a worker's has none to probe.
            "engine": {"url": engine.url} if engine.url else {"enabled": False},
            "reporting": self._reporting(token),
        }
        settings = merged(settings, self.sidecar_settings)
        if settings.get("collective", {}).get("enabled"):
            # The leader's rendezvous store listens on every address (torch's TCPStore
            # does): on one machine, each group needs a port of its own.
            port = self.store_ports.setdefault(group.name, free_port())
            settings = merged(settings, {"collective": {"port": port}})
        sidecar = SidecarProcess(workdir, name, settings)
        try:
            await asyncio.to_thread(sidecar.start)
        except BaseException:
            engine.stop()
            raise
        urls = {"gpu-supervisor": sidecar.url}
        if engine.url:
            urls["engine"] = engine.url
        self.pods[name] = PodProcesses(pod["metadata"]["uid"], pod["spec"]["nodeName"],
                                       engine, sidecar, _probes(pod, urls))
        ip = pod.get("status", {}).get("podIP")
        if ip and engine.url:
            self.engines[ip] = engine.url

    async def _run_alone(self, name: str, pod: dict[str, Any],
                         engine: EngineProcess | EngineWorkerProcess | VllmNodeProcess) -> None:
        """An unsupervised pod: its engine and the kubelet's probe of it, nothing else."""
        urls = {"engine": engine.url} if engine.url else {}
        self.pods[name] = PodProcesses(pod["metadata"]["uid"], pod["spec"]["nodeName"],
                                       engine, None, _probes(pod, urls))
        ip = pod.get("status", {}).get("podIP")
        if ip and engine.url:
            self.engines[ip] = engine.url

    async def _start_fallback(self, pod: dict[str, Any]) -> None:
        """A fallback model's pod: its engine, nothing else (no group, no sidecar)."""
        name = _name(pod)
        engine = EngineProcess(self.workdir / "pods" / f"{name}-{pod['metadata']['uid'][:8]}",
                               name="engine")
        await asyncio.to_thread(engine.start)
        self.pods[name] = PodProcesses(pod["metadata"]["uid"], pod["spec"]["nodeName"], engine,
                                       None)
        ip = pod.get("status", {}).get("podIP")
        if ip:
            self.engines[ip] = engine.url

    async def probe_pods(self) -> None:
        """The kubelet's readiness prober: each container's probe at its period against the
        pod's real process (a failure is a non-2xx answer or none within 1 s, the default
        timeoutSeconds); ContainersReady written when the verdict changes. kwok then sets
        Ready from it and the readiness gates."""
        async with aiohttp.ClientSession() as session:
            relist = 0.0
            while True:
                now = asyncio.get_running_loop().time()
                # Container exits are seen at the kubelet's PLEG relist, once a second
                # (its generic PLEG's period).
                relisting = not self.supervised and now >= relist
                if relisting:
                    relist = now + PLEG_RELIST_S
                for name, procs in list(self.pods.items()):
                    if relisting and procs.exited is None and _container_gone(procs.engine):
                        await self._container_exited(name, procs)
                    if procs.exited is not None:
                        continue
                    due = [p for p in procs.probes if p.due <= now]
                    await asyncio.gather(*(self._probe(session, p, now) for p in due))
                    if procs.probes or self.supervised:
                        ready = bool(procs.probes) and all(p.ready for p in procs.probes)
                    else:  # no probe (a worker): ready while its container runs
                        ready = True
                    if ready != procs.containers_ready and self.pods.get(name) is procs:
                        await self._containers_ready(name, procs, ready)
                await asyncio.sleep(0.1)

    async def _container_exited(self, name: str, procs: PodProcesses) -> None:
        """Played for an unsupervised pod whose engine exited: the kubelet sees the
        container gone (its pod not ready at once) and restarts it; LeaderWorkerSet, told
        by the restart (``RecreateGroupOnPodRestart``), deletes the group's pods — the
        leader here, which the group keeper follows by recreating the whole group."""
        procs.exited = time.time()
        await self._containers_ready(name, procs, False)
        log.info("engine container exited: the group is recreated", pod=name,
                 code=procs.engine.proc.returncode if procs.engine.proc else None)
        leader = next((g.pod_name(0) for g in self.groups for rank in range(g.model.size)
                       if g.pod_name(rank) == name), name)
        with contextlib.suppress(KubeError):
            await self.kube.request("DELETE", f"/api/v1/namespaces/{SERVING}/pods/{leader}",
                                    body={"propagationPolicy": "Background"},
                                    ok_statuses=frozenset({404}))

    @staticmethod
    async def _probe(session: aiohttp.ClientSession, probe: Probe, now: float) -> None:
        probe.due = now + probe.period
        ok = False
        if probe.tcp:
            host, _, port = probe.url.rpartition("//")[2].rpartition(":")
            with contextlib.suppress(OSError, TimeoutError):
                _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 1)
                writer.close()
                ok = True
        else:
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                async with session.get(probe.url,
                                       timeout=aiohttp.ClientTimeout(total=1)) as resp:
                    ok = 200 <= resp.status < 400
        probe.failures = 0 if ok else probe.failures + 1
        if ok:
            probe.ready = True
        elif probe.failures >= probe.failure_threshold:
            probe.ready = False

    async def _containers_ready(self, name: str, procs: PodProcesses, ready: bool) -> None:
        body = {"status": {"conditions": [
            {"type": "ContainersReady", "status": "True" if ready else "False",
             "lastTransitionTime": rfc3339(time.time())}]}}
        try:
            await self.kube.request("PATCH", f"/api/v1/namespaces/{SERVING}/pods/{name}/status",
                                    body=body,
                                    content_type="application/strategic-merge-patch+json")
        except KubeError as exc:
            log.warning("readiness not written", pod=name, error=str(exc))
            return
        procs.containers_ready = ready

    def _stop_pod(self, name: str) -> None:
        procs = self.pods.pop(name)
        for ip, url in list(self.engines.items()):
            if procs.engine.url and url == procs.engine.url:
                del self.engines[ip]
        if procs.sidecar is not None:
            procs.sidecar.stop(timeout=5)
        procs.engine.stop(timeout=5)

    # --- faults ------------------------------------------------------------------------

    def cut(self, node: str, others: list[str]) -> list[list[str]]:
        """Cut the links between ``node`` and each of ``others``, both ways: everything
        between their addresses is dropped (iptables on loopback) — the group's heartbeats
        and the engine's own traffic between its leader and workers."""
        rules: list[list[str]] = []
        me = self.node_ip(node)
        for other in others:
            there = self.node_ip(other)
            for src, dst in ((me, there), (there, me)):
                rule = ["INPUT", "-i", "lo", "-s", src, "-d", dst,
                        "-m", "comment", "--comment", f"{CUT_TAG} pid={os.getpid()}",
                        "-j", "DROP"]
                subprocess.run(["iptables", "-w", "-I", *rule], check=True,
                               capture_output=True)
                rules.append(rule)
        self.cuts += rules
        return rules

    def stall_worker(self, pod: str, share: float = 0.0) -> Callable[[], None]:
        """Hold back the all-reduce worker of ``pod``'s sidecar: stopped outright (``share``
        0: a rank hung in a collective) or let run ``share`` of every 200 ms (a straggler,
        as a GPU held at a fraction of its clocks would make it). Returns what
        lets it run freely again; the stall also ends when the worker exits."""
        procs = self.pods[pod]
        assert procs.sidecar is not None
        pid = procs.sidecar.collective_worker()
        stall = Stall(pid, share)
        stall.start()
        self.stalls.append(stall)
        return stall.end

    def starve_sidecar(self, pod: str, millicores: int, seconds: float) -> Starving:
        """Hold ``pod``'s sidecar to ``millicores`` of CPU for ``seconds`` (a cgroup quota;
        root only); over by itself after ``seconds`` or at the run's end."""
        procs = self.pods[pod]
        assert procs.sidecar is not None
        starving = Starving(procs.sidecar, millicores, seconds)
        starving.start()
        self.stalls.append(starving)
        return starving

    @staticmethod
    def clear_stale_cuts() -> int:
        """Remove the cuts a simulation that no longer runs left behind (one killed with
        SIGKILL cannot remove its own): they would cut this run's links too. Rules of a
        simulation still running are left alone. How many were removed."""
        listed = subprocess.run(["iptables", "-w", "-S", "INPUT"], capture_output=True,
                                text=True, check=False)
        removed = 0
        for line in listed.stdout.splitlines():
            found = re.search(rf"{CUT_TAG} pid=(\d+)", line)
            if found is None or Path(f"/proc/{found.group(1)}").exists():
                continue
            rule = shlex.split(line)
            if rule[:1] == ["-A"]:
                subprocess.run(["iptables", "-w", "-D", *rule[1:]], capture_output=True,
                               check=False)
                removed += 1
        return removed

    def heal(self, rules: list[list[str]] | None = None) -> None:
        """Remove ``rules`` (default: every cut of ours)."""
        for rule in list(self.cuts if rules is None else rules):
            subprocess.run(["iptables", "-w", "-D", *rule], check=False, capture_output=True)
            if rule in self.cuts:
                self.cuts.remove(rule)

    def reboot_agent(self, node: str) -> None:
        """The node came back from a reboot: its agent starts again (a new boot id; the
        findings of the last boot are gone with it)."""
        agent = self.agents[node]
        agent.stop(timeout=10)
        agent.start(wait_ready=False)

    def pod_of(self, group: GroupRef, rank: int) -> PodProcesses | None:
        return self.pods.get(group.pod_name(rank))

    def leader(self) -> ControllerProcess | None:
        for proc in self.controllers.values():
            with contextlib.suppress(Exception):
                if proc.proc is not None and proc.proc.poll() is None and \
                        proc.status().get("leader"):
                    return proc
        return None

    def stop(self) -> None:
        self.heal()
        for stall in self.stalls:
            stall.end()
        for name in list(self.pods):
            self._stop_pod(name)
        for agent in self.agents.values():
            agent.stop(timeout=5)
        for controller in self.controllers.values():
            controller.stop(timeout=5)

    def endpoints(self) -> list[tuple[str, str]]:
        """Every daemon's HTTP endpoint, for the user: (what, URL)."""
        out = [(f"controller {n}", c.url) for n, c in self.controllers.items()]
        out += [(f"agent {n}", a.url) for n, a in sorted(self.agents.items())]
        out += [(f"sidecar {n}", p.sidecar.url) for n, p in sorted(self.pods.items())
                if p.sidecar is not None]
        out += [(f"engine {n}", p.engine.url) for n, p in sorted(self.pods.items())
                if p.engine.url]
        return out


def _name(obj: dict[str, Any]) -> str:
    return str(obj["metadata"]["name"])
