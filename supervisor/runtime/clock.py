"""Injected time.

Detectors and policies take a ``Clock`` instead of calling ``time`` directly so tests can
drive them with a fake clock instead of sleeping.
"""

from __future__ import annotations

import time
from typing import Protocol, runtime_checkable


@runtime_checkable
class Clock(Protocol):
    """Two time sources: monotonic for durations, wall for timestamps shown to people."""

    def monotonic(self) -> float: ...

    def wall(self) -> float: ...


class SystemClock:
    """Real time: ``time.monotonic`` and ``time.time``."""

    __slots__ = ()

    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()


class ManualClock:
    """A clock that moves only when told to. For synchronous detector tests."""

    __slots__ = ("now", "wall_offset")

    def __init__(self, start: float = 1000.0, wall_offset: float = 1.7e9) -> None:
        self.now = start
        self.wall_offset = wall_offset

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return self.now + self.wall_offset
