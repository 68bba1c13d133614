"""Pushes this daemon's state to the controller: on every change, and as a heartbeat.

The hand-off is a mailbox of one: ``poke()`` only marks the state dirty, and the sender
takes a fresh snapshot when it is ready to send. So a slow, absent or failing controller
costs the probes nothing — there is no queue to fill — and when it comes back it gets the
*latest* state, never a backlog of stale ones.

The controller Service is headless: every replica gets every report, so a new leader has a
warm model. To each replica this reporter holds one **stream** (a WebSocket over TLS, the
controller's certificate verified against ``reporting.ca_file``): authenticated once with
the projected ServiceAccount token (read from disk at connect time: the kubelet rotates
it), it carries the full state when it changed and otherwise, each heartbeat, a *tick* of a
few dozen bytes saying "my last report still holds". Most heartbeats of a healthy fleet are
ticks, which cost the controller a small fraction of a POSTed report. The controller ends a
stream when the token's review is due (close code 4000); the reporter reconnects at once
with its current token. A controller without streams (404 on the handshake: an older
version) gets each report POSTed instead.

Every report and tick carries this process's boot identity (random per start), a sequence
and ``sent_at``, so the controller can tell a replayed or stale report from a new one; and
every report echoes the *epoch* the replica handed out (the first message of a stream, and
every answer), so that replica can tell a report made since it started from an old one
replayed after its restart. A report the replica *held* for want of its epoch (a POST
after a restart) is sent again at once, with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import structlog

from supervisor.config import ReportingSettings
from supervisor.errors import DeadlineExceeded, SupervisorError
from supervisor.runtime.clock import Clock
from supervisor.runtime.deadline import with_deadline
from supervisor.runtime.logging import Throttled
from supervisor.tls import client_context

log = structlog.get_logger(__name__)

NODE_REPORT_PATH = "/v1/reports/node"
POD_REPORT_PATH = "/v1/reports/pod"
STREAM_SUFFIX = "/stream"
REAUTHENTICATE = 4000  # the controller's close code: our token's review is due
# Close codes after which reconnecting at once is right (the controller asked for it, or
# it is shutting down and its successor or the other replica is there).
RECONNECT_NOW = frozenset({REAUTHENTICATE, aiohttp.WSCloseCode.GOING_AWAY})
_FAILURES = (aiohttp.ClientError, OSError, DeadlineExceeded)
MAX_RETRY_AFTER = 60.0  # seconds; the controller spreads a reconnecting fleet over this


class Reporter:
    def __init__(self, url: str, token_file: Path, snapshot: Callable[[], dict[str, Any]],
                 clock: Clock, heartbeat: float, timeout: float,
                 path: str = NODE_REPORT_PATH, tls: ssl.SSLContext | None = None,
                 ready: Callable[[], bool] = lambda: True,
                 addresses: Sequence[str] = ()) -> None:
        self._endpoint = url.rstrip("/") + path
        self._addresses = sorted(set(addresses))
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
        self._links: dict[str, asyncio.Event] = {}  # replica address → its dirty flag
        self._epochs: dict[str, str] = {}  # replica address → the epoch it handed out
        self._log_gate = Throttled(clock.monotonic)
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
                   settings.timeout_seconds, path=path, tls=tls, ready=ready,
                   addresses=settings.controller_addresses)

    def poke(self) -> None:
        for dirty in self._links.values():
            dirty.set()

    async def run(self) -> None:
        # Nothing is sent before the state is real (the first probe round done, or the
        # failure to probe found): an empty first report would read as "all healthy".
        # Readiness is a predicate over several sources, polled only until it first holds.
        while not self._ready():  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        links: dict[str, asyncio.Task[None]] = {}
        backoff = 0.0
        async with aiohttp.ClientSession() as session, asyncio.TaskGroup() as tasks:
            while True:
                # One link per replica address, followed as replicas come and go.
                try:
                    addresses = set(await with_deadline(f"resolve {self._host}",
                                                        self._resolve(), self._timeout))
                except (OSError, DeadlineExceeded) as exc:
                    self._failed(exc)
                    backoff = min(max(backoff * 2, 0.5), self._heartbeat)
                    await asyncio.sleep(backoff)
                    continue
                backoff = 0.0
                for address in addresses - links.keys():
                    self._links[address] = asyncio.Event()
                    links[address] = tasks.create_task(self._link(session, address),
                                                       name=f"report link {address}")
                for address in links.keys() - addresses:
                    links.pop(address).cancel()
                    del self._links[address]
                await asyncio.sleep(self._heartbeat)

    async def _link(self, session: aiohttp.ClientSession, address: str) -> None:
        """Reports to one replica, for as long as it resolves: a stream, reconnected as
        needed, or POSTs to a controller without streams."""
        dirty = self._links[address]
        streams = True
        backoff = 0.0
        while True:
            dirty.set()  # whatever we send first on a (new) connection is the full state
            try:
                if streams:
                    await self._stream(session, address, dirty)
                else:
                    await self._post(session, address)
                ok = True
            except _NoStream:
                log.info("controller has no report stream; posting each report", address=address)
                streams = False
                continue
            except (*_FAILURES, ReportRejected) as exc:
                ok = self._failed(exc)
            # After a failure, wait before trying again (doubling up to the heartbeat)
            # even if the state keeps changing: a down controller must not be hammered.
            backoff = 0.0 if ok else min(max(backoff * 2, 0.5), self._heartbeat)
            wait = max(backoff, self.retry_after)
            self.retry_after = 0.0
            if wait:
                await asyncio.sleep(wait)
            if not streams:
                with contextlib.suppress(TimeoutError):  # the heartbeat
                    await asyncio.wait_for(dirty.wait(), timeout=self._heartbeat)

    # --- one message ---------------------------------------------------------------------

    def _token_headers(self) -> dict[str, str]:
        headers = {"Host": self._host}
        try:
            token = self._token_file.read_text().strip()
        except OSError as exc:
            token = ""
            self.last_error = f"cannot read token file {self._token_file}: {exc.strerror}"
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def _stamped(self, body: dict[str, Any], address: str) -> str:
        self.sequence += 1
        if body.get("kind") != "Tick":
            body["epoch"] = self._epochs.get(address, "")
        body["boot"] = self.boot
        body["sequence"] = self.sequence
        body["sent_at"] = self._clock.wall()
        return json.dumps(body)

    def _sent(self) -> None:
        self.sent += 1
        self.last_sent_wall = self._clock.wall()

    def _failed(self, exc: BaseException) -> bool:
        self.failed += 1
        self.last_error = str(exc)
        held = self._log_gate.allow(type(exc).__name__)
        if held is not None:
            log.warning("report failed", endpoint=self._endpoint, error=str(exc),
                        similar_not_logged=held)
        return False

    async def _resolve(self) -> list[str]:
        if self._addresses:
            return self._addresses
        infos = await asyncio.get_running_loop().getaddrinfo(
            self._host, self._port, type=socket.SOCK_STREAM)
        return sorted({str(info[4][0]) for info in infos})

    def _url(self, address: str, path: str) -> tuple[str, dict[str, Any]]:
        """The URL of ``path`` on one replica, and the arguments that keep the configured
        URL's TLS server name: we only chose which replica's address to connect to."""
        host = f"[{address}]" if ":" in address else address
        extra: dict[str, Any] = {}
        if self._scheme == "https":
            extra["server_hostname"] = self._host
            extra["ssl"] = self._tls if self._tls is not None else True
        return f"{self._scheme}://{host}:{self._port}{path}", extra

    # --- streams ---------------------------------------------------------------------------

    async def _stream(self, session: aiohttp.ClientSession, address: str,
                      dirty: asyncio.Event) -> int:
        """One stream to ``address``, until the controller asks us to reconnect (its close
        code); ``ReportRejected`` when it ended any other way."""
        url, extra = self._url(address, self._path + STREAM_SUFFIX)
        url = "ws" + url.removeprefix("http")  # http → ws, https → wss
        try:
            ws = await with_deadline(
                f"connect to {address}",
                session.ws_connect(url, headers=self._token_headers(), **extra),
                self._timeout)
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status in (404, 405, 501):  # no such endpoint, or no GET at all
                raise _NoStream from exc
            if exc.status == 429:  # the controller is rate-limiting token reviews
                self._asked_to_wait(exc.headers.get("Retry-After") if exc.headers else None)
            raise ReportRejected(f"{address} answered {exc.status}: {exc.message}") from exc
        sock = ws.get_extra_info("socket")
        if sock is not None and hasattr(socket, "TCP_USER_TIMEOUT"):
            # A replica whose node vanished never answers: without this the kernel keeps
            # retransmitting our ticks for ~15 minutes before the stream counts as broken.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                            int(3 * self._heartbeat * 1000))
        refused = asyncio.Event()  # a flag, never waited on: send the full state next time
        hello = asyncio.Event()  # the replica's epoch arrived
        async with ws, asyncio.TaskGroup() as tasks:
            tasks.create_task(self._replies(ws, address, dirty, refused, hello))
            try:
                # The first report should carry the epoch the replica opens with (a
                # replica without epochs never sends one: then after the deadline).
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(hello.wait(), timeout=self._timeout)
                await self._send_stream(ws, address, dirty, refused)
            finally:
                await ws.close()
        code = ws.close_code
        if code not in RECONNECT_NOW:
            raise ReportRejected(f"stream to {address} ended (close code {code})")
        return int(code)

    async def _send_stream(self, ws: aiohttp.ClientWebSocketResponse, address: str,
                           dirty: asyncio.Event, refused: asyncio.Event) -> None:
        while not ws.closed:
            if dirty.is_set() or refused.is_set():
                dirty.clear()
                refused.clear()
                message = self._stamped(self._snapshot(), address)
            else:
                message = self._stamped({"kind": "Tick"}, address)
            try:
                await ws.send_str(message)
            except ConnectionError:
                return  # the stream broke; the reader sees why
            self._sent()
            with contextlib.suppress(TimeoutError):  # the heartbeat
                await asyncio.wait_for(dirty.wait(), timeout=self._heartbeat)

    async def _replies(self, ws: aiohttp.ClientWebSocketResponse, address: str,
                       dirty: asyncio.Event, refused: asyncio.Event,
                       hello: asyncio.Event) -> None:
        """The controller's answers: its epoch first, then an acknowledgement per full
        report, and a refusal for anything it did not accept. After a refusal the next
        message (at the heartbeat, not at once: a sender whose clock is off would otherwise
        be refused in a tight loop) carries the full state rather than a tick of a report
        the controller lacks. A report held for want of the epoch goes again at once."""
        try:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                try:
                    reply = json.loads(msg.data)
                except ValueError:
                    continue
                if not isinstance(reply, dict):
                    continue
                if self._learn_epoch(address, reply):
                    hello.set()
                if reply.get("kind") == "Hello":
                    continue
                if reply.get("held") and reply.get("status") == 202:
                    dirty.set()
                if reply.get("status") != 202:
                    self._failed(ReportRejected(
                        f"{address} refused report {reply.get('sequence')}: "
                        f"{reply.get('status')} {str(reply.get('error'))[:200]}"))
                    refused.set()
                else:
                    self.last_error = None
        finally:
            dirty.set()  # wake the sender: the stream is over

    # --- POST, for a controller without streams --------------------------------------------

    async def _post(self, session: aiohttp.ClientSession, address: str) -> None:
        self._links[address].clear()
        body = self._stamped(self._snapshot(), address)
        headers = {**self._token_headers(), "Content-Type": "application/json"}
        url, extra = self._url(address, self._path)

        async def post() -> bool:
            async with session.post(url, data=body, headers=headers, **extra) as resp:
                text = await resp.text()
                try:
                    answer = json.loads(text)
                except ValueError:
                    answer = None
                if isinstance(answer, dict):
                    self._learn_epoch(address, answer)
                if resp.status >= 300:
                    if resp.status == 429:  # the controller is rate-limiting token reviews
                        self._asked_to_wait(resp.headers.get("Retry-After"))
                    raise ReportRejected(f"{address} answered {resp.status}: {text[:200]}")
                return isinstance(answer, dict) and bool(answer.get("held"))

        held = await with_deadline(f"report to {address}", post(), self._timeout)
        self._sent()
        self.last_error = None
        if held:  # made before we knew the replica's epoch: again, with it
            self._links[address].set()

    def _learn_epoch(self, address: str, message: dict[str, Any]) -> bool:
        """Remember the epoch a replica handed out; True if ``message`` carried one."""
        epoch = message.get("epoch")
        if not isinstance(epoch, str) or not epoch:
            return False
        self._epochs[address] = epoch
        return True

    def _asked_to_wait(self, retry_after: str | None) -> None:
        """Honour Retry-After (429: the controller is rate-limiting token reviews, say after
        a restart while the whole fleet reconnects), up to a minute."""
        try:
            after = float(retry_after or "1")
        except ValueError:
            after = 1.0
        self.retry_after = min(max(self.retry_after, after), MAX_RETRY_AFTER)


class _NoStream(Exception):
    """The controller has no stream endpoint (an older version): POST instead."""


class ReportRejected(SupervisorError):
    """The controller answered, but not with a 2xx."""
