"""Pushes this daemon's state to the controller: on every change, and as a heartbeat.

The hand-off is a mailbox of one: ``poke()`` only marks the state dirty, and the sender
takes a fresh snapshot when it is ready to send. So a slow, absent or failing controller
costs the probes nothing — there is no queue to fill — and when it comes back it gets the
*latest* state, never a backlog of stale ones. Each report carries a sequence number and
the ServiceAccount token read from disk at send time (kubelet rotates it).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import structlog

from supervisor.errors import DeadlineExceeded, SupervisorError
from supervisor.runtime.clock import Clock
from supervisor.runtime.deadline import with_deadline

log = structlog.get_logger(__name__)

NODE_REPORT_PATH = "/v1/reports/node"


class Reporter:
    def __init__(self, url: str, token_file: Path, snapshot: Callable[[], dict[str, Any]],
                 clock: Clock, heartbeat: float, timeout: float,
                 path: str = NODE_REPORT_PATH) -> None:
        self._endpoint = url.rstrip("/") + path
        self._token_file = token_file
        self._snapshot = snapshot
        self._clock = clock
        self._heartbeat = heartbeat
        self._timeout = timeout
        self._dirty = asyncio.Event()
        self.sequence = 0
        self.sent = 0
        self.failed = 0
        self.last_sent_wall: float | None = None
        self.last_error: str | None = None

    def poke(self) -> None:
        self._dirty.set()

    async def run(self) -> None:
        backoff = 0.0
        async with aiohttp.ClientSession() as session:
            while True:
                ok = await self.send_once(session)
                # After a failure, wait before trying again (doubling up to the heartbeat)
                # even if the state keeps changing: a down controller must not be hammered.
                backoff = 0.0 if ok else min(max(backoff * 2, 0.5), self._heartbeat)
                if backoff:
                    await asyncio.sleep(backoff)
                try:
                    await asyncio.wait_for(self._dirty.wait(), timeout=self._heartbeat)
                except TimeoutError:
                    pass  # heartbeat: send the full state even though nothing changed

    async def send_once(self, session: aiohttp.ClientSession) -> bool:
        self._dirty.clear()
        self.sequence += 1
        body = self._snapshot()
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
        try:
            await with_deadline(f"report to {self._endpoint}",
                                self._post(session, json.dumps(body), headers), self._timeout)
        except (aiohttp.ClientError, OSError, DeadlineExceeded, ReportRejected) as exc:
            self.failed += 1
            self.last_error = str(exc)
            log.warning("report failed", endpoint=self._endpoint, error=str(exc))
            return False
        self.sent += 1
        self.last_sent_wall = self._clock.wall()
        return True

    async def _post(self, session: aiohttp.ClientSession, body: str,
                    headers: dict[str, str]) -> None:
        async with session.post(self._endpoint, data=body, headers=headers) as resp:
            if resp.status >= 300:
                text = (await resp.text())[:200]
                raise ReportRejected(f"controller answered {resp.status}: {text}")


class ReportRejected(SupervisorError):
    """The controller answered, but not with a 2xx."""
