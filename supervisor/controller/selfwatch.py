"""The controller watching itself: is it behind?

A supervisor that decides on stale evidence does harm while every health check says it is
fine — one GPU fleet's fault analyzer ran eleven days behind that way. So the controller
measures its own lag where it is paid, exports it, and says when it is behind (``/status``
``behind``, ``gpusupervisor_controller_behind``, the GPUSupervisorControllerBehind alert):

- **event-loop lag**: a timer due every ``LOOP_TICK_SECONDS``, how late it fires — the
  whole process starved (a CPU limit, a long garbage collection, a call that blocks);
- **watch lag**: how old an object's latest change is when its watch event reaches us
  (the newest ``managedFields`` time; whole seconds, so under a second reads as 0-1 s) —
  the API server, or our watch, falling behind;
- **report age at decision**: how old the newest report of each node an action is about
  was when the action was decided;
- **finding to action**: from the report that first carried a fault to the action's first
  answered write (also ``decision_latency``);
- the **review queue** (TokenReviews sent and not answered) and open report streams, from
  the token cache and the ingest.

Behind means: within the last ``BEHIND_WINDOW_SECONDS``, the loop lagged more than
``LOOP_LAG_BEHIND_SECONDS``, a watch event came more than ``WATCH_LAG_BEHIND_SECONDS``
after its change, a decision used a report older than ``REPORT_AGE_BEHIND_SECONDS``, or
more than ``REVIEWS_BEHIND`` reviews waited at once.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from typing import Any

from supervisor.metrics import Buckets
from supervisor.runtime.clock import Clock

LOOP_TICK_SECONDS = 1.0
BEHIND_WINDOW_SECONDS = 300.0
LOOP_LAG_BEHIND_SECONDS = 1.0
WATCH_LAG_BEHIND_SECONDS = 30.0
REPORT_AGE_BEHIND_SECONDS = 60.0  # six heartbeats: the news a decision used was that old
REVIEWS_BEHIND = 100

LOOP_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
WATCH_BOUNDS = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0, 86400.0)
AGE_BOUNDS = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
ACTION_BOUNDS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


def _changed_at(obj: dict[str, Any]) -> float | None:
    """Wall time of the object's latest recorded change (its newest managedFields entry)."""
    newest: float | None = None
    for entry in obj.get("metadata", {}).get("managedFields") or []:
        stamp = entry.get("time")
        if not isinstance(stamp, str):
            continue
        try:
            at = dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
        except ValueError:
            continue
        newest = at if newest is None else max(newest, at)
    return newest


class SelfWatch:
    """The lags of the module docstring, as histograms and recent worst values."""

    def __init__(self, clock: Clock, reviews_waiting: Callable[[], int] = lambda: 0) -> None:
        self._clock = clock
        self._reviews_waiting = reviews_waiting
        self.loop_lag = Buckets(LOOP_BOUNDS)
        self.watch_lag: dict[str, Buckets] = {}
        self.report_age = Buckets(AGE_BOUNDS)
        self.finding_to_action = Buckets(ACTION_BOUNDS)
        # what → (monotonic time it last went over its limit, the value then)
        self._over: dict[str, tuple[float, float]] = {}

    def _note(self, what: str, value: float, limit: float) -> None:
        if value > limit:
            self._over[what] = (self._clock.monotonic(), value)

    async def run(self) -> None:
        """Sample the event loop's lag for as long as the controller runs."""
        while True:
            due = self._clock.monotonic() + LOOP_TICK_SECONDS
            await asyncio.sleep(LOOP_TICK_SECONDS)
            lag = max(0.0, self._clock.monotonic() - due)
            self.loop_lag.observe(lag)
            self._note("event loop", lag, LOOP_LAG_BEHIND_SECONDS)

    def watch_event(self, resource: str, obj: dict[str, Any]) -> None:
        changed = _changed_at(obj)
        if changed is None:
            return
        lag = max(0.0, self._clock.wall() - changed)
        buckets = self.watch_lag.get(resource)
        if buckets is None:
            buckets = self.watch_lag[resource] = Buckets(WATCH_BOUNDS)
        buckets.observe(lag)
        self._note(f"watch of {resource}", lag, WATCH_LAG_BEHIND_SECONDS)

    def decided_on(self, age: float) -> None:
        """A decision used a node's newest report, ``age`` seconds old."""
        self.report_age.observe(age)
        self._note("report age at decision", age, REPORT_AGE_BEHIND_SECONDS)

    def acted(self, latency: float) -> None:
        self.finding_to_action.observe(latency)

    def behind(self) -> list[str]:
        """Why the controller is behind now (empty: it is not)."""
        waiting = self._reviews_waiting()
        self._note("token review queue", waiting, REVIEWS_BEHIND)
        now = self._clock.monotonic()
        return [f"{what}: {value:.1f} ({now - at:.0f}s ago)"
                for what, (at, value) in sorted(self._over.items())
                if now - at <= BEHIND_WINDOW_SECONDS]
