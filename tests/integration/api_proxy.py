"""A real HTTP proxy in front of the test API server that can hold one client's requests:
a network path gone slow, or a process stopped just before a write, for one controller."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from simulator.controlplane.cluster import KubeTestCluster


class ApiProxy:
    """A real HTTP proxy between one controller and the API server that can hold every
    request — a network path (or an API server) gone slow for that controller only.

    Held requests are forwarded on release whether or not their client is still waiting,
    as a request stuck in a queue somewhere would be: the question is what the API server
    does with a write that arrives late."""

    def __init__(self, cluster: KubeTestCluster,
                 hold_from: Callable[[str, str, bytes], bool] | None = None) -> None:
        """``hold_from(method, path, body)``: start holding at the first request it
        matches (that request included), as a process stopped just before that write
        would."""
        self.cluster = cluster
        self.hold_from = hold_from
        self.holding = False
        self._released = asyncio.Event()
        self._released.set()
        self.held = 0
        self.late_statuses: list[tuple[str, str, int]] = []
        self._runner: Any = None
        self._session: Any = None
        self._handlers: set[asyncio.Task[Any]] = set()
        self.url = ""

    async def start(self) -> ApiProxy:
        import ssl as ssl_mod

        import aiohttp
        from aiohttp import web

        ctx = ssl_mod.create_default_context(cafile=str(self.cluster.ca_file))
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx),
                                              timeout=aiohttp.ClientTimeout(total=None))

        async def forward(request: web.Request, body: bytes, late: bool) -> Any:
            headers = {k: v for k, v in request.headers.items()
                       if k.lower() not in ("host", "content-length", "transfer-encoding")}
            upstream = await self._session.request(
                request.method, self.cluster.url + request.path_qs, data=body or None,
                headers=headers)
            if late:
                self.late_statuses.append((request.method, request.path, upstream.status))
            return upstream

        async def handle(request: web.Request) -> web.StreamResponse:
            task = asyncio.current_task()
            assert task is not None
            self._handlers.add(task)
            try:
                return await proxied(request)
            finally:
                self._handlers.discard(task)

        async def proxied(request: web.Request) -> web.StreamResponse:
            body = await request.read()
            late = False
            if self.hold_from is not None and self.hold_from(request.method, request.path, body):
                self.hold_from = None
                self.hold()
            if self.holding:
                self.held += 1
                late = True
                # Shielded: the client giving up must not cancel the forward.
                await asyncio.shield(self._released.wait())
            upstream = await asyncio.shield(forward(request, body, late))
            resp = web.StreamResponse(status=upstream.status)
            resp.content_type = upstream.content_type
            try:
                await resp.prepare(request)
                async for chunk in upstream.content.iter_any():
                    await resp.write(chunk)
            except (ConnectionError, RuntimeError):
                pass  # the client went away (it timed out waiting for us)
            finally:
                upstream.release()
            return resp

        app = web.Application(client_max_size=16 << 20)
        app.router.add_route("*", "/{tail:.*}", handle)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None,
                                     shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def hold(self) -> None:
        self.holding = True
        self._released.clear()

    async def until_held(self) -> None:
        """Until a request is held (ten seconds at most)."""
        for _ in range(500):
            if self.held:
                return
            await asyncio.sleep(0.02)
        raise AssertionError("no request was held")

    def release(self) -> None:
        self.holding = False
        self._released.set()

    async def close(self) -> None:
        self.release()
        handlers = list(self._handlers)
        for task in handlers:  # the streams (watches) still being copied
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await self._runner.cleanup()
        await self._session.close()
