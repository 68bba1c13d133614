"""The sidecar: one per inference pod, watching what stops a multi-node replica most often.

    engine-probe (every probe_seconds)        peer-heartbeat (every heartbeat_seconds)
      /health, /metrics under deadlines         UDP to every peer, rows gossiped
      canary when idle ──┐                      peer-judge: phi, SWIM ping-req, classify
                         ▼                                    │
             EngineDetector ──verdicts──► FindingBook ◄── PeerDetector
                                              │ transitions
                 ┌────────────────────────────┼───────────────────────┐
                 ▼                            ▼                       ▼
       /readyz (the pod's traffic)   reporter (controller)     /status, /metrics

``/readyz`` is this pod's traffic signal: false while its engine is hung, crashed or
unhealthy, while the group cannot work together (a partition finding), or while it has not
formed yet (a member not heard since the start) — so the pod leaves its Service at the
kubelet's next readiness probe, before the controller acts.
``/livez`` is about the sidecar itself (its loops turning), never about the engine: a hung
engine must not get its watcher restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import uuid
from typing import Any

import structlog

from probes.engine import EngineCallFailed, EngineClient
from probes.peers import PeerSockets
from supervisor import __version__
from supervisor.config import Settings
from supervisor.detectors.engine import EngineDetector
from supervisor.detectors.peers import PeerDetector
from supervisor.errors import DeadlineExceeded, ListenError, os_reason
from supervisor.findings import (
    FaultClass,
    Finding,
    FindingBook,
    Severity,
    Subject,
    Transition,
    Verdict,
    log_level,
)
from supervisor.runtime.clock import Clock
from supervisor.runtime.deadline import with_deadline
from supervisor.runtime.tasks import TaskGroup
from supervisor.sidecar.collective import CollectiveRunner
from supervisor.sidecar.identity import Identity
from supervisor.sidecar.membership import Membership

log = structlog.get_logger(__name__)
CONFIRM_REFUSED_SECONDS = 0.2  # the second look at an engine port that refused us
# The engine's watch connection is opened at most this often: an engine (or a proxy) that
# closes every connection at once must not make the watch spin.
WATCH_SHORT_SECONDS = 0.5

NOT_READY_CLASSES = frozenset({FaultClass.ENGINE_CRASH, FaultClass.ENGINE_UNHEALTHY,
                               FaultClass.ENGINE_HANG, FaultClass.PARTITION,
                               FaultClass.COLLECTIVE_HANG})
# A new finding of these makes the leader run a collective check at once.
CHECK_ON = frozenset({FaultClass.ENGINE_HANG, FaultClass.PARTITION})


class Sidecar:
    """One pod's sidecar. Construct, ``await start(group)``, then read its state."""

    def __init__(self, settings: Settings, identity: Identity, clock: Clock,
                 engine: EngineClient | None) -> None:
        self.settings = settings
        self.identity = identity
        self.clock = clock
        self.engine = engine
        self.book = FindingBook()
        self.boot = uuid.uuid4().hex
        self.subject = Subject("pod", f"{identity.namespace}/{identity.pod}",
                               node=identity.node or None)
        self.engine_detector = EngineDetector(self.subject, settings.engine)
        s = settings.sidecar
        self.peers = PeerDetector(identity.group, identity.rank, identity.size, s,
                                  self._member_subject, clock.monotonic())
        self.membership = Membership(identity.group, identity.rank, self.boot, self.peers,
                                     fanout=s.indirect_probes,
                                     on_check_request=self._check_requested)
        self.collective = CollectiveRunner(
            settings, identity, clock, lambda v: self.book.apply(v, clock.wall()),
            self._member_subject) if settings.collective.enabled and identity.size > 1 \
            else None
        self.sockets = PeerSockets(self._on_datagram, self.peers.refused)
        self.listeners: list[Any] = []
        self.engine_probes = 0
        self.canaries = {"ok": 0, "failed": 0}
        self.last_canary: float | None = None
        self._canary_task: asyncio.Task[None] | None = None
        self._model: str = settings.engine.model
        self.unresolved: dict[int, str] = {}
        self._ticks: dict[str, float] = {}
        self._engine_wake = asyncio.Event()  # the watch saw the engine's port close: probe
        self.engine_watch_wakes = 0
        self.book.subscribe(self._on_transition)

    def _member_subject(self, rank: int) -> Subject:
        name = self.identity.pod_names[rank]
        pod_id = f"{self.identity.namespace}/{name}" if name else \
            f"{self.identity.group}/member-{rank}"
        return Subject("pod", pod_id)

    # --- running ---------------------------------------------------------------------------

    async def start(self, group: TaskGroup) -> None:
        host, _, port = self.settings.sidecar.peer_listen.rpartition(":")
        if self.identity.size > 1:
            try:
                await self.sockets.open(host.strip("[]"), int(port))
            except OSError as exc:
                raise ListenError("sidecar.peer_listen", self.settings.sidecar.peer_listen,
                                  os_reason(exc)) from exc
            log.info("peers listening", address=self.sockets.bound, group=self.identity.group,
                     rank=self.identity.rank, size=self.identity.size)
            await self._resolve()
            group.start("peer-resolve", self._resolve_loop())
            group.start("peer-heartbeat", self._heartbeat_loop())
            group.start("peer-judge", self._judge_loop())
        if self.engine is not None:
            group.start("engine-probe", self._engine_loop())
            group.start("engine-watch", self._engine_watch())
        if self.collective is not None:
            group.start("collective-worker", self.collective.keep_worker())
            group.start("collective-schedule", self.collective.schedule(self._group_complete))

    def _group_complete(self) -> bool:
        """Every member hears every member: time for the preflight check."""
        rows = self.peers.matrix(self.clock.monotonic())
        return all(all(cell is True for cell in row) for row in rows)

    def _check_requested(self) -> None:
        if self.collective is not None:
            self.collective.request()

    async def stop(self) -> None:
        self.sockets.close()
        if self._canary_task is not None:
            self._canary_task.cancel()
        if self.collective is not None:
            await self.collective.close()

    def _tick(self, name: str) -> None:
        self._ticks[name] = self.clock.monotonic()

    # --- the engine ------------------------------------------------------------------------

    async def _engine_loop(self) -> None:
        assert self.engine is not None
        e = self.settings.engine
        while True:
            self._tick("engine-probe")
            await self._probe_engine_once(self.engine, e.timeout_seconds)
            now = self.clock.monotonic()
            if self._canary_task is None and self.engine_detector.canary_due(
                    now, self.last_canary):
                self.last_canary = now
                self._canary_task = asyncio.create_task(self._canary(self.engine),
                                                        name="engine-canary")
            # A refused connection is confirmed at once, not a period later: nothing
            # listening on the port is what a crash looks like, and the group's traffic
            # waits for the confirmation (engine_crash needs failure_threshold refusals).
            pause = e.probe_seconds
            if 0 < self.engine_detector.refused < e.failure_threshold:
                pause = min(pause, CONFIRM_REFUSED_SECONDS)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._engine_wake.wait(), pause)
            self._engine_wake.clear()

    async def _engine_watch(self) -> None:
        """Hold an idle connection to the engine's port; when it ends and the port then
        refuses a new one, wake the probe loop at once. A process that dies has the kernel
        close its sockets that moment, so a crash is probed within milliseconds instead of
        up to a probe period later; the probe, not this watch, decides what it was."""
        assert self.engine is not None
        e = self.settings.engine
        was_open = False  # the last connection attempt found the port open
        while True:  # no liveness tick: waiting here for as long as the engine lives is
            opened = self.clock.monotonic()  # the point
            try:
                connection = await with_deadline("engine connect", self.engine.connect(),
                                                 e.timeout_seconds)
            except (DeadlineExceeded, EngineCallFailed) as exc:
                # Only the port going from open to refused is news: refused before it was
                # ever open is an engine still starting (vLLM binds its port after its
                # imports), refused again is what the probe loop already looks at.
                if isinstance(exc, EngineCallFailed) and exc.refused and was_open:
                    log.info("engine port refused a connection: probing now", error=str(exc))
                    self.engine_watch_wakes += 1
                    self._engine_wake.set()
                was_open = False
                await asyncio.sleep(e.probe_seconds)  # the probe loop takes it from here
                continue
            was_open = True
            self.engine_detector.port_open()
            await connection.closed()
            held = self.clock.monotonic() - opened
            if held < WATCH_SHORT_SECONDS:
                await asyncio.sleep(WATCH_SHORT_SECONDS - held)

    async def _probe_engine_once(self, engine: EngineClient, timeout: float) -> None:
        det = self.engine_detector
        verdicts: list[Verdict] = []
        try:
            answer = await with_deadline("engine health", engine.health(), timeout)
        except DeadlineExceeded as exc:
            verdicts += det.health_failed(str(exc), refused=False, now=self.clock.monotonic())
        except EngineCallFailed as exc:
            verdicts += det.health_failed(str(exc), refused=exc.refused,
                                          now=self.clock.monotonic())
        else:
            if 200 <= answer.status < 300:
                verdicts += det.health_ok()
            else:
                verdicts += det.health_failed(f"health answered {answer.status}",
                                              refused=False, status=answer.status,
                                              now=self.clock.monotonic())
        try:
            load = await with_deadline("engine metrics", engine.load(), timeout)
        except (DeadlineExceeded, EngineCallFailed) as exc:
            verdicts += det.load_failed(str(exc))
        else:
            verdicts += det.load(load, self.clock.monotonic())
        self.engine_probes += 1
        self.book.apply(verdicts, self.clock.wall())

    async def _canary(self, engine: EngineClient) -> None:
        e = self.settings.engine
        started = self.clock.monotonic()
        try:
            if not self._model:
                self._model = await with_deadline("engine models", engine.model(),
                                                  e.timeout_seconds)
            await with_deadline("canary completion",
                                engine.complete(self._model, e.canary_prompt),
                                e.canary_timeout_seconds)
        except (DeadlineExceeded, EngineCallFailed) as exc:
            self.canaries["failed"] += 1
            log.warning("canary failed", error=str(exc))
            self.book.apply(self.engine_detector.canary_failed(str(exc)), self.clock.wall())
        else:
            self.canaries["ok"] += 1
            self.book.apply(self.engine_detector.canary_done(
                self.clock.monotonic() - started), self.clock.wall())
        finally:
            self._canary_task = None

    # --- the group -------------------------------------------------------------------------

    async def _resolve(self) -> None:
        loop = asyncio.get_running_loop()
        for rank, (host, port) in enumerate(self.identity.peers):
            if rank == self.identity.rank:
                continue
            try:
                infos = await with_deadline(
                    f"resolve {host}", loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM,
                                                        family=socket.AF_INET),
                    self.settings.sidecar.resolve_seconds)
                address = (str(infos[0][4][0]), int(infos[0][4][1]))
                await self.sockets.connect(rank, address)
                self.unresolved.pop(rank, None)
            except (OSError, DeadlineExceeded) as exc:
                # Not resolvable yet (a pod starting) or no more (deleted): no heartbeats
                # go there; the detector sees the silence like any other.
                self.unresolved[rank] = str(exc)

    async def _resolve_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.sidecar.resolve_seconds)
            self._tick("peer-resolve")
            await self._resolve()

    async def _heartbeat_loop(self) -> None:
        interval = self.settings.sidecar.heartbeat_seconds
        # Members start together; a random phase keeps their datagrams from bunching.
        await asyncio.sleep(random.uniform(0, interval))
        while True:
            self._tick("peer-heartbeat")
            now = self.clock.monotonic()
            for rank, data in self.membership.heartbeat(now):
                self.sockets.send(rank, data)
            await asyncio.sleep(interval)

    async def _judge_loop(self) -> None:
        interval = self.settings.sidecar.heartbeat_seconds / 2
        while True:
            await asyncio.sleep(interval)
            self._tick("peer-judge")
            now = self.clock.monotonic()
            # Woken late, we were not running to hear anyone (starved, throttled, stopped):
            # that span is nobody's silence, and our next heartbeats say we were paused.
            paused = self.peers.awake(now, interval)
            if paused:
                log.warning("this sidecar was paused", seconds=round(paused, 3),
                            local_health=self.peers.local_health,
                            pauses=self.peers.pauses)
            for rank, data in self.membership.probe_requests(now):
                self.sockets.send(rank, data)
            self.book.apply(self.peers.evaluate(now), self.clock.wall())

    def _on_datagram(self, data: bytes, at: float) -> None:
        for rank, reply in self.membership.receive(data, at):
            self.sockets.send(rank, reply)

    # --- state for the outside world -------------------------------------------------------

    def _on_transition(self, transition: Transition, finding: Finding) -> None:
        getattr(log, log_level(transition, finding))(
            "finding " + str(transition), fault_class=str(finding.fault_class),
            severity=str(finding.severity), reason=finding.reason, subject=finding.subject.id,
            message=finding.message)
        if transition is Transition.RAISED and finding.fault_class in CHECK_ON and \
                self.collective is not None:
            # Another detector suspects the group: the leader checks its collectives now;
            # a member asks the leader to.
            if self.collective.leader:
                self.collective.request()
            else:
                for rank, data in self.membership.check_request():
                    self.sockets.send(rank, data)
        for listener in self.listeners:
            listener()

    def serving_problems(self) -> list[Finding]:
        return [f for f in self.book.active() if f.fault_class in NOT_READY_CLASSES
                and f.severity is Severity.CRITICAL]

    def readiness(self) -> dict[str, bool]:
        """This pod's traffic signal (see the module docstring)."""
        problems = {f.fault_class for f in self.serving_problems()}
        checks = {"group-formed": not self.peers.joining(self.clock.monotonic()),
                  "group-reachable": FaultClass.PARTITION not in problems}
        if self.engine is not None:
            checks["engine-started"] = self.engine_detector.started
            checks["engine-serving"] = not problems & {
                FaultClass.ENGINE_CRASH, FaultClass.ENGINE_UNHEALTHY, FaultClass.ENGINE_HANG}
        if self.collective is not None:
            checks["collective-preflight"] = self.collective.ready()
            checks["collectives-working"] = FaultClass.COLLECTIVE_HANG not in problems
        return checks

    def liveness(self) -> dict[str, bool]:
        """The sidecar's own loops are turning; nothing about the engine or the peers."""
        now = self.clock.monotonic()
        budgets = {"engine-probe": 3 * self.settings.engine.probe_seconds
                   + 2 * self.settings.engine.timeout_seconds + 5,
                   "peer-heartbeat": 20 * self.settings.sidecar.heartbeat_seconds + 5,
                   "peer-judge": 20 * self.settings.sidecar.heartbeat_seconds + 5}
        return {name: now - at < budgets.get(name, 3 * self.settings.sidecar.resolve_seconds
                                             + 10)
                for name, at in self._ticks.items()}

    def _findings(self) -> list[Finding]:
        return sorted(self.book.active(), key=lambda f: (-f.severity.rank, f.first_seen))

    def status(self) -> dict[str, Any]:
        now = self.clock.monotonic()
        ident = self.identity
        det = self.engine_detector
        load = det.last_load
        return {
            "role": "sidecar",
            "version": __version__,
            "pod": f"{ident.namespace}/{ident.pod}",
            "node": ident.node,
            "group": {"key": ident.group, "size": ident.size, "rank": ident.rank,
                      "members": [{"rank": r, "address": f"{h}:{p}",
                                   "pod": ident.pod_names[r] or None,
                                   "resolved": None if r == ident.rank else
                                   self.sockets.address(r) is not None,
                                   "phi": None if r == ident.rank else
                                   round(self.peers.phi(r, now), 2)}
                                  for r, (h, p) in enumerate(ident.peers)],
                      "reachability": self.peers.matrix(now),
                      "local_health": {"score": self.peers.local_health,
                                       "pauses": self.peers.pauses,
                                       "paused_seconds": round(self.peers.paused_seconds, 3),
                                       "last_pause_seconds": round(self.peers.last_pause, 3),
                                       "peers": {str(r): p.health for r, p in
                                                 sorted(self.peers.peers.items())}},
                      "joining": self.peers.joining(now),
                      "messages": dict(self.membership.counts)},
            "engine": None if self.engine is None else {
                "url": self.engine.base_url, "preset": self.engine.preset.name,
                "probes": self.engine_probes,
                # probes brought forward because the watch connection ended and the port
                # then refused: a crash seen between two periodic probes
                "watch_wakes": self.engine_watch_wakes,
                "running": None if load is None else load.running,
                "waiting": None if load is None else load.waiting,
                "inflight": None if load is None else load.inflight,
                "started": det.started,
                "missing_metrics": [] if load is None else list(load.missing),
                "seconds_since_progress": None if det.last_progress is None
                else round(now - det.last_progress, 3),
                "stall_window_seconds": round(det.stall_window(), 3),
                "canaries": dict(self.canaries)},
            "collective": None if self.collective is None else {
                "leader": self.collective.leader, "backend": self.collective.backend,
                "preflight_passed": self.collective.ready(),
                "checks": dict(self.collective.counts),
                "busy_seconds": round(self.collective.busy_seconds, 3),
                "worker_restarts": self.collective.restarts, "last": self.collective.last,
                "running": self.collective.running,
                "baseline_gbps": {str(size): self.collective.judge.baseline(size)
                                  for size in self.settings.collective.sizes_bytes}},
            "ready": all(self.readiness().values()),
            "findings": [f.as_dict() for f in self._findings()],
            "recently_cleared": [f.as_dict() for f in self.book.recently_cleared],
        }

    def report(self) -> dict[str, Any]:
        """The body pushed to the controller."""
        ident = self.identity
        return {
            "apiVersion": "gpu-supervisor/v1",
            "kind": "PodReport",
            "pod": {"namespace": ident.namespace, "name": ident.pod},
            "node": ident.node,
            "group": {"key": ident.group, "size": ident.size, "rank": ident.rank},
            "ready": all(self.readiness().values()),
            "sidecar_version": __version__,
            "findings": [f.as_dict() for f in self._findings()],
        }
