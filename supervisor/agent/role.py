"""The node agent: NVML probes → detectors → findings → NodeConditions, metrics, reports.

Shape of the running agent (every box is a supervised root task or a daemon thread):

    probe-gpu-N (one task + one worker thread per GPU)      xid thread (NVML event set)
            │ GpuSample / deadline miss                          │ XidEvent (batched)
            ▼                                                    ▼
      GpuDetectors ──verdicts──▶ FindingBook ◀──verdicts── XidDetector
                                    │ transitions
              ┌─────────────────────┼──────────────────────┐
              ▼                     ▼                      ▼
    node-conditions (kube)     reporter (controller)    /status, /metrics (read at request)

Each GPU has its own loop and its own worker thread, so an NVML call wedged on one GPU
turns into a ``gpu_unresponsive`` finding for that GPU while the others keep their
cadence and ``/livez`` keeps answering. XIDs arrive through NVML's event-set API on a
dedicated thread; bursts are coalesced before they reach the event loop, so 10,000
identical XIDs cost one verdict, not 10,000 loop wake-ups.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from probes.nvml import DriverInfo, Nvml, NvmlCallFailed, NvmlUnavailable, XidEventSet
from probes.observations import GpuIdentity, GpuSample, XidEvent
from supervisor import __version__
from supervisor.agent.conditions import evaluate
from supervisor.config import Settings
from supervisor.detectors.gpu import GpuDetectors
from supervisor.detectors.xid import XidDetector
from supervisor.errors import DeadlineExceeded, SupervisorError
from supervisor.findings import (
    FaultClass,
    Finding,
    FindingBook,
    FindingKey,
    Severity,
    Subject,
    Transition,
    Verdict,
    log_level,
)
from supervisor.runtime.clock import Clock
from supervisor.runtime.deadline import BlockingWorker, WorkerBusy
from supervisor.runtime.tasks import TaskGroup

log = structlog.get_logger(__name__)


STAGGER_SECONDS = 0.001
XID_LOG_SECONDS = 10.0  # at most one "xid" log line per (GPU, XID) this often
NEWS_SECONDS = 1.0  # at most one report per this long for XIDs that recur


class ProbeObserver(Protocol):
    """Receives probe timings as they happen (the metrics layer implements it)."""

    def sample_done(self, seconds: float) -> None: ...

    def round_done(self, seconds: float) -> None: ...


class NvmlStartupError(SupervisorError):
    """NVML could not be initialised or enumerated within its deadline (retried)."""


@dataclass
class GpuState:
    identity: GpuIdentity
    detectors: GpuDetectors
    worker: BlockingWorker
    last_sample: GpuSample | None = None
    last_sample_wall: float | None = None
    last_tick: float = 0.0
    stuck_since: float | None = None
    deadline_misses: int = 0
    samples: int = 0
    durations: deque[float] = field(default_factory=lambda: deque(maxlen=120))


class RoundTracker:
    """Duration of probe round k: from tick k until every GPU finished (or skipped) it."""

    def __init__(self, gpus: int, keep: int = 600) -> None:
        self._gpus = gpus
        self._open: dict[int, tuple[float, int]] = {}
        self.durations: deque[float] = deque(maxlen=keep)
        self.completed = 0

    def done(self, k: int, started: float, finished: float) -> float | None:
        first, count = self._open.get(k, (started, 0))
        count += 1
        if count < self._gpus:
            self._open[k] = (first, count)
            # Forget rounds a stuck GPU will never close, so the map stays bounded.
            for old in [r for r in self._open if r < k - 10]:
                del self._open[old]
            return None
        self._open.pop(k, None)
        duration = finished - first
        self.durations.append(duration)
        self.completed += 1
        return duration


class Agent:
    """One node's agent. Construct, ``await start(group)``, then read its state."""

    def __init__(self, settings: Settings, nvml: Nvml, clock: Clock,
                 observer: ProbeObserver | None = None) -> None:
        self.settings = settings
        self.observer = observer
        self.node = settings.node_name
        self.nvml = nvml
        self.clock = clock
        self.book = FindingBook()
        self.gpus: dict[int, GpuState] = {}
        self.driver: DriverInfo | None = None
        self.xid: XidDetector | None = None
        self.xid_refused: dict[int, str] = {}
        self.rounds = RoundTracker(1)
        self.started_wall = clock.wall()
        self._control = BlockingWorker("nvml-control")
        self._group: TaskGroup | None = None
        self.init_attempts = 0
        self.init_error: str | None = None
        self.refused_gpus: dict[int, str] = {}
        self.expected_gpus: tuple[int, str] | None = (
            (settings.nvml.expected_gpus, "nvml.expected_gpus")
            if settings.nvml.expected_gpus else None)
        self._epoch = 0.0
        self._xid_thread: threading.Thread | None = None
        self._xid_stop = threading.Event()
        self._xid_inbox: deque[XidEvent] = deque()
        self._xid_lock = threading.Lock()
        self._xid_drain_scheduled = False
        self._xid_thread_error: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._xid_unlogged: dict[tuple[int, int], int] = {}
        self._xid_logged_at: dict[tuple[int, int], float] = {}
        self._xid_log_due: dict[tuple[int, int], asyncio.TimerHandle] = {}
        self.listeners: list[Callable[[], None]] = []
        # Told when a finding got new evidence without changing (an XID recurred): the
        # controller judges whose fault an application's XIDs are from when they recur.
        # At most once per NEWS_SECONDS: a storm is news once, not ten thousand times.
        self.news_listeners: list[Callable[[], None]] = []
        self._news_at = -NEWS_SECONDS
        self._news_due: asyncio.TimerHandle | None = None
        self.book.subscribe(self._on_transition)

    # --- start-up -------------------------------------------------------------------------

    async def start(self, group: TaskGroup) -> None:
        """Start bringing NVML up (retried until the driver answers), then the probes.

        Never fails on a broken driver: an agent that exits when NVML is down crash-loops
        before it can publish anything, and the node looks healthy. It stays up, serves
        ``/livez``, and reports a ``driver_error`` finding until NVML answers."""
        self._loop = asyncio.get_running_loop()
        self._group = group
        group.start("nvml-init", self._init_until_up(), finishable=True)
        group.start("xid-expiry", self._housekeeping())

    async def _init_until_up(self) -> None:
        """Initialise NVML, retrying with doubling waits; then start the probe loops."""
        wait = 1.0
        while True:
            try:
                await self._init_once()
            except NvmlStartupError as exc:
                self.init_attempts += 1
                first = self.init_error is None
                self.init_error = str(exc)
                if first:
                    log.error("NVML not available; retrying", error=str(exc))
                self.book.apply([self._driver_verdict(str(exc))], self.clock.wall())
                await asyncio.sleep(wait)
                wait = min(wait * 2, self.settings.nvml.init_retry_max_seconds)
                continue
            if self.init_error is not None:
                log.info("NVML available again", attempts=self.init_attempts + 1)
            self.init_attempts += 1
            self.init_error = None
            self.book.apply([Verdict.clear(self._node_key(FaultClass.DRIVER_ERROR))],
                            self.clock.wall())
            return

    async def _init_once(self) -> None:
        timeout = self.settings.nvml.call_timeout_seconds
        try:
            driver = await self._control.call("NVML init", self.nvml.init, timeout)
            found = await self._control.call("NVML enumerate", self.nvml.enumerate, timeout)
            events = await self._control.call(
                "NVML event registration",
                lambda: self.nvml.open_xid_events([g.index for g in found.gpus]), timeout)
        except (DeadlineExceeded, WorkerBusy, NvmlCallFailed, NvmlUnavailable) as exc:
            if isinstance(exc, NvmlCallFailed):
                # Initialised but unusable: start from scratch next time.
                await self._control.call("NVML shutdown", self.nvml.shutdown, timeout)
            raise NvmlStartupError(str(exc)) from exc
        self.driver = driver
        for ident in found.gpus:
            self.gpus[ident.index] = GpuState(
                identity=ident,
                detectors=GpuDetectors(ident, self.node, self.settings.detectors),
                worker=BlockingWorker(f"nvml-gpu{ident.index}"),
            )
        self.refused_gpus = found.refused
        for index, why in found.refused.items():
            log.error("GPU cannot be opened", gpu=index, error=why)
        self.rounds = RoundTracker(max(len(self.gpus), 1))
        self.xid = XidDetector({i: g.identity for i, g in self.gpus.items()}, self.node,
                               self.settings.detectors)
        self.xid_refused = events.refused
        for index, why in events.refused.items():
            log.warning("GPU refused XID event registration", gpu=index, error=why)
        self._xid_thread = threading.Thread(target=self._xid_thread_main, args=(events,),
                                            name="nvml-xid-events", daemon=True)
        self._xid_thread.start()
        log.info("agent started", node=self.node, gpus=len(self.gpus),
                 driver=self.driver.driver_version)
        self._epoch = self.clock.monotonic()
        assert self._group is not None
        for index in self.gpus:
            self._group.start(f"probe-gpu-{index}", self._gpu_loop(index))
        self._check_gpu_count()

    def expect_gpus(self, count: int, source: str) -> None:
        """How many GPUs this node should have (config, else the Node's physical count)."""
        if self.settings.nvml.expected_gpus:
            count, source = self.settings.nvml.expected_gpus, "nvml.expected_gpus"
        self.expected_gpus = (count, source)
        self._check_gpu_count()

    def _check_gpu_count(self) -> None:
        """``gpu_missing`` while fewer GPUs are usable than expected, or NVML could not
        open one it counts. Judged only once NVML is up: before that, driver_error says
        more."""
        if self.driver is None:
            return
        expected, source = self.expected_gpus or (0, "")
        usable = len(self.gpus)
        problems = [f"GPU {i}: {why}" for i, why in sorted(self.refused_gpus.items())]
        if expected > usable:
            problems.insert(0, f"{usable} of {expected} GPUs visible (expected from {source})")
        key = self._node_key(FaultClass.GPU_MISSING)
        if not problems:
            self.book.apply([Verdict.clear(key)], self.clock.wall())
            return
        self.book.apply([Verdict(
            key=key, active=True, subject=self._node_subject(), severity=Severity.CRITICAL,
            reason="GPUMissing", message="; ".join(problems),
            evidence={"expected": expected, "usable": usable, "expected_from": source,
                      "unopened": sorted(self.refused_gpus)},
            action="reset_gpu")], self.clock.wall())

    def _node_subject(self) -> Subject:
        return Subject(kind="node", id=self.node, node=self.node)

    def _node_key(self, fault_class: FaultClass) -> FindingKey:
        return FindingKey(fault_class, self.node)

    def _driver_verdict(self, error: str) -> Verdict:
        return Verdict(
            key=self._node_key(FaultClass.DRIVER_ERROR), active=True,
            subject=self._node_subject(), severity=Severity.CRITICAL,
            reason="NVMLUnavailable", message=f"NVML is not available: {error}",
            evidence={"error": error, "attempts": self.init_attempts},
            action="check_driver")

    def stop(self) -> None:
        """Release threads; never blocks (a wedged NVML call is simply abandoned)."""
        self._xid_stop.set()
        for key in list(self._xid_log_due):  # what a storm's window still holds, logged now
            self._xid_log_due[key].cancel()
            self._flush_xid_log(key)
        if self._news_due is not None:
            self._news_due.cancel()
        for gpu in self.gpus.values():
            gpu.worker.close()
        self._control.close()

    # --- probing --------------------------------------------------------------------------

    async def _gpu_loop(self, index: int) -> None:
        gpu = self.gpus[index]
        interval = self.settings.nvml.probe_interval_seconds
        timeout = self.settings.nvml.call_timeout_seconds
        # GPUs share one tick grid but start a millisecond apart. Started together, eight
        # worker threads fight over the GIL at every NVML call (each call releases and
        # re-takes it), and the hand-offs cost more CPU than the sampling itself.
        offset = index * min(STAGGER_SECONDS, interval / (4 * max(len(self.gpus), 1)))
        k = 0
        await asyncio.sleep(offset)
        while True:
            tick = self._epoch + k * interval
            gpu.last_tick = self.clock.monotonic()
            detail = k % self.settings.nvml.detail_every == 0
            verdicts = await self._sample_once(gpu, timeout, detail)
            self.book.apply(verdicts, self.clock.wall())
            round_seconds = self.rounds.done(k, tick, self.clock.monotonic())
            if round_seconds is not None and self.observer is not None:
                self.observer.round_done(round_seconds)
            # Next tick on the shared grid; skip ticks we overran rather than bunching up.
            now = self.clock.monotonic()
            k = max(k + 1, int((now - self._epoch) // interval) + 1)
            await asyncio.sleep(max(0.0, self._epoch + k * interval + offset - now))

    async def _sample_once(self, gpu: GpuState, timeout: float,
                           detail: bool) -> list[Verdict]:
        index = gpu.identity.index
        try:
            sample = await gpu.worker.call(f"NVML sample of GPU {index}",
                                           lambda: self.nvml.sample(index, detail), timeout)
        except DeadlineExceeded:
            gpu.deadline_misses += 1
            if gpu.stuck_since is None:
                gpu.stuck_since = self.clock.monotonic() - timeout
                log.error("NVML probe stuck", gpu=index, uuid=gpu.identity.uuid,
                          deadline_seconds=timeout)
            return gpu.detectors.unresponsive(self.clock.monotonic() - gpu.stuck_since, timeout)
        except WorkerBusy:
            stuck_since = gpu.stuck_since or self.clock.monotonic()
            return gpu.detectors.unresponsive(self.clock.monotonic() - stuck_since, timeout)
        if gpu.stuck_since is not None:
            log.info("NVML probe answered again", gpu=index,
                     stuck_seconds=round(self.clock.monotonic() - gpu.stuck_since, 3))
        gpu.stuck_since = None
        gpu.last_sample = sample
        gpu.last_sample_wall = self.clock.wall()
        gpu.samples += 1
        gpu.durations.append(sample.duration)
        if self.observer is not None:
            self.observer.sample_done(sample.duration)
        return gpu.detectors.observe(sample)

    async def _housekeeping(self) -> None:
        """Expire XID findings that stopped repeating; once a second is plenty for that."""
        while True:
            await asyncio.sleep(1.0)
            if self.xid is not None:
                self.book.apply(self.xid.expire(self.clock.monotonic()), self.clock.wall())
            if self._xid_thread is not None and not self._xid_thread.is_alive() \
                    and not self._xid_stop.is_set():
                raise SupervisorError(f"XID event thread died: {self._xid_thread_error}")

    # --- XID events -----------------------------------------------------------------------

    def _xid_thread_main(self, events: XidEventSet) -> None:
        wait_ms = self.settings.nvml.event_wait_ms
        try:
            while not self._xid_stop.is_set():
                try:
                    event = events.wait(wait_ms)
                except NvmlCallFailed as exc:
                    self._xid_thread_error = str(exc)
                    log.warning("XID event wait failed", error=str(exc))
                    self._xid_stop.wait(1.0)
                    continue
                if event is None:
                    continue
                with self._xid_lock:
                    self._xid_inbox.append(event)
                    if self._xid_drain_scheduled:
                        continue
                    self._xid_drain_scheduled = True
                loop = self._loop
                if loop is None or loop.is_closed():
                    return
                try:
                    loop.call_soon_threadsafe(self._drain_xids)
                except RuntimeError:  # loop closed during shutdown
                    return
        finally:
            events.close()

    def _drain_xids(self) -> None:
        with self._xid_lock:
            batch = list(self._xid_inbox)
            self._xid_inbox.clear()
            self._xid_drain_scheduled = False
        if self.xid is None or not batch:
            return
        # Coalesce runs of the same (GPU, XID): one verdict per distinct pair per batch.
        groups: dict[tuple[int, int], tuple[XidEvent, int]] = {}
        for event in batch:
            key = (event.gpu_index, event.xid)
            _, n = groups.get(key, (event, 0))
            groups[key] = (event, n + 1)
        verdicts = []
        for event, n in groups.values():
            verdict = self.xid.observe(event, repeat=n)
            self._log_xid(event.gpu_index, event.xid, n)
            if verdict is not None:
                verdicts.append(verdict)
        self.book.apply(verdicts, self.clock.wall())
        if verdicts:
            self._news()

    def _news(self) -> None:
        """Tell the news listeners now, or when NEWS_SECONDS have passed since last time."""
        wait = self._news_at + NEWS_SECONDS - self.clock.monotonic()
        if wait <= 0:
            self._news_at = self.clock.monotonic()
            for listener in self.news_listeners:
                listener()
        elif self._news_due is None and self._loop is not None:
            def due() -> None:
                self._news_due = None
                self._news()
            self._news_due = self._loop.call_later(wait, due)

    def _log_xid(self, gpu: int, xid: int, n: int) -> None:
        """A line per (GPU, XID) at most every XID_LOG_SECONDS, counting the events since the
        last one: a storm is coalesced in the log as it is in the findings. The first event
        is logged at once; what arrives after it within the window, when the window ends."""
        key = (gpu, xid)
        self._xid_unlogged[key] = self._xid_unlogged.get(key, 0) + n
        wait = self._xid_logged_at.get(key, -XID_LOG_SECONDS) + XID_LOG_SECONDS \
            - self.clock.monotonic()
        if wait <= 0:
            self._flush_xid_log(key)
        elif key not in self._xid_log_due and self._loop is not None:
            self._xid_log_due[key] = self._loop.call_later(wait, self._flush_xid_log, key)

    def _flush_xid_log(self, key: tuple[int, int]) -> None:
        self._xid_log_due.pop(key, None)
        count = self._xid_unlogged.pop(key, 0)
        if count:
            self._xid_logged_at[key] = self.clock.monotonic()
            log.info("xid", gpu=key[0], xid=key[1], count=count)

    # --- state for the outside world ------------------------------------------------------

    def _on_transition(self, transition: Transition, finding: Finding) -> None:
        getattr(log, log_level(transition, finding))(
            "finding " + str(transition), fault_class=str(finding.fault_class),
            severity=str(finding.severity), reason=finding.reason, subject=finding.subject.id,
            message=finding.message)
        for listener in self.listeners:
            listener()

    @property
    def ready(self) -> bool:
        """What we report is real: every GPU has been sampled (or found stuck) once and XID
        events are registered — or NVML is down and that is what we report."""
        if self.init_error is not None:
            return True
        if self._xid_thread is None:
            return False
        return all(g.samples > 0 or g.stuck_since is not None for g in self.gpus.values())

    def liveness(self) -> dict[str, bool]:
        """Is the agent's machinery turning? GPU health is deliberately not part of it."""
        now = self.clock.monotonic()
        interval = self.settings.nvml.probe_interval_seconds
        budget = 3 * interval + self.settings.nvml.call_timeout_seconds + 5
        checks = {f"probe-gpu-{i}": now - g.last_tick < budget for i, g in self.gpus.items()}
        if self.driver is not None:  # before NVML is up there is no XID thread to check
            checks["xid-thread"] = self._xid_thread is not None and self._xid_thread.is_alive()
        return checks

    def probe_timings(self) -> dict[str, Any]:
        rounds = list(self.rounds.durations)
        return {
            "interval_seconds": self.settings.nvml.probe_interval_seconds,
            "deadline_seconds": self.settings.nvml.call_timeout_seconds,
            "rounds_completed": self.rounds.completed,
            "round_ms_last": round(rounds[-1] * 1000, 3) if rounds else None,
            "round_ms_median": round(statistics.median(rounds) * 1000, 3) if rounds else None,
            "round_ms_max": round(max(rounds) * 1000, 3) if rounds else None,
        }

    def gpu_status(self, gpu: GpuState) -> dict[str, Any]:
        now = self.clock.monotonic()
        sample = gpu.last_sample
        out: dict[str, Any] = {
            "index": gpu.identity.index,
            "uuid": gpu.identity.uuid,
            "pci_bus_id": gpu.identity.pci_bus_id,
            "name": gpu.identity.name,
            "lost": bool(sample and sample.lost),
            "probe": {
                "samples": gpu.samples,
                "deadline_misses": gpu.deadline_misses,
                "stuck_seconds": None if gpu.stuck_since is None
                else round(now - gpu.stuck_since, 3),
                "last_duration_ms": round(gpu.durations[-1] * 1000, 3) if gpu.durations
                else None,
                "last_sample_age_seconds": None if sample is None
                else round(now - sample.taken_at, 3),
                "xid_events_registered": gpu.identity.index not in self.xid_refused,
            },
        }
        if sample is not None and not sample.lost:
            values = {k: getattr(sample, k) for k in sample.__slots__
                      if k not in ("index", "taken_at", "duration", "lost", "nvlink")}
            values["nvlink"] = None
            if sample.nvlink is not None:
                link = sample.nvlink
                values["nvlink"] = {"links": link.links, "active": link.active,
                                    "replay_errors": link.replay_errors,
                                    "recovery_errors": link.recovery_errors,
                                    "crc_flit_errors": link.crc_flit_errors,
                                    "crc_data_errors": link.crc_data_errors}
            out["sample"] = values
        return out

    def _findings(self) -> list[Finding]:
        return sorted(self.book.active(), key=lambda f: (-f.severity.rank, f.first_seen))

    @staticmethod
    def _conditions(findings: list[Finding]) -> dict[str, dict[str, Any]]:
        return {t: {"status": c.status, "reason": c.reason, "message": c.message}
                for t, c in evaluate(findings).items()}

    def status(self) -> dict[str, Any]:
        findings = self._findings()
        return {
            "role": "agent",
            "version": __version__,
            "node": self.node,
            "started_at": self.started_wall,
            "ready": self.ready,
            "driver": {
                "state": "up" if self.driver is not None else "down",
                "driver_version": self.driver.driver_version if self.driver else None,
                "nvml_version": self.driver.nvml_version if self.driver else None,
                "init_attempts": self.init_attempts, "init_error": self.init_error,
                "expected_gpus": None if self.expected_gpus is None else {
                    "count": self.expected_gpus[0], "from": self.expected_gpus[1]},
                "unopened_gpus": {str(i): why for i, why in self.refused_gpus.items()}},
            "gpus": [self.gpu_status(g) for g in self.gpus.values()],
            "findings": [f.as_dict() for f in findings],
            "recently_cleared": [f.as_dict() for f in self.book.recently_cleared],
            "conditions": self._conditions(findings),
            "probe": self.probe_timings(),
            "xid": {"events_total": self.xid.events_total if self.xid else 0,
                    "ignored_total": self.xid.ignored_total if self.xid else 0},
        }

    def report(self) -> dict[str, Any]:
        """The body pushed to the controller: identity, GPUs and findings, nothing local."""
        findings = self._findings()
        return {
            "apiVersion": "gpu-supervisor/v1",
            "kind": "NodeReport",
            "node": self.node,
            "agent_version": __version__,
            "gpus": [{"index": g.identity.index, "uuid": g.identity.uuid,
                      "pci_bus_id": g.identity.pci_bus_id, "name": g.identity.name,
                      "lost": bool(g.last_sample and g.last_sample.lost)}
                     for g in self.gpus.values()],
            "findings": [f.as_dict() for f in findings],
            "conditions": self._conditions(findings),
        }
