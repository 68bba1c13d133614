"""Pushes this daemon's state to the controller: on every change, and as a heartbeat.

The hand-off is a mailbox of one: ``poke()`` only marks the state dirty, and the sender
takes a fresh snapshot when it is ready to send. So a slow, absent or failing controller
costs the probes nothing — there is no queue to fill — and when it comes back it gets the
*latest* state, never a backlog of stale ones.

Each report travels over TLS (the controller's certificate verified against
``reporting.ca_file``) with the projected ServiceAccount token read from disk at send time
(the kubelet rotates it), and carries this process's boot identity (random per start), a
sequence and ``sent_at``, so the controller can tell a replayed or stale report from a new
one. The controller Service is headless: every replica gets every report, so a new leader
has a warm model.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import structlog

from supervisor.config import ReportingSettings
from supervisor.errors import DeadlineExceeded, SupervisorError
from supervisor.runtime.clock import Clock
from supervisor.runtime.deadline import with_deadline
from supervisor.tls import client_context

log = structlog.get_logger(__name__)

NODE_REPORT_PATH = "/v1/reports/node"
POD_REPORT_PATH = "/v1/reports/pod"


class Reporter:
    def __init__(self, url: str, token_file: Path, snapshot: Callable[[], dict[str, Any]],
                 clock: Clock, heartbeat: float, timeout: float,
                 path: str = NODE_REPORT_PATH, tls: ssl.SSLContext | None = None,
                 ready: Callable[[], bool] = lambda: True) -> None:
        self._endpoint = url.rstrip("/") + path
        parts = urlsplit(self._endpoint)
        self._scheme = parts.scheme
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._path = parts.path
        self._token_file = token_file
        self._snapshot = snapshot
        self._clock = clock
        self._heartbeat = heartbeat
        self._timeout = timeout
        self._tls = tls
        self._ready = ready
        self._dirty = asyncio.Event()
        self.boot = {"id": uuid.uuid4().hex, "started_at": clock.wall()}
        self.retry_after = 0.0  # seconds the controller asked us to wait (429)
        self.sequence = 0
        self.sent = 0
        self.failed = 0
        self.last_sent_wall: float | None = None
        self.last_error: str | None = None

    @classmethod
    def from_settings(cls, settings: ReportingSettings, snapshot: Callable[[], dict[str, Any]],
                      clock: Clock, path: str = NODE_REPORT_PATH,
                      ready: Callable[[], bool] = lambda: True) -> Reporter:
        """A reporter as configured: TLS verified against ``ca_file`` for https URLs."""
        url = settings.controller_url
        tls = client_context(settings.ca_file) if url.startswith("https://") else None
        if tls is None:
            log.warning("reporting without TLS: the report token travels in clear text",
                        url=url)
        return cls(url, Path(settings.token_file), snapshot, clock, settings.heartbeat_seconds,
                   settings.timeout_seconds, path=path, tls=tls, ready=ready)

    def poke(self) -> None:
        self._dirty.set()

    async def run(self) -> None:
        # Nothing is sent before the state is real (the first probe round done, or the
        # failure to probe found): an empty first report would read as "all healthy".
        # Readiness is a predicate over several sources, polled only until it first holds.
        while not self._ready():  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        backoff = 0.0
        async with aiohttp.ClientSession() as session:
            while True:
                ok = await self.send_once(session)
                # After a failure, wait before trying again (doubling up to the heartbeat)
                # even if the state keeps changing: a down controller must not be hammered.
                backoff = 0.0 if ok else min(max(backoff * 2, 0.5), self._heartbeat)
                wait = max(backoff, self.retry_after)
                self.retry_after = 0.0
                if wait:
                    await asyncio.sleep(wait)
                try:
                    await asyncio.wait_for(self._dirty.wait(), timeout=self._heartbeat)
                except TimeoutError:
                    pass  # heartbeat: send the full state even though nothing changed

    async def send_once(self, session: aiohttp.ClientSession) -> bool:
        self._dirty.clear()
        self.sequence += 1
        body = self._snapshot()
        body["boot"] = self.boot
        body["sequence"] = self.sequence
        body["sent_at"] = self._clock.wall()
        headers = {"Content-Type": "application/json"}
        try:
            token = self._token_file.read_text().strip()
        except OSError as exc:
            token = ""
            self.last_error = f"cannot read token file {self._token_file}: {exc.strerror}"
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = json.dumps(body)
        try:
            addresses = await with_deadline(f"resolve {self._host}", self._resolve(),
                                            self._timeout)
        except (OSError, DeadlineExceeded) as exc:
            return self._failed(exc)
        results = await asyncio.gather(*(
            with_deadline(f"report to {address}", self._post(session, address, data, headers),
                          self._timeout) for address in addresses), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        for error in errors:
            if not isinstance(error, aiohttp.ClientError | OSError | DeadlineExceeded
                              | ReportRejected):
                raise error
        if len(errors) == len(results):
            return self._failed(errors[0])
        self.sent += 1
        self.last_sent_wall = self._clock.wall()
        self.last_error = str(errors[0]) if errors else None
        return True

    def _failed(self, exc: BaseException) -> bool:
        self.failed += 1
        self.last_error = str(exc)
        log.warning("report failed", endpoint=self._endpoint, error=str(exc))
        return False

    async def _resolve(self) -> list[str]:
        infos = await asyncio.get_running_loop().getaddrinfo(
            self._host, self._port, type=socket.SOCK_STREAM)
        return sorted({str(info[4][0]) for info in infos})

    async def _post(self, session: aiohttp.ClientSession, address: str, body: str,
                    headers: dict[str, str]) -> None:
        host = f"[{address}]" if ":" in address else address
        url = f"{self._scheme}://{host}:{self._port}{self._path}"
        # Keep the Host header and TLS server name of the configured URL: we only chose
        # which replica's address to connect to.
        extra: dict[str, Any] = {}
        if self._scheme == "https":
            extra["server_hostname"] = self._host
            extra["ssl"] = self._tls if self._tls is not None else True
        async with session.post(url, data=body, headers={**headers, "Host": self._host},
                                **extra) as resp:
            if resp.status >= 300:
                if resp.status == 429:  # the controller is rate-limiting token reviews
                    try:
                        after = float(resp.headers.get("Retry-After", "1"))
                    except ValueError:
                        after = 1.0
                    self.retry_after = min(max(self.retry_after, after), self._heartbeat)
                text = (await resp.text())[:200]
                raise ReportRejected(f"{address} answered {resp.status}: {text}")


class ReportRejected(SupervisorError):
    """The controller answered, but not with a 2xx."""
