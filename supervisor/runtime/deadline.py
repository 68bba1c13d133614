"""The one deadline helper for every blocking or foreign call.

Two shapes of foreign call exist in the daemon:

- awaitables (HTTP to the controller, the Kubernetes API): ``with_deadline`` wraps them in
  ``asyncio.timeout`` and turns expiry into ``DeadlineExceeded``;
- blocking C calls (NVML): they run on a ``BlockingWorker`` thread and the event loop waits
  for the result under the same deadline.

A blocking call cannot be cancelled. When it misses its deadline we stop *waiting*, report
the miss, and leave the thread to finish (or hang) on its own. The worker is a daemon thread
rather than a ``ThreadPoolExecutor`` on purpose: the executor's threads are joined at
interpreter exit, so one NVML call wedged in the driver would turn a 2-second shutdown into
an unbounded one. A worker that is still busy refuses new work (``WorkerBusy``) instead of
queueing it behind the stuck call, so the caller can report "still stuck" each round.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from supervisor.errors import DeadlineExceeded, SupervisorError

T = TypeVar("T")


@contextlib.asynccontextmanager
async def deadline(what: str, timeout: float) -> AsyncIterator[None]:
    """Run the body under ``timeout`` seconds; expiry raises ``DeadlineExceeded(what)``."""
    try:
        async with asyncio.timeout(timeout):
            yield
    except TimeoutError as exc:
        raise DeadlineExceeded(what, timeout) from exc


async def with_deadline(what: str, awaitable: Awaitable[T], timeout: float) -> T:
    """Await ``awaitable`` under ``timeout`` seconds."""
    async with deadline(what, timeout):
        return await awaitable


class WorkerBusy(SupervisorError):
    """The worker's previous call has not returned yet (it may be wedged)."""


class BlockingWorker:
    """One daemon thread that runs blocking calls one at a time.

    One worker per independent resource (one per GPU) means a call wedged on GPU 3 blocks
    only GPU 3's worker; the other GPUs keep their own threads.
    """

    __slots__ = ("_busy_since", "_lock", "_queue", "_thread", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self._queue: queue.SimpleQueue[
            tuple[Callable[[], Any], asyncio.AbstractEventLoop, asyncio.Future[Any]] | None
        ] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._busy_since: float | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        with self._lock:
            return self._busy_since is not None

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, loop, future = item
            try:
                result = fn()
            except BaseException as exc:  # handed to the awaiting coroutine, never lost
                outcome: tuple[bool, Any] = (False, exc)
            else:
                outcome = (True, result)
            with self._lock:
                self._busy_since = None
            with contextlib.suppress(RuntimeError):  # loop closed while we were stuck
                loop.call_soon_threadsafe(_settle, future, outcome)

    async def call(self, what: str, fn: Callable[[], T], timeout: float) -> T:
        """Run ``fn`` on this worker's thread; wait at most ``timeout`` seconds for it."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._busy_since is not None:
                raise WorkerBusy(f"{self.name} is still busy with an earlier call")
            self._busy_since = loop.time()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put((fn, loop, future))
        # shield: a deadline miss must not cancel the future the thread will settle later.
        try:
            return await with_deadline(what, asyncio.shield(future), timeout)
        except DeadlineExceeded:
            # Nobody will await the late result; retrieve it so asyncio does not log it.
            future.add_done_callback(_discard)
            raise

    def close(self) -> None:
        """Ask the thread to exit after its current call. Never blocks."""
        self._queue.put(None)


def _discard(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _settle(future: asyncio.Future[Any], outcome: tuple[bool, Any]) -> None:
    if future.done():
        return
    ok, value = outcome
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)
