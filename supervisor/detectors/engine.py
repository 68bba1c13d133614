"""An inference engine's health, from what ``probes.engine`` reads, as findings.

Three questions, three fault classes, all about this pod:

- ``engine_crash``: nothing listens on the engine's port any more (connection refused
  ``failure_threshold`` times in a row) — the process is gone;
- ``engine_unhealthy``: it listens but its health check fails (an error status, or no
  answer within the deadline), ``failure_threshold`` times in a row;
- ``engine_hang``: the data plane stopped. Either requests are running (or waiting, or in
  flight by the API server's own count — the one number that does not freeze with the
  engine's gauges) while
  none of the engine's progress metrics has moved for ``stall_seconds`` — a 200 from
  ``/health`` does not clear it, since a hung engine keeps answering that — or, while idle,
  a one-token canary completion did not finish within its deadline.

An engine that has never answered its health check is *loading* (a 70B model takes minutes
to load, and vLLM binds its port long before it answers on it): nothing it does then is a
crash or unhealthy, for ``startup_seconds`` from the sidecar's first probe; after that, never
having answered is ``engine_unhealthy`` (``EngineNeverStarted``). One exception: once its
port has accepted a connection (a process is there), refusals are that process gone —
``engine_crash`` even while loading. The pod is not ready
until the engine has answered once.

The window is ``stall_seconds``, widened to ``stall_step_multiple`` times the longest of
the engine's last few waits between moves while busy (see :meth:`EngineDetector.stall_window`).
The stall window starts at the later of the last progress seen and the moment the engine
became busy, so an engine that was idle for an hour is not "stalled" on its first request.
Progress is any change of any progress metric, gauges included: a long prefill under
chunked prefill emits no tokens until its last chunk, but its KV-cache use grows with every
chunk, so it is never mistaken for a stall.

Time is passed in (monotonic seconds), so the detector is tested without sleeping.
"""

from __future__ import annotations

from collections import deque

from probes.engine import EngineLoad
from supervisor.config import EngineSettings
from supervisor.findings import FaultClass, FindingKey, Severity, Subject, Verdict

RECENT_WAITS = 8  # the waits between progress moves the stall window is sized from


class EngineDetector:
    def __init__(self, subject: Subject, settings: EngineSettings) -> None:
        self.subject = subject
        self.settings = settings
        self._keys = {fc: FindingKey(fc, subject.id) for fc in (
            FaultClass.ENGINE_CRASH, FaultClass.ENGINE_UNHEALTHY)}
        self._stall_key = FindingKey(FaultClass.ENGINE_HANG, subject.id, "stall")
        self._canary_key = FindingKey(FaultClass.ENGINE_HANG, subject.id, "canary")
        self._metrics_key = FindingKey(FaultClass.ENGINE_UNHEALTHY, subject.id, "metrics")
        self.started = False  # the engine has answered its health check at least once
        # Its port has accepted a connection: a process is there, loading or serving. A
        # refusal after that, even before the first answer, is that process gone.
        self.bound = False
        self.first_probe: float | None = None
        self.refused = 0  # consecutive
        self.unhealthy = 0  # consecutive
        self.metrics_failures = 0  # consecutive
        self._progress: tuple[float | None, ...] | None = None
        self.last_progress: float | None = None
        self.busy_since: float | None = None
        self.idle_since: float | None = None
        self.last_load: EngineLoad | None = None
        self._waits: deque[float] = deque(maxlen=RECENT_WAITS)

    def _verdict(self, key: FindingKey, severity: Severity, reason: str, message: str,
                 action: str, **evidence: object) -> Verdict:
        return Verdict(key=key, active=True, subject=self.subject, severity=severity,
                       reason=reason, message=message, evidence=dict(evidence), action=action)

    # --- /health ---------------------------------------------------------------------------

    def health_ok(self) -> list[Verdict]:
        self.started = True
        self.refused = self.unhealthy = 0
        return [Verdict.clear(k) for k in self._keys.values()]

    def port_open(self) -> None:
        """The engine's port accepted a connection (the sidecar's watch)."""
        self.bound = True

    def health_failed(self, why: str, refused: bool, *, now: float,
                      status: int | None = None) -> list[Verdict]:
        if not self.started and not (refused and self.bound):
            return self._not_started(why, now)
        threshold = self.settings.failure_threshold
        if refused:
            self.refused += 1
            self.unhealthy = 0
            if self.refused < threshold:
                return []
            loading = "" if self.started else " (it had bound its port while loading its " \
                "model: the process is gone)"
            return [Verdict.clear(self._keys[FaultClass.ENGINE_UNHEALTHY]), self._verdict(
                self._keys[FaultClass.ENGINE_CRASH], Severity.CRITICAL, "EngineNotListening",
                f"engine not listening at {self.settings.url} ({self.refused} probes)"
                f"{loading}: {why}", "restart_group", probes=self.refused, error=why,
                loading=not self.started)]
        self.unhealthy += 1
        self.refused = 0
        if self.unhealthy < threshold:
            return []
        return [Verdict.clear(self._keys[FaultClass.ENGINE_CRASH]), self._verdict(
            self._keys[FaultClass.ENGINE_UNHEALTHY], Severity.CRITICAL, "EngineHealthFailing",
            f"engine health check failing ({self.unhealthy} probes): {why}", "restart_group",
            probes=self.unhealthy, status=status, error=why)]

    def _not_started(self, why: str, now: float) -> list[Verdict]:
        if self.first_probe is None:
            self.first_probe = now
        loading = now - self.first_probe
        if loading < self.settings.startup_seconds:
            return []
        return [self._verdict(
            self._keys[FaultClass.ENGINE_UNHEALTHY], Severity.CRITICAL, "EngineNeverStarted",
            f"engine at {self.settings.url} has not answered its health check in "
            f"{loading:.0f}s since the sidecar started (engine.startup_seconds "
            f"{self.settings.startup_seconds:g}): {why}", "restart_group",
            loading_seconds=round(loading, 1), error=why)]

    # --- progress --------------------------------------------------------------------------

    def load(self, load: EngineLoad, now: float) -> list[Verdict]:
        """One read of the engine's metrics at ``now``."""
        self.last_load = load
        self.metrics_failures = 0
        verdicts = [Verdict.clear(self._metrics_key)]
        if load.progress != self._progress:
            if self._progress is not None:
                if self.busy_since is not None and self.last_progress is not None:
                    # How long this busy engine took to move: one step, or one chunk of
                    # a long prefill — what the stall window must outlast. A wait that
                    # outlasted the window was a stall, now over: not a step to allow for.
                    wait = now - max(self.last_progress, self.busy_since)
                    if wait < self.stall_window():
                        self._waits.append(wait)
                self.last_progress = now
            self._progress = load.progress
            verdicts.append(Verdict.clear(self._canary_key))  # it moved: not hung now
        if not load.busy:
            self.busy_since = None
            if self.idle_since is None:
                self.idle_since = now
            return [*verdicts, Verdict.clear(self._stall_key)]
        self.idle_since = None
        if self.busy_since is None:
            self.busy_since = now
        since = max(self.busy_since, self.last_progress or self.busy_since)
        stalled = now - since
        window = self.stall_window()
        if stalled < window:
            return [*verdicts, Verdict.clear(self._stall_key)]
        inflight = "" if load.inflight is None else \
            f" ({load.inflight:g} in flight at its API server)"
        return [*verdicts, self._verdict(
            self._stall_key, Severity.CRITICAL, "EngineStalled",
            f"{load.running:g} request(s) running and {load.waiting:g} waiting{inflight}, but "
            f"no progress metric has moved for {stalled:.1f}s (window {window:.1f}s)",
            "restart_group", running=load.running, waiting=load.waiting,
            inflight=load.inflight, stalled_seconds=round(stalled, 3),
            window_seconds=round(window, 3), missing_metrics=list(load.missing))]

    def stall_window(self) -> float:
        """``stall_seconds``, or ``stall_step_multiple`` times the longest of the engine's
        recent waits between moves if that is longer: a long prompt's prefill chunks take
        longer and longer as its context grows (8 to 12 s each near the end of a
        100,000-token prompt on a CPU here), and a fixed window would call them a hang. A
        hang after quick steps is still seen in ``stall_seconds``."""
        longest = max(self._waits, default=0.0)
        return max(self.settings.stall_seconds, self.settings.stall_step_multiple * longest)

    def load_failed(self, why: str) -> list[Verdict]:
        """The metrics could not be read: progress cannot be judged."""
        if not self.started:
            return []  # loading: nothing to judge yet
        self.metrics_failures += 1
        if self.metrics_failures < self.settings.failure_threshold:
            return []
        return [self._verdict(self._metrics_key, Severity.WARNING, "EngineMetricsUnavailable",
                              f"engine metrics unreadable ({self.metrics_failures} probes): "
                              f"{why}; progress cannot be judged", "investigate",
                              error=why)]

    # --- canary ----------------------------------------------------------------------------

    def canary_due(self, now: float, last_canary: float | None) -> bool:
        s = self.settings
        return (s.canary and self.idle_since is not None
                and now - self.idle_since >= s.canary_idle_seconds
                and (last_canary is None or now - last_canary >= s.canary_interval_seconds))

    def canary_done(self, seconds: float) -> list[Verdict]:
        return [Verdict.clear(self._canary_key)]

    def canary_failed(self, why: str) -> list[Verdict]:
        return [self._verdict(
            self._canary_key, Severity.CRITICAL, "EngineCanaryFailed",
            f"idle engine did not complete a 1-token request: {why}", "restart_group",
            error=why)]
