"""Time-aware building blocks for thresholds.

- ``Sustained``: a condition counts only after it has held for ``for_seconds`` (Prometheus
  ``for:`` semantics); it resets the moment the condition drops.
- ``Hysteresis``: raise at one value, clear only below a lower one, so a temperature
  hovering at the threshold is one finding, not a flapping series.
- ``Rate``: increments per second of a monotonically increasing counter over a sliding
  window; a counter that goes backwards (driver reload, reset) restarts the window
  instead of producing a negative or huge rate.
"""

from __future__ import annotations

from collections import deque


class Sustained:
    __slots__ = ("for_seconds", "since")

    def __init__(self, for_seconds: float) -> None:
        self.for_seconds = for_seconds
        self.since: float | None = None

    def update(self, condition: bool, now: float) -> bool:
        if not condition:
            self.since = None
            return False
        if self.since is None:
            self.since = now
        return now - self.since >= self.for_seconds


class Hysteresis:
    __slots__ = ("active",)

    def __init__(self) -> None:
        self.active = False

    def update(self, value: float, raise_at: float, clear_below: float) -> bool:
        if self.active:
            self.active = value >= clear_below
        else:
            self.active = value >= raise_at
        return self.active


class Rate:
    __slots__ = ("_points", "window")

    def __init__(self, window: float) -> None:
        self.window = window
        self._points: deque[tuple[float, int]] = deque()

    def update(self, value: int, now: float) -> float | None:
        """Add a reading; return the rate per second over the window, or None if unknown."""
        if self._points and value < self._points[-1][1]:
            self._points.clear()  # counter reset: start over rather than report nonsense
        self._points.append((now, value))
        while len(self._points) > 2 and now - self._points[1][0] >= self.window:
            self._points.popleft()
        if len(self._points) < 2:
            return None
        (t0, v0), (t1, v1) = self._points[0], self._points[-1]
        if t1 <= t0:
            return None
        return (v1 - v0) / (t1 - t0)
