"""Supervised long-lived tasks and staged shutdown.

Every long-lived coroutine of a daemon is a *root task* started by ``TaskGroup.start``.
A root task is not expected to finish: if one fails or returns, the daemon is no longer
whole, so ``run_until_stopped`` begins a staged shutdown:

1. the first failure (or SIGTERM/SIGINT) is noted;
2. every other root task is cancelled;
3. they get ``grace`` seconds to finish their cleanup; stragglers are named in the log;
4. the first real error is re-raised, so the process exits non-zero with its cause.

Short-lived helper tasks are started the same way with ``finishable=True``.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Coroutine
from typing import Any

import structlog

log = structlog.get_logger(__name__)

Task = asyncio.Task[Any]


class TaskGroup:
    """Root tasks of one daemon, with the first failure remembered."""

    def __init__(self) -> None:
        self._tasks: dict[str, Task] = {}
        self._finishable: set[str] = set()
        self._stop = asyncio.Event()
        self.first_error: BaseException | None = None
        self.stop_reason: str | None = None

    @property
    def names(self) -> list[str]:
        return list(self._tasks)

    def start(
        self, name: str, coro: Coroutine[Any, Any, Any], *, finishable: bool = False
    ) -> Task:
        """Start ``coro`` as a named, guarded task of this group."""
        if name in self._tasks and not self._tasks[name].done():
            coro.close()
            raise ValueError(f"task {name!r} is already running")
        task = asyncio.create_task(coro, name=name)
        self._tasks[name] = task
        if finishable:
            self._finishable.add(name)
        task.add_done_callback(self._on_done)
        return task

    def _on_done(self, task: Task) -> None:
        name = task.get_name()
        if task.cancelled():
            if not self._stop.is_set():
                log.warning("task cancelled unexpectedly", task=name)
                self.request_stop(f"task {name} was cancelled")
            return
        exc = task.exception()
        if exc is not None:
            log.error("task failed", task=name, exc_info=exc)
            if self.first_error is None:
                self.first_error = exc
            self.request_stop(f"task {name} failed: {exc!r}")
        elif name not in self._finishable and not self._stop.is_set():
            log.error("task finished unexpectedly", task=name)
            self.request_stop(f"task {name} finished unexpectedly")

    def alive(self) -> dict[str, bool]:
        """Which root tasks are still running (for /livez)."""
        return {
            name: not task.done()
            for name, task in self._tasks.items()
            if name not in self._finishable
        }

    def request_stop(self, reason: str) -> None:
        if not self._stop.is_set():
            self.stop_reason = reason
            log.info("stopping", reason=reason)
            self._stop.set()

    async def wait_stop_requested(self) -> None:
        await self._stop.wait()

    async def shutdown(self, grace: float) -> None:
        """Cancel every task, wait up to ``grace`` seconds, name the ones that hang."""
        self._stop.set()
        pending = [t for t in self._tasks.values() if not t.done()]
        for task in pending:
            task.cancel()
        if not pending:
            return
        _done, stuck = await asyncio.wait(pending, timeout=grace)
        for task in stuck:
            log.error("task did not stop within grace period", task=task.get_name(), grace=grace)

    async def run_until_stopped(self, grace: float) -> None:
        """Block until a stop is requested, shut down, then re-raise the first real error."""
        try:
            await self.wait_stop_requested()
        finally:
            await self.shutdown(grace)
        if self.first_error is not None:
            raise self.first_error


@contextlib.contextmanager
def stop_on_signals(group: TaskGroup) -> Any:
    """SIGTERM/SIGINT request a graceful stop of ``group`` instead of killing the loop."""
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, group.request_stop, f"signal {sig.name}")
            installed.append(sig)
        except (NotImplementedError, RuntimeError):  # not the main thread
            pass
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
