"""One scenario, start to finish: build, start, serve, inject, watch, judge, report.

Everything long-lived runs in one TaskGroup (watches, the group keeper, the pod runtime,
traffic); the first one to fail ends the run with its error. Whatever happens, every
process started is stopped before :func:`simulate` returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import json
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import structlog
import yaml

from probes.nvml_standin.control import StandinControl
from simulator.controlplane.cluster import (
    CRD_DIR,
    KubeTestCluster,
    build_binary,
    build_kwok,
    crd_files,
)
from simulator.controlplane.machinery import start_machinery
from simulator.fleet import Runtime, Starving
from simulator.processes import (
    EngineProcess,
    EngineWorkerProcess,
    VllmNodeProcess,
    merged,
    vllm_python,
)
from simulator.scenario import (
    AT_BOOT,
    COLLECTIVE_FAULTS,
    COUNTING,
    ENGINE_FAULTS,
    LOADING_STEPS,
    NODE_FAULTS,
    POD_FAULTS,
    REPEATING,
    STOPPING,
    THROTTLE_BITS,
    UNDOING,
    Expectation,
    Fault,
    Model,
    Scenario,
    seconds,
)
from simulator.timeline import (
    STEPS,
    Action,
    ClusterView,
    FaultRecord,
    Snapshot,
    changes,
    explaining,
    update,
)
from simulator.traffic import TIMEOUT_S, Traffic
from simulator.world import (
    GROUP_LABEL,
    SERVING,
    SYSTEM,
    SYSTEM_NODE,
    GroupKeeper,
    GroupRef,
    chart_objects,
    chart_settings,
    create,
    degrade_topology,
    fallback_deployment,
    fallback_selector,
    fallback_service,
    front_name,
    front_service,
    gpu_node,
    groups_of,
    http_route,
    lws_object,
    model_service,
    system_node,
)
from supervisor.controller.actions import QUARANTINE_TAINT
from supervisor.errors import KubeError
from supervisor.kube import KubeClient

log = structlog.get_logger("simulator")

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_POLICY = ROOT / "policies" / "default.yaml"
SETUP_TIMEOUT_S = 180.0
# How long a fault waits for a pod to hold its target's rank (its group being recreated)
# before it is skipped.
RESOLVE_TIMEOUT_S = 60.0
LATE_S = 1.0  # a once_serving fault this much past its time waited for its group
# keeps_serving: the longest a group may go without answering a request.
SERVING_GAP_S = 5.0
ROUTES = f"/apis/gateway.networking.k8s.io/v1/namespaces/{SERVING}/httproutes"
# What the daemon that should see a fault reports it as.
FINDING_CLASSES: dict[str, set[str]] = {
    "xid": {"xid"}, "gpu_lost": {"gpu_lost"}, "thermal": {"thermal"},
    "ecc": {"ecc_uncorrectable"}, "nvlink_down": {"nvlink_down"},
    "nvml_hang": {"gpu_unresponsive"}, "engine_hang": {"engine_hang", "collective_hang"},
    "engine_crash": {"engine_crash", "engine_unhealthy"}, "partition": {"partition"},
    "engine_unhealthy": {"engine_unhealthy"},
    "row_remap": {"row_remap"}, "retired_pages": {"retired_pages"},
    "pcie_degraded": {"pcie_degraded"}, "pcie_replays": {"pcie_replays"},
    "ecc_storm": {"ecc_correctable_storm"}, "nvlink_errors": {"nvlink_errors"},
    "clock_throttle": {"clock_throttle"}, "driver_error": {"driver_error"},
    "gpu_missing": {"gpu_missing"}, "collective_hang": {"collective_hang"},
    "collective_slow": {"collective_slow"}, "app_crash_loop": {"xid"},
    "gpu_app_xids": {"xid"},
    # Must not be found: a starved sidecar blaming its peers (expected never: [detected]).
    "sidecar_starved": {"partition"},
}


# A row_remap fault's state → the stand-in's keys (limit: past the uncorrectable-row limit).
ROW_REMAP_STATES: dict[str, dict[str, int | str]] = {
    "failure": {"remap.failure": 1}, "limit": {"remap.uncorrectable": 4096},
    "pending": {"remap.pending": 1}}


@dataclass
class Repeating:
    """XIDs every ``every`` seconds until ``until`` (monotonic): on the node the fault's pod
    runs on now (``follow``), or on the fault's node while a serving pod is on it."""

    record: FaultRecord
    gpu: int
    code: int
    every: float
    until: float
    follow: bool
    due: float = 0.0  # monotonic: the next one


@dataclass
class Counting:
    """An error counter of one GPU that climbs for as long as its fault lasts."""

    record: FaultRecord
    gpu: int
    key: str
    per_second: float
    since: float = field(default_factory=time.monotonic)


@dataclass
class Outcome:
    scenario: Scenario
    records: list[FaultRecord]
    failures: list[str] = field(default_factory=list)
    requests: dict[str, Any] = field(default_factory=dict)
    endpoints: list[tuple[str, str]] = field(default_factory=list)
    setup_seconds: float = 0.0
    actions: list[Action] = field(default_factory=list)
    supervised: bool = True

    @property
    def passed(self) -> bool:
        return not self.failures

    def as_json(self) -> dict[str, Any]:
        return {"scenario": self.scenario.name, "source": self.scenario.source,
                "passed": self.passed, "failures": self.failures,
                "setup_seconds": round(self.setup_seconds, 1),
                "load_seconds": {m.name: m.load_seconds for m in self.scenario.models},
                "engines": {m.name: m.engine for m in self.scenario.models},
                "supervised": self.supervised,
                "faults": [r.as_json() for r in self.records],
                "actions": [a.as_json() for a in self.actions], "requests": self.requests,
                "endpoints": dict(self.endpoints)}


def policy_text(scenario: Scenario) -> str:
    """The shipped policy, acting (``dry_run: false``), with the scenario's fallbacks as
    degrade entries and its overrides on top."""
    policy = yaml.safe_load(SHIPPED_POLICY.read_text())
    policy["dry_run"] = False
    if scenario.fallbacks:
        policy["degrade"] = [{"model": f.for_model, "fallback": f.name, "floor": f.floor,
                              "restore_after": f"{f.restore_after:g}s"}
                             for f in scenario.fallbacks]
    policy.update(scenario.policy)
    return yaml.safe_dump(policy, sort_keys=False)


def topology_of(scenario: Scenario) -> dict[str, Any] | None:
    """The controller's topology file: the scenario's group kinds and its degrade targets."""
    topology = dict(scenario.topology)
    if scenario.fallbacks:
        topology["degrade"] = [degrade_topology(f) for f in scenario.fallbacks]
    return topology or None


class Printer:
    """The live timeline: one line per step, seconds since the scenario started, in the
    order things happened. A step is timed when it happened, which can be noticed a moment
    later (a finding read from a daemon's log): lines wait ``HOLD_S`` before they are
    printed, in time order."""

    HOLD_S = 1.5

    def __init__(self, out: TextIO, names: int = 16) -> None:
        self._out = out
        self.start = time.time()
        self.names = names  # the width of the fault-name column
        self._held: list[tuple[float, int, str]] = []
        self._order = itertools.count()  # same time: in the order they came

    def line(self, text: str) -> None:
        """A line about now, printed at once (with every held line before it)."""
        self.flush(hold=0.0)
        self._print(time.time(), text)

    def event(self, wall: float, text: str) -> None:
        """A line about ``wall`` (time.time()), printed in time order within ``HOLD_S``."""
        heapq.heappush(self._held, (wall, next(self._order), text))

    def flush(self, hold: float = HOLD_S) -> None:
        """Print the held lines older than ``hold`` seconds, oldest first."""
        until = time.time() - hold
        while self._held and self._held[0][0] <= until:
            wall, _, text = heapq.heappop(self._held)
            self._print(wall, text)

    def flush_all(self) -> None:
        """Print every held line (the run is over)."""
        while self._held:
            wall, _, text = heapq.heappop(self._held)
            self._print(wall, text)

    def _print(self, wall: float, text: str) -> None:
        print(f"{wall - self.start:7.1f}s  {text}", file=self._out, flush=True)

    def step(self, record: FaultRecord, step: str) -> None:
        after = record.at(step)
        when = "" if after is None or step == "injected" else f" (+{after:.2f} s)"
        detail = record.detail.get(step, "")
        self.event(record.times.get(step, time.time()),
                   f"{record.fault.name:<{self.names}} {step.replace('_', ' '):<17}{when}"
                   + (f"  {detail}" if detail else ""))


async def _follow(kube: KubeClient, path: str, handle: Callable[[str, dict[str, Any]], None],
                  changed: asyncio.Event) -> None:
    """List then watch ``path`` for ever, relisting after an error, feeding ``handle``."""
    while True:
        try:
            listed = await kube.request("GET", path)
            for item in listed.get("items", []):
                handle("ADDED", item)
            changed.set()
            version = listed["metadata"]["resourceVersion"]
            async for kind, obj in kube.watch(path, version):
                if kind == "BOOKMARK":
                    continue
                handle(kind, obj)
                changed.set()
        except KubeError:
            await asyncio.sleep(0.5)


async def _until(what: str, check: Callable[[], Awaitable[bool]], timeout: float,
                 cluster: KubeTestCluster) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if await check():
                return
        except KubeError as exc:  # an API server too slow for once: the deadline decides
            log.warning("not checked", what=what, error=str(exc))
        cluster.check_components()
        if time.monotonic() > deadline:
            raise TimeoutError(f"simulated cluster: {what} not within {timeout:.0f} s")
        await asyncio.sleep(0.2)


class Simulation:
    def __init__(self, scenario: Scenario, workdir: Path, out: TextIO,
                 torch_python: str = "", supervised: bool = True) -> None:
        """``supervised`` False: today's stack on the same cluster, measured beside us — no
        daemon of ours, the pods of the upstream LWS + vLLM example (see ``member_pod``), the
        kubelet's restart of an exited engine and LWS's group recreation played (the
        scenario checked by ``Scenario.unsupervised`` first)."""
        self.supervised = supervised
        self.scenario = scenario
        self.torch_python = torch_python  # for the all-reduce workers, when the scenario has them
        self.counting: list[Counting] = []
        self.repeating: list[Repeating] = []
        self.starving: list[tuple[FaultRecord, Starving]] = []  # sidecars held to a quota
        self.workdir = workdir
        self.printer = Printer(out, max([16, *(len(f.name) for f in scenario.faults)]))
        self.out = out
        self.groups = groups_of(scenario)
        self.view = ClusterView()
        self.view.groups = self.groups
        self.changed = asyncio.Event()
        self.records: list[FaultRecord] = []
        self.actions: list[Action] = []  # every action seen since the groups first served
        self._seen: Snapshot | None = None
        self._restarting: set[str] = set()
        self.ended: float | None = None  # wall time the faults' watch ended
        self.cluster: KubeTestCluster | None = None
        self.kube: KubeClient | None = None
        self.runtime: Runtime | None = None
        self.traffic: Traffic | None = None

    # --- set-up ------------------------------------------------------------------------

    async def setup(self) -> None:
        self._needs_root()
        p = self.printer.line
        if os.geteuid() == 0 and shutil.which("iptables") is not None:
            stale = await asyncio.to_thread(Runtime.clear_stale_cuts)
            if stale:
                p(f"iptables: removed {stale} cut(s) left by a simulation that was killed")
        vllm = [m.name for m in self.scenario.models if m.engine == "vllm"]
        vllm_py = ""
        if vllm:
            p(f"engine: real vLLM for {', '.join(vllm)} (its CPU build, installed once into a "
              "cached venv: a first install takes minutes)")
            vllm_py = await asyncio.to_thread(vllm_python)
        p("control plane: building once, then cached (a first build takes several minutes)")
        binary = await asyncio.to_thread(build_binary)
        kwok = await asyncio.to_thread(build_kwok)
        p("control plane: starting etcd, kube-apiserver, kube-scheduler, "
          "kube-controller-manager and kwok")
        self.cluster = await asyncio.to_thread(KubeTestCluster.start,
                                               self.workdir / "cluster", binary)
        await asyncio.to_thread(start_machinery, self.cluster, kwok)
        self.kube = kube = await KubeClient.connect(
            str(self.workdir / "cluster" / "admin.kubeconfig"))
        crds = sorted(CRD_DIR.glob("*.yaml"))
        if self._routes:
            p("control plane: fetching the Gateway API CRDs (once, then cached)")
            crds = await asyncio.to_thread(crd_files)
        for crd in crds:
            await create(kube, yaml.safe_load(crd.read_text()))
        s = self.scenario
        p(f"cluster: {s.nodes} GPU nodes x {s.gpus_per_node} GPUs played by kwok, "
          + ("the chart deployed from deploy/manifests" if self.supervised else
             "no supervisor: today's stack"))
        objects = chart_objects()
        for node in [gpu_node(f"gpu-{i}", s.gpus_per_node) for i in range(s.nodes)] + \
                [system_node(SYSTEM_NODE)]:
            await create(kube, node)
        for obj in objects if self.supervised else []:
            await create(kube, obj)
        await create(kube, {"apiVersion": "v1", "kind": "Namespace",
                            "metadata": {"name": SERVING}})
        await _until("the CRDs established", self._crd_ready, 30, self.cluster)
        for model in s.models:
            await create(kube, model_service(model))
            if model.kind == "lws":
                await create(kube, lws_object(model))
        for fallback in s.fallbacks:
            await create(kube, fallback_deployment(fallback, s.gpus_per_node))
            if fallback.traffic == "httproute":
                await create(kube, fallback_service(fallback))
                await create(kube, http_route(fallback))
                self.view.routes[fallback.for_model] = (front_name(fallback.for_model),
                                                        fallback.name)
                continue
            await create(kube, front_service(fallback))
            self.view.fronts[fallback.for_model] = (front_name(fallback.for_model),
                                                    fallback_selector(fallback.name))
        keeper = GroupKeeper(kube, self.groups, s.gpus_per_node, self.supervised)
        for group in self.groups:
            await keeper.create(group)
        self.keeper = keeper
        if self.supervised:
            await _until("agent pods on every node and both controller pods running",
                         self._system_running, SETUP_TIMEOUT_S, self.cluster)
        agent_cfg = chart_settings(objects, "agent")
        ctl_cfg = chart_settings(objects, "controller")["controller"]
        keep = ("lease_name", "state_configmap", "allowed_reporters", "allowed_pod_reporters",
                "agent_pod_selector", "token_audiences")
        sidecar_cfg = s.settings.get("sidecar", {})
        if s.collective:
            sidecar_cfg = merged(sidecar_cfg, {"collective": {"python": self.torch_python}})
        self.runtime = Runtime(
            self.workdir / "daemons", kube, self.cluster.url, self.cluster.ca_file,
            self.groups, s.gpus_per_node,
            merged({k: v for k, v in agent_cfg.items() if k not in ("http", "reporting",
                                                                      "kubernetes")},
                   s.settings.get("agent", {})),
            {k: ctl_cfg[k] for k in keep if k in ctl_cfg}, policy_text(s),
            topology_of(s), sidecar_settings=sidecar_cfg, vllm_python=vllm_py,
            supervised=self.supervised)
        if not self.supervised:
            p("daemons: none of ours. Pods as the upstream LWS + vLLM example has them (the "
              "engine alone; the leader ready by a TCP probe of its port every 10 s, no "
              "liveness probe); played: the kubelet restarting an exited engine and LWS "
              "recreating its group on that restart (RecreateGroupOnPodRestart); the "
              "engine's own timeout (a step held 300 s ends it)")
            return
        p("daemons: two controller replicas, an agent per node (NVML stand-in), a sidecar per "
          "inference pod beside the engine's API server (leaders) or a worker rank (workers)")
        await self.runtime.start_controllers()
        await self.runtime.start_agents()

    async def heal(self, record: FaultRecord) -> None:
        """Undo ``record``'s fault as an operator would after the incident: cut links
        repaired; a node with GPU faults repaired and rebooted, and its quarantine lifted by
        the controller before returning (so the next trial finds the spare capacity)."""
        assert self.runtime is not None
        runtime = self.runtime
        record.undone_at = record.undone_at or time.time()
        if record.fault.kind == "partition":
            await asyncio.to_thread(runtime.heal, record.undo)
        elif record.fault.kind in NODE_FAULTS and record.node is not None:
            node = record.node
            self.counting = [c for c in self.counting if c.record.node != node]
            self.repeating = [r for r in self.repeating if r.record is not record]
            await asyncio.to_thread(runtime.agents[node].control.reset,
                                    self.scenario.gpus_per_node)
            await asyncio.to_thread(runtime.reboot_agent, node)
            await self.watch_until(
                lambda: QUARANTINE_TAINT not in self.view.taints.get(node, set()), 120)

    def _needs_root(self) -> None:
        kinds = {f.kind for f in self.scenario.faults}
        if kinds & {"partition", "heal"} and (
                os.geteuid() != 0 or shutil.which("iptables") is None):
            raise PermissionError("this scenario cuts links with iptables: run it as root "
                                  "with iptables installed")
        if "sidecar_starved" in kinds and os.geteuid() != 0:
            raise PermissionError("this scenario puts a sidecar in a cgroup with a CPU "
                                  "quota: run it as root")

    @property
    def _routes(self) -> bool:
        """Whether a model's clients come through an HTTPRoute."""
        return any(f.traffic == "httproute" for f in self.scenario.fallbacks)

    async def _crd_ready(self) -> bool:
        assert self.kube is not None
        try:
            await self.kube.request("GET", f"/apis/leaderworkerset.x-k8s.io/v1/namespaces/"
                                    f"{SERVING}/leaderworkersets")
            if self._routes:
                await self.kube.request("GET", ROUTES)
        except KubeError:
            return False
        return True

    async def _system_running(self) -> bool:
        assert self.kube is not None
        pods = await self.kube.request("GET", f"/api/v1/namespaces/{SYSTEM}/pods")
        running = [p for p in pods.get("items", [])
                   if p.get("status", {}).get("phase") == "Running"]
        agents = sum(1 for p in running if p["metadata"]["labels"].get(
            "app.kubernetes.io/component") == "agent")
        controllers = sum(1 for p in running if p["metadata"]["labels"].get(
            "app.kubernetes.io/component") == "controller")
        return agents >= self.scenario.nodes and controllers >= 2

    # --- the run --------------------------------------------------------------------------

    async def run(self) -> Outcome:
        outcome = Outcome(self.scenario, self.records, actions=self.actions,
                          supervised=self.supervised)
        async with self.started(outcome):
            await self._play()
            for record, starving in self.starving:
                await asyncio.to_thread(starving.end)
                record.detail["starved"] = starving.result()
                self.printer.event(time.time(), f"{record.fault.name:<{self.printer.names}} "
                                                f"{'starved':<17}{record.detail['starved']}")
        # A starvation that never held proves nothing about what followed it.
        outcome.failures = self.judge() + [
            f"{record.fault.name}: {record.detail['starved']}"
            for record, starving in self.starving if starving.throttled is None]
        outcome.requests = self.traffic.totals() if self.traffic else {}
        return outcome

    @contextlib.asynccontextmanager
    async def started(self, outcome: Outcome | None = None) -> AsyncIterator[None]:
        """The simulated cluster serving every group, with traffic flowing, for the body;
        everything stopped after it (whatever happened)."""
        t0 = time.monotonic()
        try:
            await self.setup()
            async with _first_error(), self._serving(outcome, t0):
                yield
        finally:
            self.printer.flush_all()
            await self.teardown()

    @contextlib.asynccontextmanager
    async def _serving(self, outcome: Outcome | None, t0: float) -> AsyncIterator[None]:
        """Every watch, the group keeper, the pod runtime and traffic running, and every
        group serving, for the body."""
        assert self.kube is not None
        assert self.runtime is not None
        kube, runtime = self.kube, self.runtime
        async with asyncio.TaskGroup() as tasks:
            background = [
                tasks.create_task(_follow(kube, f"/api/v1/namespaces/{SERVING}/pods",
                                          self.view.on_pod, self.changed)),
                tasks.create_task(_follow(
                    kube, f"/apis/discovery.k8s.io/v1/namespaces/{SERVING}/endpointslices",
                    self.view.on_slice, self.changed)),
                tasks.create_task(_follow(kube, "/api/v1/nodes", self.view.on_node,
                                          self.changed)),
                tasks.create_task(_follow(kube, f"/api/v1/namespaces/{SERVING}/services",
                                          self.view.on_service, self.changed)),
                *([tasks.create_task(_follow(kube, ROUTES, self.view.on_route,
                                             self.changed))] if self._routes else []),
                tasks.create_task(self.keeper.run()),
                tasks.create_task(runtime.follow_pods()),
                tasks.create_task(runtime.probe_pods()),
            ]
            await self._wait_serving()
            runtime.loading = True  # from now on a new pod is a recreated one: it loads
            endpoints = runtime.endpoints()
            if outcome is not None:
                outcome.setup_seconds = time.monotonic() - t0
                outcome.endpoints = endpoints
            self._show_endpoints(endpoints)
            self.traffic = Traffic(self.view, self.groups, runtime.engines,
                                   lambda: self.records)
            background.append(tasks.create_task(self.traffic.run()))
            background.append(tasks.create_task(self._count_errors()))
            background.append(tasks.create_task(self._repeat_xids()))
            background.append(tasks.create_task(self._watch_controllers()))
            yield
            for task in background:
                task.cancel()

    async def watch_until(self, done: Callable[[], bool], timeout: float) -> bool:
        """Follow the open faults' steps (printing each) until ``done()`` or ``timeout``
        seconds; whether ``done()`` held."""
        end = time.monotonic() + timeout
        detect_poll = 0.0
        while True:
            for record in self.records:
                for step in update(record, self.view):
                    self.printer.step(record, step)
            self._observe_actions()
            self.printer.flush()
            if time.monotonic() >= detect_poll:
                await self._detect()
                detect_poll = time.monotonic() + 0.2
            if done():
                return True
            if time.monotonic() >= end:
                return False
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), 0.1)

    def _observe_actions(self) -> None:
        """Every action since the last look (the first look is the baseline), each with
        the faults that explain it, printed."""
        now = Snapshot.of(self.view, self.groups)
        if self._seen is not None:
            wall = time.time()
            for kind, subject in changes(self._seen, now, self._restarting):
                action = Action(wall, kind, subject,
                                tuple(explaining(kind, subject, wall, self.records)),
                                self.scenario.allows(kind, subject))
                self.actions.append(action)
                self.printer.event(wall, f"{'action':<{self.printer.names}} "
                                         f"{action.describe()}")
        self._seen = now

    async def _wait_serving(self) -> None:
        assert self.cluster is not None
        self.printer.line(f"serving: waiting for {len(self.groups)} groups to be "
                        + ("admitted by the controller and " if self.supervised else "")
                        + "Ready behind their Services")

        async def all_serving() -> bool:
            # A model with a fallback is degraded while its groups come up (fewer healthy
            # than its floor) and restored restore_after later — its traffic given back
            # over the drain, then the fallback scaled down: the faults wait for all that.
            if not all(self.view.serving(g) for g in self.groups) or any(
                    self.view.degraded(m.name) for m in self.scenario.models):
                return False
            assert self.kube is not None
            for fallback in self.scenario.fallbacks:
                scale = await self.kube.request(
                    "GET", f"/apis/apps/v1/namespaces/{SERVING}/deployments/"
                           f"{fallback.name}/scale")
                if scale.get("spec", {}).get("replicas"):
                    return False
            return True

        # A real vLLM's first load counts on top (the stand-in's first pods start loaded).
        first_load = max((m.load_seconds for m in self.scenario.models if m.engine == "vllm"),
                         default=0.0)
        await _until("every group serving, no model degraded", all_serving,
                     SETUP_TIMEOUT_S + first_load, self.cluster)
        self.printer.line(f"serving: {', '.join(g.name for g in self.groups)} ready")

    def _show_endpoints(self, endpoints: list[tuple[str, str]]) -> None:
        assert self.cluster is not None
        self.printer.line(f"endpoints: kube-apiserver {self.cluster.url} (admin kubeconfig "
                        f"{self.workdir / 'cluster' / 'admin.kubeconfig'})")
        for what, url in endpoints:
            self.printer.line(f"endpoints: {what:<28} {url}")

    async def _play(self) -> None:
        start = time.monotonic()
        pending = list(self.scenario.faults)
        while pending:
            fault = pending.pop(0)
            await self.watch_until(lambda: False, max(0.0, start + fault.at - time.monotonic()))
            await self.inject(fault)
            # A fault that waited for its group to serve moves the rest of the run back by
            # as much: what follows keeps its spacing from it, however long a load took.
            late = time.monotonic() - (start + fault.at)
            if fault.once_serving and late > LATE_S:
                start += late
        end = start + self.scenario.duration
        # A recreated group loads its model before it serves: the run waits that much longer
        # for what follows (the longest load of the groups recreated so far, as they come).
        waited = -1.0
        while (extra := max((_load_counted(r) for r in self.records), default=0.0)) > waited:
            waited = extra
            await self.watch_until(self._decided, max(0.0, end + extra - time.monotonic()))
        self.ended = time.time()

    def _decided(self) -> bool:
        """Every expectation met or already failed: nothing more to wait for."""
        by_name = {r.fault.name: r for r in self.records}
        for e in self.scenario.expect:
            record = by_name[e.fault]
            if record.skipped:
                continue  # failed already: nothing will happen to it
            if e.no_action or e.never or e.keeps_serving:
                return False  # only the whole duration proves something did not happen
            if e.quarantined is False and "recovered" not in record.times:
                return False  # a quarantine may still come until the replica is back
            wanted = [step for step, _ in e.limits()]
            if e.quarantined:
                wanted.append("quarantined")
            if any(s not in record.times for s in wanted):
                return False
        return all("injected" in r.times or r.skipped for r in self.records)

    # --- faults --------------------------------------------------------------------------

    def _group(self, fault: Fault) -> GroupRef | None:
        if fault.target is None:
            return None
        return next(g for g in self.groups if g.model.name == fault.target.model
                    and g.index == fault.target.group)

    def _unready(self, fault: Fault, group: GroupRef) -> str | None:
        """Why ``fault`` cannot be done to its target now (None: it can): the pod that holds
        the rank must exist, not be going, be placed on a node, and — for a fault done to
        the pod's processes — have them running for this incarnation of the pod."""
        assert self.runtime is not None
        assert fault.target is not None
        name = group.pod_name(fault.target.rank)
        pod = self.view.pods.get(name)
        if pod is None or pod["metadata"].get("deletionTimestamp"):
            return f"no pod holds rank {fault.target.rank} of {group.name}"
        node = pod["spec"].get("nodeName")
        if not node:
            return f"{name} is not placed on a node"
        if fault.kind in NODE_FAULTS and self.supervised and node not in self.runtime.agents:
            return f"node {node} has no agent"
        if fault.once_serving and not self.view.serving(group):
            return f"{group.name} is not serving"
        if fault.kind not in POD_FAULTS:
            return None
        members = [name]
        if fault.kind in COLLECTIVE_FAULTS:
            members.append(group.pod_name(0))  # its sidecar runs the checks
        if fault.kind == "partition":
            members = [group.pod_name(r) for r in range(group.model.size)]
        for member in members:
            live = self.view.pods.get(member)
            procs = self.runtime.pods.get(member)
            if live is None or live["metadata"].get("deletionTimestamp") or procs is None \
                    or procs.uid != live["metadata"]["uid"]:
                return f"the processes of {member} are not running"
        return None

    async def _resolve(self, fault: Fault, group: GroupRef) -> str | None:
        """Wait until ``fault`` can be done to whatever pod holds its rank (a recreated
        group's new pod, once it runs), at most ``RESOLVE_TIMEOUT_S``; None when it can,
        else why not (the fault is then skipped)."""
        why = self._unready(fault, group)
        if why is None:
            return None
        self.printer.event(time.time(), f"{fault.name:<{self.printer.names}} waiting     "
                                        f"{why}")
        # A fault waiting for its group to serve waits out the group's load too.
        timeout = RESOLVE_TIMEOUT_S + (group.model.load_seconds if fault.once_serving else 0)
        await self.watch_until(lambda: self._unready(fault, group) is None, timeout)
        why = self._unready(fault, group)
        return None if why is None else f"{why} after {timeout:g} s"

    def _undone(self, fault: Fault) -> FaultRecord | None:
        """The latest earlier fault on the same target that ``fault`` (clear, node_repair)
        undoes: its node is the one to repair, even if the group has moved off it since."""
        if fault.kind not in ("clear", "node_repair"):
            return None
        for earlier in reversed(self.records):
            if earlier.fault.target == fault.target and earlier.node is not None \
                    and earlier.fault.kind in NODE_FAULTS:
                return earlier
        return None

    async def inject(self, fault: Fault) -> FaultRecord:
        """Inject ``fault`` now into whatever pod holds its target's rank (waiting for one
        while its group is being recreated); its record, from which the steps that follow
        are read — skipped, saying why, when no pod came to hold the rank in time."""
        assert self.runtime is not None
        group = self._group(fault)
        record = FaultRecord(fault, group)
        undone = self._undone(fault)
        if group is not None and fault.target is not None and undone is None:
            why = await self._resolve(fault, group)
            if why is not None:
                record.skipped = why
                self.records.append(record)
                self.printer.event(time.time(), f"{fault.name:<{self.printer.names}} skipped"
                                                f"     {why}")
                return record
        if group is not None and fault.target is not None:
            record.pod = group.pod_name(fault.target.rank)
            pod = self.view.pods.get(record.pod)
            record.node = pod["spec"].get("nodeName") if pod else None
            if undone is not None:
                record.node = undone.node
            # The group as it is now: pods already going belong to an earlier incarnation,
            # whose deletion is no restart caused by this fault.
            record.uids = frozenset(p["metadata"]["uid"] for p in self.view.group_pods(group)
                                    if not p["metadata"].get("deletionTimestamp"))
            leader_ip = self.view.leader_ip(group)
            # Traffic can only be taken off a replica that has it.
            record.leader_ip = leader_ip if leader_ip in self.view.ready_ips() else None
            record.serving = self.view.serving(group)
            pod_procs = self.runtime.pods.get(record.pod)
            if fault.kind in COLLECTIVE_FAULTS or (
                    fault.kind in ENGINE_FAULTS and pod_procs is not None
                    and not pod_procs.engine.url):
                # The group's leader runs the checks, so its sidecar reports what they find;
                # a worker's engine has no endpoint: the leader's sidecar sees it stall.
                pod_procs = self.runtime.pods.get(group.pod_name(0))
            if fault.kind in NODE_FAULTS and record.node in self.runtime.agents:
                record.daemon = self.runtime.agents[record.node]
            elif pod_procs is not None and pod_procs.sidecar is not None:
                record.daemon = pod_procs.sidecar
        began = time.time()  # a reboot takes a moment: the fault starts when it does
        detail = await asyncio.to_thread(self._apply, fault, record)
        if group is not None and not record.serving and fault.kind not in UNDOING:
            detail += f" ({group.name} was not serving then)"
        record.mark("injected", began, detail)
        for earlier in self.records:
            if _undoes(fault.kind, record, earlier):
                earlier.undone_at = earlier.undone_at or began
        self.records.append(record)
        self.printer.step(record, "injected")
        return record

    def _apply(self, fault: Fault, record: FaultRecord) -> str:
        """Do the fault (blocking: files and local HTTP); what was done, for the timeline."""
        assert self.runtime is not None
        group = record.group
        p = fault.params
        gpu = int(p.get("gpu", 0))
        if fault.kind in NODE_FAULTS and not self.supervised:
            return self._apply_unwatched(fault, record)
        if fault.kind in NODE_FAULTS:
            assert record.node is not None
            control = self.runtime.agents[record.node].control
            where = f"GPU {gpu} of node {record.node}"
            if fault.kind == "xid":
                code = int(p.get("code", 79))
                control.inject_xid(gpu, code)
                return f"XID {code} on {where}"
            if fault.kind == "gpu_lost":
                control.lose(gpu)
                return f"{where} lost"
            if fault.kind == "thermal":
                control.set(gpu, temp=int(p.get("celsius", 95)))
                return f"{where} at {p.get('celsius', 95)} C"
            if fault.kind == "ecc":
                control.set(gpu, **{"ecc.uncorrected.volatile": int(p.get("count", 1))})
                return f"uncorrectable ECC on {where}"
            if fault.kind == "nvlink_down":
                link = int(p.get("link", 0))
                control.set(gpu, **{f"nvlink.{link}.active": 0})
                return f"NVLink {link} of {where} down"
            if fault.kind == "nvml_hang":
                hang = float(p.get("seconds", 60))
                control.hang(gpu, hang, ending=True)
                return f"NVML calls on {where} block for {hang:g} s"
            if fault.kind in REPEATING:
                code = int(p.get("code", 13))
                every = seconds(p.get("every", 10), "every")
                lasts = float(p.get("seconds", 120 if fault.kind == "app_crash_loop" else 240))
                self.repeating.append(Repeating(record, gpu, code, every,
                                                time.monotonic() + lasts,
                                                follow=fault.kind == "app_crash_loop"))
                if fault.kind == "app_crash_loop":
                    return (f"{record.pod} crashes with XID {code} on its GPU {gpu} every "
                            f"{every:g} s for {lasts:g} s, wherever it runs")
                return (f"{where} faults the application on it with XID {code} every "
                        f"{every:g} s for {lasts:g} s")
            if fault.kind not in ("clear", "node_repair"):
                return self._apply_gpu(fault, record, control, gpu, where)
            self.counting = [c for c in self.counting if c.record.node != record.node]
            control.reset(self.scenario.gpus_per_node)
            if fault.kind == "clear":
                return f"node {record.node}: GPU faults stopped"
            self.runtime.reboot_agent(record.node)
            return f"node {record.node} repaired and rebooted (agent restarted)"
        if fault.kind == "heal":
            self.runtime.heal()
            return "every cut link works again"
        if fault.kind == "partition":
            assert record.node is not None
            assert group is not None
            others = [p["spec"]["nodeName"] for p in self.view.group_pods(group)
                      if p["metadata"]["name"] != record.pod and p["spec"].get("nodeName")]
            record.undo = self.runtime.cut(record.node, others)
            return (f"links between node {record.node} ({record.pod}) and "
                    f"{', '.join(others)} cut both ways")
        if fault.kind in COLLECTIVE_FAULTS:
            assert record.pod is not None
            if fault.kind == "collective_resume":
                for earlier in self.records:
                    if earlier.pod == record.pod and earlier.release is not None:
                        earlier.release()
                return f"all-reduce worker of {record.pod} runs freely again"
            share = float(p.get("share", 0.05)) if fault.kind == "collective_slow" else 0.0
            record.release = self.runtime.stall_worker(record.pod, share)
            if share:
                return f"all-reduce worker of {record.pod} held to {share:.0%} of the time"
            return f"all-reduce worker of {record.pod} stopped dead (SIGSTOP)"
        if fault.kind == "sidecar_starved":
            assert record.pod is not None
            millicores = int(p.get("millicores", 50))
            lasts = seconds(p.get("seconds", 60), "seconds")
            starving = self.runtime.starve_sidecar(record.pod, millicores, lasts)
            record.release = starving.end
            self.starving.append((record, starving))
            return (f"sidecar of {record.pod} held to {millicores}m of CPU for {lasts:g} s "
                    "(a cgroup's quota)")
        if fault.kind in ENGINE_FAULTS:
            assert record.pod is not None
            assert group is not None
            procs = self.runtime.pods[record.pod]
            if isinstance(procs.engine, VllmNodeProcess):
                return self._apply_vllm(fault.kind, record.pod, procs.engine)
            api = self.runtime.pods[group.pod_name(0)].engine
            assert isinstance(api, EngineProcess)
            if isinstance(procs.engine, EngineWorkerProcess):
                return self._apply_worker(fault.kind, record.pod, procs.engine, api)
            if fault.kind == "engine_hang":
                api.control(load=4)
                api.control(hang=True)
                return f"engine of {record.pod} hung with requests running"
            if fault.kind == "engine_resume":
                api.control(hang=False, unhealthy=False)
                return f"engine of {record.pod} steps again"
            if fault.kind == "engine_unhealthy":
                api.control(unhealthy=True)
                return f"engine of {record.pod} answers /health with 503"
            api.control(crash=True)
            return f"engine of {record.pod} crashed"
        leader = self.runtime.leader()
        if leader is None:
            return "no leader to kill"
        leader.kill()
        record.detail["leader"] = leader.identity
        return f"controller {leader.identity} (the leader) killed"

    @staticmethod
    def _apply_worker(kind: str, pod: str, worker: EngineWorkerProcess,
                      leader: EngineProcess) -> str:
        """An engine fault on a worker pod: a signal to its rank's process, which has no
        endpoint of its own — the leader's engine stalls or dies with it."""
        if kind == "engine_hang":
            leader.control(load=4)  # requests in flight, so there is a step to hold
            worker.signal(signal.SIGSTOP)
            return (f"engine worker of {pod} stopped (SIGSTOP) with requests running: the "
                    "leader's engine waits for it")
        if kind == "engine_resume":
            worker.signal(signal.SIGCONT)
            return f"engine worker of {pod} runs again (SIGCONT)"
        worker.signal(signal.SIGKILL)
        return (f"engine worker of {pod} killed (SIGKILL): the leader's engine holds its step "
                "for the lost pipeline stage")

    def _apply_unwatched(self, fault: Fault, record: FaultRecord) -> str:
        """A GPU fault with nothing of ours watching: what the engine gets is the CUDA error
        on that GPU, which ends its process on the pod (played: killed). A worker's is a
        lost pipeline stage, for which the leader's engine holds its step until its
        execute-model timeout; a leader's ends the API server with it."""
        assert self.runtime is not None
        assert record.pod is not None
        what = (f"XID {int(fault.params.get('code', 79))}" if fault.kind == "xid"
                else "GPU lost")
        where = f"{what} on GPU {int(fault.params.get('gpu', 0))} of node {record.node}"
        procs = self.runtime.pods.get(record.pod)
        if procs is None:
            return f"{where}: nothing reads it, and no engine of {record.pod} runs there"
        if isinstance(procs.engine, VllmNodeProcess):
            # The process on the GPU is the stage's worker; what follows is vLLM's own.
            procs.engine.signal(signal.SIGKILL, procs.engine.gpu_pids())
        elif procs.engine.proc is not None:
            procs.engine.proc.kill()
        return (f"{where}: nothing reads it; the CUDA error ends the engine process of "
                f"{record.pod} (played: killed)")

    @staticmethod
    def _apply_vllm(kind: str, pod: str, engine: VllmNodeProcess) -> str:
        """An engine fault on a pod's part of a real vLLM, as it happens there: a hang stops
        the process that steps (the leader's engine core, a worker's stage), a crash ends
        every process of the pod (its container exits). Requests in flight are the
        clients' own: the traffic keeps going to the replica until it is taken out."""
        if kind == "engine_hang":
            engine.signal(signal.SIGSTOP, engine.stage_pids())
            what = "engine core" if engine.node_rank == 0 else "pipeline stage's worker"
            return f"vLLM {what} of {pod} stopped (SIGSTOP) under traffic"
        if kind == "engine_resume":
            engine.signal(signal.SIGCONT, engine.stage_pids())
            return f"vLLM of {pod} runs again (SIGCONT)"
        engine.signal(signal.SIGKILL)
        return f"every vLLM process of {pod} killed (SIGKILL): its container exited"

    def _apply_gpu(self, fault: Fault, record: FaultRecord, control: StandinControl,
                   gpu: int, where: str) -> str:
        """The agent's other fault classes: memory repairs, PCIe, clocks, error storms (the
        stand-in's keys), and what a node brings back from a reboot."""
        assert self.runtime is not None
        assert record.node is not None
        p = fault.params
        kind = fault.kind
        if kind == "row_remap":
            state = str(p.get("state", "failure"))
            control.set(gpu, **ROW_REMAP_STATES[state])
            return f"row remap {state} on {where}"
        if kind == "retired_pages":
            state = str(p.get("state", "limit"))
            if state == "pending":
                control.set(gpu, **{"retired.pending": 1})
                return f"page retirement pending on {where}"
            count = int(p.get("count", 64))
            control.set(gpu, **{"retired.dbe": count})
            return f"{count} pages retired on {where}"
        if kind == "pcie_degraded":
            width = int(p.get("width", 8))
            control.set(gpu, **{"pcie.width": width})
            return f"PCIe link of {where} at x{width} of x16"
        if kind == "clock_throttle":
            reason = str(p.get("reason", "hw_slowdown"))
            control.set(gpu, clocks_event_reasons=THROTTLE_BITS[reason])
            return f"clocks of {where} held down ({reason})"
        if kind in COUNTING:
            key, default = COUNTING[kind]
            per_minute = float(p.get("per_minute", default))
            self.counting.append(Counting(record, gpu, key.format(link=int(p.get("link", 0))),
                                          per_minute / 60))
            return f"{kind.replace('_', ' ')}: {per_minute:g} per minute on {where}"
        assert kind in AT_BOOT
        if kind == "driver_error":
            control.update({"init_error": 9})  # NVML_ERROR_DRIVER_NOT_LOADED
            what = "its driver does not load"
        else:
            control.set(gpu, handle_error=999)  # NVML_ERROR_UNKNOWN: enumerated, cannot open
            what = f"GPU {gpu} cannot be opened"
        self.runtime.reboot_agent(record.node)
        return f"node {record.node} rebooted and {what}"

    async def _count_errors(self) -> None:
        """Every second, each counting fault's counter where its rate has brought it."""
        assert self.runtime is not None
        runtime = self.runtime
        while True:
            for c in list(self.counting):
                assert c.record.node is not None
                value = int((time.monotonic() - c.since) * c.per_second)
                await asyncio.to_thread(runtime.agents[c.record.node].control.set, c.gpu,
                                        **{c.key: value})
            await asyncio.sleep(1.0)

    async def _repeat_xids(self) -> None:
        """Each repeating fault's next XID when it is due, where it is due (module
        see ``Repeating``)."""
        assert self.runtime is not None
        runtime = self.runtime
        while True:
            now = time.monotonic()
            for rep in list(self.repeating):
                if now >= rep.until:
                    self.repeating.remove(rep)
                    continue
                if now < rep.due:
                    continue
                node = self._xid_node(rep)
                if node is None or node not in runtime.agents:
                    continue  # no application running there right now: nothing to fault
                rep.due = now + rep.every
                rep.record.nodes.add(node)
                rep.record.groups_hit |= self._groups_on(node)
                await asyncio.to_thread(runtime.agents[node].control.inject_xid, rep.gpu,
                                        rep.code)
            await asyncio.sleep(0.2)

    def _groups_on(self, node: str) -> set[str]:
        """The groups with a pod on ``node`` now (what its GPU's XIDs reach)."""
        return {str(p["metadata"].get("labels", {}).get(GROUP_LABEL))
                for p in self.view.pods.values() if p["spec"].get("nodeName") == node
                and not p["metadata"].get("deletionTimestamp")
                and p["metadata"].get("labels", {}).get(GROUP_LABEL)}

    def _xid_node(self, rep: Repeating) -> str | None:
        """Where a repeating fault's XID happens now: the node its pod runs on (following
        it), or its own node while a serving pod runs there."""
        if rep.follow:
            pod = self.view.pods.get(rep.record.pod or "")
            if pod is None or pod["metadata"].get("deletionTimestamp") or not any(
                    c.get("type") == "ContainersReady" and c.get("status") == "True"
                    for c in pod.get("status", {}).get("conditions") or []):
                return None
            node = pod["spec"].get("nodeName")
            return str(node) if node else None
        node = rep.record.node
        running = any(p["spec"].get("nodeName") == node
                      and not p["metadata"].get("deletionTimestamp")
                      for p in self.view.pods.values())
        return node if running else None

    async def _watch_controllers(self) -> None:
        """Once a second: whether a controller's circuit breaker is open, and which groups
        the leader names as crash-looping (the steps ``breaker`` and ``crash_loop``)."""
        assert self.runtime is not None
        runtime = self.runtime
        while True:
            await asyncio.sleep(1.0)
            for ctl in list(runtime.controllers.values()):
                try:
                    status = await asyncio.to_thread(ctl.status)
                except (OSError, AssertionError, ValueError):
                    continue  # stopped, or killed by a scenario
                looping = {loop["group"] for loop in status.get("workload_crash_loops", [])}
                for record in self.records:
                    if status.get("breaker_open") and record.mark(
                            "breaker", detail=f"circuit breaker of {ctl.identity} open"):
                        self.printer.step(record, "breaker")
                    if record.group is not None and record.group.key in looping and \
                            record.mark("crash_loop", detail=f"{ctl.identity}: "
                                                             f"{record.group.key}'s XIDs are "
                                                             "the workload's"):
                        self.printer.step(record, "crash_loop")

    async def _detect(self) -> None:
        """The first finding of each open fault, from the daemon that should see it."""
        assert self.runtime is not None
        for record in self.records:
            if "detected" in record.times:
                continue
            found = await asyncio.to_thread(self._finding, record)
            if found is not None and record.mark("detected", found[0], found[1]):
                self.printer.step(record, "detected")

    def _finding(self, record: FaultRecord) -> tuple[float, str] | None:
        """Read from the daemon's own log ("finding raised", with its time): the log
        outlives the process, which a group restart may already have stopped."""
        assert self.runtime is not None
        kind = record.fault.kind
        if kind == "kill_leader":
            leader = self.runtime.leader()
            if leader is not None and leader.identity != record.detail.get("leader"):
                return time.time(), f"{leader.identity} leads"
            return None
        classes = FINDING_CLASSES.get(kind)
        if kind == "engine_crash" and record.fault.target and record.fault.target.rank > 0:
            # A lost pipeline stage does not end the leader's engine: it holds its step,
            # /health 200 and every counter frozen, until the execute-model timeout (vLLM
            # 0.32, measured) — what the leader's sidecar sees is a hang.
            classes = FINDING_CLASSES["engine_hang"]
        if classes is None or record.daemon is None:
            return None
        injected = record.times["injected"]
        for line in _new_lines(record):
            if '"finding raised"' not in line:
                continue
            with contextlib.suppress(ValueError, KeyError):
                entry = json.loads(line)
                at = datetime.fromisoformat(entry["timestamp"]).timestamp()
                # A finding raised after the fault was undone is not this fault's (the
                # next trial's, in a bench that repeats it on the same pod).
                if entry["fault_class"] in classes and at >= injected - 1.0 and (
                        record.undone_at is None or at <= record.undone_at):
                    return at, (f"{entry['fault_class']} by {record.daemon.role}: "
                                f"{entry['message']}")
        return None

    # --- judging ---------------------------------------------------------------------------

    def judge(self) -> list[str]:
        by_name = {r.fault.name: r for r in self.records}
        failures: list[str] = []
        for e in self.scenario.expect:
            record = by_name.get(e.fault)
            if record is None:
                failures.append(f"{e.fault}: never injected")
                continue
            if record.skipped:
                failures.append(f"{e.fault}: skipped ({record.skipped}), so its expectations "
                                "could not be checked")
                continue
            failures += _check(e, record, self.records)
            injected = record.times.get("injected")
            answers = self.traffic.answers if self.traffic is not None else {}
            for group in e.keeps_serving:
                if injected is None or self.ended is None:
                    continue
                gap, since = longest_silence(answers.get(group, []), injected, self.ended)
                if gap >= SERVING_GAP_S:
                    failures.append(
                        f"{e.fault}: {group} answered no request for {gap:.1f} s from "
                        f"{since - injected:+.1f} s after injection (expected to keep "
                        f"serving: never {SERVING_GAP_S:g} s without an answer)")
        start = min((r.times["injected"] for r in self.records if "injected" in r.times),
                    default=None)
        for action in self.actions:
            if action.unexplained:
                when = "" if start is None else f" at {action.at - start:+.1f} s from the " \
                                                 "first fault"
                failures.append(f"{action.kind.replace('_', ' ')} of {action.subject}{when}: "
                                "no fault explains it (list it under allow: if the scenario "
                                "expects it)")
        return failures

    async def teardown(self) -> None:
        if self.runtime is not None:
            await asyncio.to_thread(self.runtime.stop)
        if self.kube is not None:
            await self.kube.close()
        if self.cluster is not None:
            await asyncio.to_thread(self.cluster.stop)


@contextlib.asynccontextmanager
async def _first_error() -> AsyncIterator[None]:
    """A background task's failure as itself (a setup timeout is a one-line error for the
    command to print), not wrapped in the task group's ExceptionGroup."""
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


def _new_lines(record: FaultRecord) -> list[str]:
    """The complete lines the daemon logged since the last look (its log is read from where
    the last look stopped; a restarted daemon's new log is read from the start)."""
    assert record.daemon is not None
    try:
        with record.daemon.log_path.open("rb") as log:
            if log.seek(0, 2) < record.log_offset:
                record.log_offset = 0
            log.seek(record.log_offset)
            data = log.read()
    except FileNotFoundError:
        return []
    complete = data[:data.rfind(b"\n") + 1]
    record.log_offset += len(complete)
    return complete.decode(errors="replace").splitlines()


def longest_silence(answers: list[float], start: float, end: float) -> tuple[float, float]:
    """The longest stretch from ``start`` to ``end`` without an answer (wall times): its
    length in seconds, and when it began."""
    points = [start, *sorted(t for t in answers if start < t < end), end]
    return max(((b - a, a) for a, b in itertools.pairwise(points)), default=(0.0, start))


def _undoes(kind: str, undo: FaultRecord, fault: FaultRecord) -> bool:
    """Whether fault ``undo`` (of ``kind``) ends the earlier ``fault``: its replica is well
    again, so requests to it from now on did not reach a sick replica."""
    if kind == "engine_resume":
        return fault.fault.kind in ("engine_hang", "engine_unhealthy") and fault.pod == undo.pod
    if kind == "collective_resume":
        return fault.fault.kind in COLLECTIVE_FAULTS and fault.pod == undo.pod
    if kind in ("clear", "node_repair"):
        return fault.fault.kind in NODE_FAULTS and fault.node == undo.node
    return kind == "heal" and fault.fault.kind == "partition"


def _load_counted(record: FaultRecord) -> float:
    """The model load time a step after ``record``'s fault waits for: its group's model's,
    when the group was recreated (new pods load their model; a group that kept its pods
    does not)."""
    if record.group is None or "restarted" not in record.times:
        return 0.0
    return record.group.model.load_seconds


def _check(e: Expectation, record: FaultRecord, records: list[FaultRecord]) -> list[str]:
    out: list[str] = []
    load = _load_counted(record)
    for step, limit in e.limits():
        took = record.at(step)
        extra = load if step in LOADING_STEPS else 0.0
        expected = f"expected within {limit:g} s" + (
            f" + {extra:g} s of model load" if extra else "")
        if took is None:
            out.append(f"{e.fault}: {step.replace('_', ' ')} never happened ({expected})")
        elif took > limit + extra:
            out.append(f"{e.fault}: {step.replace('_', ' ')} after {took:.2f} s ({expected})")
    if e.quarantined is not None and ("quarantined" in record.times) != e.quarantined:
        out.append(f"{e.fault}: node {'not ' if e.quarantined else ''}quarantined "
                   f"(expected {'' if e.quarantined else 'no '}quarantine)")
    for step in e.never:
        if step in record.times:
            out.append(f"{e.fault}: {step.replace('_', ' ')} after {record.at(step):.2f} s "
                       "(expected never)")
    if e.no_action:
        acted = [f"{r.fault.name}: {s}" for r in records for s in STEPS[2:] if s in r.times]
        if acted:
            out.append(f"{e.fault}: expected no action, saw {', '.join(acted)}")
    return out


async def simulate(scenario: Scenario, workdir: Path, out: TextIO,
                   report: Path | None = None, plot: Path | None = None,
                   torch_python: str = "", supervised: bool = True) -> Outcome:
    """Run ``scenario`` with its files under ``workdir`` (which must exist); the live
    timeline and the summary go to ``out``; the JSON report to ``report``, the timeline
    drawn to ``plot``. ``supervised`` False: without the supervisor (today's stack)."""
    sim = Simulation(scenario, workdir, out, torch_python, supervised)
    sim.printer.line(f"scenario {scenario.name}: {scenario.description}")
    sim.printer.line("load: a recreated group serves once its engine has loaded the model ("
                     + ", ".join(_load_text(m) for m in scenario.models)
                     + "); the run starts from a serving cluster")
    outcome = await sim.run()
    summary(outcome, sim.printer)
    if report is not None:
        text = json.dumps(outcome.as_json(), indent=2) + "\n"
        await asyncio.to_thread(report.write_text, text)
        sim.printer.line(f"report: {report}")
    if plot is not None:
        from simulator.plot import plot as draw

        await asyncio.to_thread(draw, outcome, plot)
        sim.printer.line(f"plot: {plot}")
    return outcome


def _load_text(model: Model) -> str:
    if model.engine == "vllm":
        return (f"{model.name} on real vLLM: as long as it takes, {model.load_seconds:g} s "
                "allowed")
    return f"{model.name} {model.load_seconds:g} s"


def summary(outcome: Outcome, printer: Printer) -> None:
    p = printer.line
    p("summary:")
    for record in outcome.records:
        if record.skipped:
            p(f"  {record.fault.name}: skipped: {record.skipped}")
            continue
        steps = ", ".join(f"{s.replace('_', ' ')} +{v:.2f} s" for s in STEPS[1:]
                          if (v := record.at(s)) is not None)
        sick = record.sick_split()
        split = "" if not sick["sent"] else (
            f" ({sick['answered']} answered, {sick['failed']} failed, {sick['hung']} hung, "
            f"{sick['in_flight']} in flight at the end)")
        # Only a fault that stops its replica makes a request to it a sick one.
        reached = f"; {sick['sent']} requests reached the sick replica{split}" \
            if record.fault.kind in STOPPING or sick["sent"] else ""
        starved = f"; {record.detail['starved']}" if "starved" in record.detail else ""
        p(f"  {record.fault.name}: {steps or 'nothing followed'}{reached}{starved}")
    r = outcome.requests
    if r:
        p(f"  requests: {r['sent']} sent = {r['answered']} answered + {r['failed']} failed + "
          f"{r['in_flight']} in flight at the end (failed: {r['no_endpoint']} found no "
          f"endpoint, {r['timed_out']} hung past {TIMEOUT_S:g} s, the rest errors)"
          + (f"; {r['fallback']} of the answers from a fallback model"
             if r["fallback"] else ""))
    if outcome.passed:
        p(f"PASSED: every expectation of {outcome.scenario.name} held")
    else:
        for failure in outcome.failures:
            p(f"FAILED: {failure}")
