"""An event loop that wakes for I/O at most once per window while busy.

The controller holds a report stream per agent, and each agent's heartbeat is one small
message every 10 s. Spread over 1,024 nodes that is ~100 messages a second, and with the
plain loop each one is a wake-up of its own: the thread sleeps, the message arrives, the
loop runs for one message and sleeps again. On shared virtual machines the wake-up, not
the message, is most of the cost, most likely as caches are cold after the sleep
(``python -m bench wakeups``: a bare TLS server with nothing else in it spends 120 to 265 µs
of CPU per message when every message wakes the loop, 54 to 63 µs on this one).

So the selector here holds I/O back after each wake-up for a while and then serves
everything that arrived meanwhile in one pass — the interrupt moderation a network card
does, one level up. The hold aims at ``batch`` events per wake-up at the rate events
arrive (measured each second), capped at ``window``: a fleet of 1,024 nodes is held up to
the full window, one of 16,384 a few milliseconds — the larger the fleet, the less
latency buys the same saving. What it does *not* do:

- hold anything while less than half a batch arrives per window (50 events a second with
  the defaults): a small fleet's controller runs as on the plain loop;
- delay an isolated event: a socket ready after a quiet spell longer than the hold is
  served at once; only an event within the hold after the previous wake-up waits, and at
  most for the rest of it;
- delay a timer: it never sleeps past the timeout the loop asked for, so ``call_at``
  handles (Lease renewals, ``for:`` timers, deadlines) run on time;
- delay ready callbacks: with work queued the loop asks for timeout 0, and gets it.
"""

from __future__ import annotations

import asyncio
import math
import selectors
import time
from collections.abc import Callable


class CoalescingSelector(selectors.DefaultSelector):
    """``DefaultSelector`` (epoll on Linux) that batches I/O wake-ups; see the module."""

    def __init__(self, window: float, batch: int = 10, *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        super().__init__()
        self.window = window
        self.batch = batch
        self._clock = clock
        self._sleep = sleep
        self._woke = -math.inf  # when I/O last woke us
        self._since = clock()  # start of the current rate measurement
        self._events = 0  # events returned since then
        self.rate = 0.0  # events per second over the last measurement (0: not known yet)
        self.held = 0  # wake-ups held back (each one served a batch)

    @property
    def hold(self) -> float:
        """How long I/O is held after a wake-up at the current rate: none while less than
        half a batch arrives within the window (a quiet controller spends little on
        wake-ups, and a chain of API calls would wait once per round trip for nothing)."""
        if self.rate * self.window < self.batch / 2:
            return 0.0
        return min(self.window, self.batch / self.rate)

    def select(self, timeout: float | None = None
               ) -> list[tuple[selectors.SelectorKey, int]]:
        if self.window > 0 and (timeout is None or timeout > 0):
            hold = self._woke + self.hold - self._clock()
            if hold > 0:
                slept = hold if timeout is None else min(hold, timeout)
                self._sleep(slept)
                self.held += 1
                if timeout is not None:
                    timeout = max(0.0, timeout - slept)
        events: list[tuple[selectors.SelectorKey, int]] = super().select(timeout)
        if events:
            now = self._clock()
            self._woke = now
            self._events += len(events)
            if now - self._since >= 1.0:
                self.rate = self._events / (now - self._since)
                self._since, self._events = now, 0
        return events


def loop_factory(window: float, batch: int = 10
                 ) -> Callable[[], asyncio.AbstractEventLoop]:
    """For ``asyncio.Runner``: a selector loop that coalesces wake-ups, holding I/O for at
    most ``window`` seconds (0: the plain loop)."""
    def new_loop() -> asyncio.AbstractEventLoop:
        if window <= 0:
            return asyncio.SelectorEventLoop()
        return asyncio.SelectorEventLoop(CoalescingSelector(window, batch))
    return new_loop
