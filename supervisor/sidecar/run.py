"""The sidecar role assembled from settings: its identity, the engine client, the peer
sockets, the reporter — then served until stopped."""

from __future__ import annotations

import asyncio

import aiohttp
import structlog

from probes.engine import PRESETS, EngineClient, EnginePreset
from supervisor.config import EngineSettings, Settings
from supervisor.daemon import serve
from supervisor.http import build_app
from supervisor.metrics import new_registry
from supervisor.reporting import POD_REPORT_PATH, Reporter
from supervisor.runtime.clock import SystemClock
from supervisor.runtime.tasks import TaskGroup
from supervisor.sidecar.identity import identify
from supervisor.sidecar.metrics import SidecarCollector
from supervisor.sidecar.role import Sidecar

log = structlog.get_logger(__name__)


def preset(settings: EngineSettings) -> EnginePreset:
    """The preset with the settings' overrides applied (``custom`` starts from nothing)."""
    base = PRESETS.get(settings.preset) or EnginePreset("custom", "/health", "/metrics",
                                                        "/v1/completions", (), (), ())
    return EnginePreset(
        name=settings.preset,
        health_path=settings.health_path or base.health_path,
        metrics_path=settings.metrics_path or base.metrics_path,
        completions_path=settings.completions_path or base.completions_path,
        running=tuple(settings.running_metrics) or base.running,
        waiting=tuple(settings.waiting_metrics) or base.waiting,
        progress=tuple(settings.progress_metrics) or base.progress,
        inflight_path="" if settings.inflight_path == "off"
        else settings.inflight_path or base.inflight_path)


async def run_sidecar(settings: Settings) -> None:
    clock = SystemClock()
    group = TaskGroup()
    identity = identify(settings)
    session = aiohttp.ClientSession(
        trust_env=False, timeout=aiohttp.ClientTimeout(total=None),
        connector=aiohttp.TCPConnector(limit=8))
    engine = EngineClient(settings.engine.url, preset(settings.engine), session) \
        if settings.engine.enabled else None
    sidecar = Sidecar(settings, identity, clock, engine)
    registry = new_registry()
    registry.register(SidecarCollector(sidecar))
    reporter: Reporter | None = None

    def liveness() -> dict[str, bool]:
        return {**group.alive(), **sidecar.liveness()}

    def status() -> dict[str, object]:
        body = sidecar.status()
        body["reporting"] = None if reporter is None else {
            "sent": reporter.sent, "failed": reporter.failed, "sequence": reporter.sequence,
            "last_sent_at": reporter.last_sent_wall, "last_error": reporter.last_error}
        return body

    async def start() -> None:
        nonlocal reporter
        log.info("sidecar starting", pod=f"{identity.namespace}/{identity.pod}",
                 group=identity.group, rank=identity.rank, size=identity.size,
                 engine=settings.engine.url if engine else None)
        await sidecar.start(group)
        if settings.reporting.controller_url:
            reporter = Reporter.from_settings(
                settings.reporting, sidecar.report, clock, path=POD_REPORT_PATH,
                ready=lambda: engine is None or sidecar.engine_probes > 0)
            sidecar.listeners.append(reporter.poke)
            group.start("reporter", reporter.run())

    async def cleanup() -> None:
        await sidecar.stop()
        await session.close()

    app = build_app(liveness=liveness, readiness=sidecar.readiness, status=status,
                    registry=registry)
    await serve(settings, group, app, start, cleanup)


def run(settings: Settings) -> int:
    asyncio.run(run_sidecar(settings))
    return 0
