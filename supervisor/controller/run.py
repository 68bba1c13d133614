"""The controller role assembled from settings: the Kubernetes client, the report
listener on TLS, the controller's tasks — then served until stopped."""

from __future__ import annotations

import asyncio

import structlog

from supervisor.config import Settings
from supervisor.controller.metrics import ControllerCollector
from supervisor.controller.role import Controller
from supervisor.controller.topology import load_topology
from supervisor.daemon import serve
from supervisor.http import HttpServer, build_app, report_app
from supervisor.kube import KubeClient
from supervisor.metrics import new_registry
from supervisor.runtime.clock import SystemClock
from supervisor.runtime.tasks import TaskGroup
from supervisor.runtime.wakeups import loop_factory
from supervisor.tls import ServerCertificate, lean_tls_buffers

log = structlog.get_logger(__name__)


async def run_controller(settings: Settings) -> None:
    """The controller role: needs a cluster (kubeconfig or in-cluster)."""
    clock = SystemClock()
    lean_tls_buffers()  # a report stream per agent: thousands of TLS connections
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
    reports = HttpServer(report_app(controller.ingest.routes(), c.report_max_bytes,
                                    controller.ingest.close_streams),
                         c.report_listen, certificate.context if certificate else None,
                         setting="controller.report_listen")

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

    await serve(settings, group, app, start, cleanup)


def run(settings: Settings) -> int:
    c = settings.controller
    with asyncio.Runner(loop_factory=loop_factory(c.wakeup_window_seconds,
                                                  c.wakeup_batch)) as runner:
        runner.run(run_controller(settings))
    return 0
