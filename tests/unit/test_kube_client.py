"""The Kubernetes adapter's request discipline against a real (local) HTTP server: every
attempt is fenced and bounded by the caller's Lease, and a deadline miss is a typed
temporary error whatever the retry setting."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from supervisor.errors import Fenced, KubeTemporaryError
from supervisor.kube import KubeClient, _Credentials, _Transport


class Lease:
    def __init__(self, left: float) -> None:
        self.left = left

    def remaining(self) -> float:
        return self.left


@pytest.fixture(name="server")
async def _server() -> AsyncIterator[tuple[str, list[str]]]:
    """/hang never answers (within a test's life); every request is recorded."""
    seen: list[str] = []
    handlers: set[asyncio.Task[object]] = set()

    async def hang(request: web.Request) -> web.Response:
        seen.append(request.method)
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        await asyncio.sleep(30)
        return web.json_response({})

    app = web.Application()
    app.router.add_route("*", "/hang", hang)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}", seen
    for task in handlers:  # the client gave up on them; finish them before the next test
        task.cancel()
    await asyncio.gather(*handlers, return_exceptions=True)
    await runner.cleanup()


@pytest.fixture(name="kube")
async def _kube(server: tuple[str, list[str]]) -> AsyncIterator[KubeClient]:
    kube = KubeClient(_Transport(_Credentials(server=server[0])), timeout=5.0)
    yield kube
    await kube.close()


async def test_no_attempt_is_sent_without_time_left_on_the_lease(
        kube: KubeClient, server: tuple[str, list[str]]) -> None:
    """A fenced write with no Lease left raises Fenced and never reaches the server."""
    with pytest.raises(Fenced):
        await kube.request("PATCH", "/hang", body={}, fence=Lease(0.0))
    assert server[1] == []


async def test_an_attempt_never_outlives_the_lease(kube: KubeClient) -> None:
    """With 0.3 s left on the Lease the request's deadline is 0.3 s, not the client's 5 s,
    and the miss is a temporary error."""
    with pytest.raises(KubeTemporaryError, match=r"within 0\.3s"):
        await kube.request("PATCH", "/hang", body={}, fence=Lease(0.3))


async def test_deadline_miss_without_retry_is_a_temporary_error(kube: KubeClient) -> None:
    """retry=False callers (Lease, state saves, Events) get KubeTemporaryError too, so
    the loops that catch KubeError survive a slow API server."""
    kube.timeout = 0.2
    with pytest.raises(KubeTemporaryError, match="did not finish"):
        await kube.request("PUT", "/hang", body={}, retry=False)
