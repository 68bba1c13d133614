"""The one retry policy for foreign calls that may succeed on a second try.

Only ``TemporaryError`` is retried — a ``PermanentError`` (403, 422, a malformed object)
fails at once. Waits grow exponentially with jitter, so a fleet of agents that lost the
API server together does not come back in lock-step.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import tenacity

from supervisor.errors import TemporaryError

T = TypeVar("T")


def retrying(attempts: int = 4, initial: float = 0.2,
             maximum: float = 5.0) -> tenacity.AsyncRetrying:
    """A fresh tenacity controller: retry ``TemporaryError`` up to ``attempts`` times."""
    return tenacity.AsyncRetrying(
        retry=tenacity.retry_if_exception_type(TemporaryError),
        # stop_after_attempt, not stop_after_delay: tenacity measures delay with
        # time.monotonic, which a faked event loop clock does not move.
        stop=tenacity.stop_after_attempt(attempts),
        wait=tenacity.wait_random_exponential(multiplier=initial, max=maximum),
        reraise=True,
    )


async def call_with_retry(fn: Callable[[], Awaitable[T]], attempts: int = 4) -> T:
    """Await ``fn()`` under the retry policy; the last error is re-raised unchanged."""
    async for attempt in retrying(attempts):
        with attempt:
            return await fn()
    raise AssertionError("unreachable: tenacity re-raises the last error")  # pragma: no cover
