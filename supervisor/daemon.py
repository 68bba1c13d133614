"""Assembles a role from settings and runs it until SIGTERM, SIGINT or a task failure.

This is the only place that knows every part: it builds the collaborators (NVML, the
Kubernetes client, the reporter), hands them to the role, starts the supervised tasks and
tears everything down in order — HTTP last, so ``/livez`` answers until the end.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog
from aiohttp import web

from probes.nvml import Nvml
from supervisor.config import Settings
from supervisor.errors import SupervisorError
from supervisor.http import HttpServer, build_app, report_app
from supervisor.kube import KubeClient
from supervisor.metrics import AgentCollector, ProbeHistograms, new_registry
from supervisor.node_status import NodeConditionPublisher
from supervisor.reporting import Reporter
from supervisor.roles.agent import Agent
from supervisor.runtime.clock import SystemClock
from supervisor.runtime.tasks import TaskGroup, stop_on_signals
from supervisor.tls import ServerCertificate, client_context

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
                group.start("expected-gpus", _expect_node_capacity(kube, agent),
                            finishable=True)
        if settings.reporting.controller_url:
            r = settings.reporting
            tls = client_context(r.ca_file) if r.controller_url.startswith("https://") \
                else None
            if tls is None:
                log.warning("reporting without TLS: the report token travels in clear text",
                            url=r.controller_url)
            reporter = Reporter(r.controller_url, Path(r.token_file), agent.report, clock,
                                r.heartbeat_seconds, r.timeout_seconds, tls=tls)
            agent.listeners.append(reporter.poke)
            group.start("reporter", reporter.run())

    async def cleanup() -> None:
        agent.stop()
        if kube is not None:
            await kube.close()

    app = build_app(liveness=liveness, readiness=readiness, status=status, registry=registry)
    await _serve(settings, group, app, start, cleanup)


async def _expect_node_capacity(kube: KubeClient, agent: Agent) -> None:
    """The Node's ``nvidia.com/gpu`` capacity is how many GPUs the agent should see."""
    try:
        node = await kube.read_node(agent.node)
    except SupervisorError as exc:
        log.warning("cannot read the Node's GPU capacity; no expected GPU count",
                    error=str(exc))
        return
    capacity = str(node.get("status", {}).get("capacity", {}).get("nvidia.com/gpu", ""))
    if capacity.isdigit() and int(capacity) > 0:
        agent.expect_gpus(int(capacity), "Node capacity nvidia.com/gpu")


async def _serve(settings: Settings, group: TaskGroup, app: web.Application,
                 start: Callable[[], Awaitable[None]],
                 cleanup: Callable[[], Awaitable[None]]) -> None:
    """The life of every role: endpoints up first, run until stopped, staged shutdown,
    endpoints down last — so /livez answers until the very end."""
    server = HttpServer(app, settings.http.listen)
    await server.start()
    log.info("http listening", address=server.bound)
    try:
        with stop_on_signals(group):
            await start()
            await group.run_until_stopped(settings.shutdown_grace_seconds)
    finally:
        await group.shutdown(settings.shutdown_grace_seconds)
        await cleanup()
        await server.stop()
        log.info("stopped", reason=group.stop_reason)


def run(settings: Settings, *, simulate_gpus: int | None, simulate_dir: str | None) -> int:
    sim: Path | None = None
    if simulate_gpus is not None:
        sim = prepare_simulation(simulate_gpus, simulate_dir)
        log.info("simulating GPUs with the NVML stand-in", gpus=simulate_gpus,
                 state_dir=str(sim),
                 inject=f"python -m probes.nvml_standin.control --dir {sim} xid 0 79")
    asyncio.run(run_agent(settings, simulate_dir=sim))
    return 0


async def run_controller(settings: Settings) -> None:
    """The controller role: needs a cluster (kubeconfig or in-cluster)."""
    from supervisor.controller.topology import load_topology
    from supervisor.metrics import ControllerCollector
    from supervisor.roles.controller import Controller

    clock = SystemClock()
    group = TaskGroup()
    topology = load_topology(settings.controller.topology_file)
    kube = await KubeClient.connect(settings.kubernetes.kubeconfig,
                                    settings.kubernetes.request_timeout_seconds)
    controller = Controller(settings, kube, clock, topology)
    registry = new_registry()
    registry.register(ControllerCollector(controller))
    app = build_app(liveness=group.alive, readiness=controller.ready, status=controller.status,
                    registry=registry)
    c = settings.controller
    certificate = ServerCertificate(c.tls_cert_file, c.tls_key_file) if c.tls_cert_file \
        else None
    reports = HttpServer(report_app(controller.ingest.routes(), c.report_max_bytes),
                         c.report_listen, certificate.context if certificate else None)

    async def start() -> None:
        await reports.start()
        log.info("reports listening", address=reports.bound, tls=certificate is not None)
        if certificate is None:
            log.warning("report endpoint without TLS: report tokens travel in clear text "
                        "(set controller.tls_cert_file outside local experiments)")
        else:
            group.start("tls-reload", certificate.follow(c.tls_reload_seconds))
        controller.start(group)

    async def cleanup() -> None:
        await reports.stop()
        await controller.stop()
        await kube.close()

    await _serve(settings, group, app, start, cleanup)


def run_controller_role(settings: Settings) -> int:
    asyncio.run(run_controller(settings))
    return 0
