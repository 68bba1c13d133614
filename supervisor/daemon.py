"""What every role's life looks like: endpoints up first, the role's tasks under one
supervisor until SIGTERM, SIGINT or a task failure, staged shutdown, endpoints down last —
so ``/livez`` answers until the very end.

Each role assembles itself from settings in ``supervisor/<role>/run.py`` (the only place
that knows all of that role's parts) and hands its app and start/cleanup steps to
``serve``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web

from supervisor.config import Settings
from supervisor.http import HttpServer
from supervisor.runtime.tasks import TaskGroup, stop_on_signals

log = structlog.get_logger(__name__)


async def serve(settings: Settings, group: TaskGroup, app: web.Application,
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
