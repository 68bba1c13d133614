"""The HTTP face every role shares: /livez, /readyz, /metrics, /status.

- ``/livez``  is the daemon's own machinery alive (root tasks running, probe loops ticking,
  event thread alive)? It says nothing about GPU health — a node full of broken GPUs must
  not get its monitor restarted by the kubelet, and a stuck NVML call on one GPU is a
  finding, not a liveness failure.
- ``/readyz`` has the first probe round completed, so what we report is real?
- ``/metrics`` Prometheus text, through client_python's aiohttp handler.
- ``/status`` a JSON snapshot for people and tests.

The server runs with ``handle_signals=False``: signals belong to the task supervisor.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler

from supervisor.errors import ListenError, os_reason

Checks = Callable[[], dict[str, bool]]


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, text=json.dumps(body, default=str, indent=1),
                        content_type="application/json")


def build_app(*, liveness: Checks, readiness: Checks, status: Callable[[], dict[str, Any]],
              registry: CollectorRegistry) -> web.Application:
    async def livez(_: web.Request) -> web.Response:
        checks = liveness()
        ok = all(checks.values())
        return _json({"ok": ok, "checks": checks}, 200 if ok else 503)

    async def readyz(_: web.Request) -> web.Response:
        checks = readiness()
        ok = all(checks.values())
        return _json({"ok": ok, "checks": checks}, 200 if ok else 503)

    async def status_handler(_: web.Request) -> web.Response:
        return _json(status())

    app = web.Application(client_max_size=1024 * 1024)
    app.router.add_get("/livez", livez)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", status_handler)
    app.router.add_get("/metrics", make_aiohttp_handler(registry))
    return app


def report_app(routes: list[web.RouteDef], max_bytes: int,
               on_shutdown: Callable[[web.Application], Awaitable[None]] | None = None
               ) -> web.Application:
    """The controller's report listener: the report routes and nothing else;
    ``on_shutdown`` ends the open report streams before the listener goes."""
    app = web.Application(client_max_size=max_bytes)
    app.router.add_routes(routes)
    if on_shutdown is not None:
        app.on_shutdown.append(on_shutdown)
    return app


class HttpServer:
    """An aiohttp site on ``host:port`` (HTTPS with ``ssl_context``); ``port`` 0 picks a
    free one (see ``bound``). ``setting`` names the address's setting in errors."""

    def __init__(self, app: web.Application, listen: str,
                 ssl_context: ssl.SSLContext | None = None, *,
                 setting: str = "http.listen") -> None:
        self._listen = listen
        self._setting = setting
        host, _, port = listen.rpartition(":")
        self._host = host.strip("[]")
        self._port = int(port)
        self._ssl = ssl_context
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1.0,
                                     access_log=None)
        self.bound: tuple[str, int] | None = None

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port, reuse_address=True,
                           ssl_context=self._ssl)
        try:
            await site.start()
        except OSError as exc:  # in use, not this host's address, a name that won't resolve
            await self._runner.cleanup()
            raise ListenError(self._setting, self._listen, os_reason(exc)) from exc
        server = site._server  # aiohttp exposes the asyncio server only privately
        sockets = getattr(server, "sockets", None) or []
        if sockets:
            addr = sockets[0].getsockname()
            self.bound = (addr[0], addr[1])

    async def stop(self) -> None:
        await self._runner.cleanup()
