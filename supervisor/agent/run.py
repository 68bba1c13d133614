"""The agent role assembled from settings: NVML (or its stand-in), the Kubernetes
publisher, the reporter — then served until stopped."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from pathlib import Path

import structlog

from probes.nvml import Nvml
from supervisor.agent.inventory import physical_gpus
from supervisor.agent.metrics import AgentCollector, ProbeHistograms
from supervisor.agent.node_status import NodeConditionPublisher
from supervisor.agent.role import Agent
from supervisor.config import Settings
from supervisor.daemon import serve
from supervisor.errors import SupervisorError
from supervisor.http import build_app
from supervisor.kube import KubeClient
from supervisor.metrics import new_registry
from supervisor.reporting import Reporter
from supervisor.runtime.clock import SystemClock
from supervisor.runtime.tasks import TaskGroup

log = structlog.get_logger(__name__)


def prepare_simulation(gpus: int, state_dir: str | None) -> Path:
    """Build and preload the NVML stand-in with ``gpus`` healthy GPUs; return its state dir.

    Must run before NVML is initialised: pynvml opens ``libnvidia-ml.so.1`` by soname, and
    the dynamic loader hands it the already-loaded stand-in.
    """
    from probes.nvml_standin import build, preload
    from probes.nvml_standin.control import StandinControl

    directory = Path(state_dir) if state_dir else Path(
        tempfile.mkdtemp(prefix="gpu-supervisor-sim-"))
    control = StandinControl(directory)
    if control.get("gpu_count") is None or state_dir is None:
        control.reset(gpus)
    elif control.get("gpu_count") != str(gpus):
        control.update({"gpu_count": gpus})
    os.environ["GPUSUP_FAKENVML_DIR"] = str(directory)
    preload(build())
    return directory


def kube_enabled(settings: Settings) -> bool:
    mode = settings.kubernetes.enabled
    if mode == "auto":
        # Same test as kubernetes' in-cluster config loader.
        return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) or bool(
            settings.kubernetes.kubeconfig)
    return mode == "true"


async def run_agent(settings: Settings, *, simulate_dir: Path | None = None) -> None:
    clock = SystemClock()
    group = TaskGroup()
    registry = new_registry()
    agent = Agent(settings, Nvml(), clock, observer=ProbeHistograms(registry))
    registry.register(AgentCollector(agent))
    kube: KubeClient | None = None
    publisher: NodeConditionPublisher | None = None
    reporter: Reporter | None = None

    def readiness() -> dict[str, bool]:
        checks = {"first-probe-round": agent.ready}
        if publisher is not None:
            checks["node-conditions-published"] = publisher.writes > 0
        return checks

    def liveness() -> dict[str, bool]:
        return {**group.alive(), **agent.liveness()}

    def status() -> dict[str, object]:
        body = agent.status()
        if simulate_dir is not None:
            body["simulation"] = {"state_dir": str(simulate_dir)}
        body["kubernetes"] = None if publisher is None else {
            "writes": publisher.writes, "failures": publisher.failures,
            "events": publisher.events, "last_error": publisher.last_error}
        body["reporting"] = None if reporter is None else {
            "sent": reporter.sent, "failed": reporter.failed, "sequence": reporter.sequence,
            "last_sent_at": reporter.last_sent_wall, "last_error": reporter.last_error}
        return body

    async def start() -> None:
        nonlocal kube, publisher, reporter
        await agent.start(group)
        if kube_enabled(settings):
            kube = await KubeClient.connect(settings.kubernetes.kubeconfig,
                                            settings.kubernetes.request_timeout_seconds)
            publisher = NodeConditionPublisher(kube, agent.node, agent.book.active, clock,
                                               settings.kubernetes.condition_resync_seconds)
            agent.listeners.append(publisher.poke)
            group.start("node-conditions", publisher.run())
            if not settings.nvml.expected_gpus:
                group.start("expected-gpus", _expect_physical_gpus(kube, agent),
                            finishable=True)
        if settings.reporting.controller_url:
            reporter = Reporter.from_settings(settings.reporting, agent.report, clock,
                                              ready=lambda: agent.ready)
            agent.listeners.append(reporter.poke)
            agent.news_listeners.append(reporter.poke)
            group.start("reporter", reporter.run())

    async def cleanup() -> None:
        agent.stop()
        if kube is not None:
            await kube.close()

    app = build_app(liveness=liveness, readiness=readiness, status=status, registry=registry)
    await serve(settings, group, app, start, cleanup)


async def _expect_physical_gpus(kube: KubeClient, agent: Agent) -> None:
    """How many GPUs the Node says this node physically has (``inventory``)."""
    try:
        node = await kube.read_node(agent.node)
    except SupervisorError as exc:
        log.warning("cannot read the Node's GPU count; no expected GPU count",
                    error=str(exc))
        return
    found = physical_gpus(node)
    if found is None:
        log.info("the Node states no physical GPU count (no GPU feature discovery labels, "
                 "or MIG's single strategy, where they count MIG devices): GPUs missing "
                 "are judged against nvml.expected_gpus only",
                 capacity=node.get("status", {}).get("capacity", {}).get("nvidia.com/gpu"))
        return
    agent.expect_gpus(*found)


def run(settings: Settings, *, simulate_gpus: int | None, simulate_dir: str | None) -> int:
    sim: Path | None = None
    if simulate_gpus is not None:
        sim = prepare_simulation(simulate_gpus, simulate_dir)
        log.info("simulating GPUs with the NVML stand-in", gpus=simulate_gpus,
                 state_dir=str(sim),
                 inject=f"python -m probes.nvml_standin.control --dir {sim} xid 0 79")
        if simulate_dir is not None:
            from probes.nvml_standin.control import StandinControl

            kept = {k: v for k, v in StandinControl(sim).values().items() if k != "gpu_count"}
            if kept:
                # A directory given again keeps its faults (that is what it is for); say so,
                # or a "healthy" start that is not would puzzle.
                log.warning("stand-in state kept from an earlier run; `python -m "
                            f"probes.nvml_standin.control --dir {sim} reset {simulate_gpus}` "
                            "starts healthy", kept=kept)
    try:
        asyncio.run(run_agent(settings, simulate_dir=sim))
    finally:
        if sim is not None and simulate_dir is None:
            shutil.rmtree(sim, ignore_errors=True)  # ours, made for this run
    return 0
