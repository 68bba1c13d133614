"""The runtime: deadlines around blocking calls, supervised tasks and staged shutdown."""

from __future__ import annotations

import asyncio
import threading

import pytest

from supervisor.errors import DeadlineExceeded
from supervisor.runtime.deadline import BlockingWorker, WorkerBusy, with_deadline
from supervisor.runtime.tasks import TaskGroup


class TestBlockingWorker:
    async def test_result_and_exception_are_delivered(self) -> None:
        """A call's return value comes back; its exception is re-raised in the caller."""
        worker = BlockingWorker("t")
        try:
            assert await worker.call("add", lambda: 1 + 1, timeout=5) == 2
            with pytest.raises(ZeroDivisionError):
                await worker.call("div", lambda: 1 / 0, timeout=5)
        finally:
            worker.close()

    async def test_wedged_call_misses_deadline_and_worker_refuses_more(self) -> None:
        """A call that blocks past its deadline raises DeadlineExceeded; the worker stays busy."""
        release = threading.Event()
        worker = BlockingWorker("wedged")
        other = BlockingWorker("healthy")
        try:
            with pytest.raises(DeadlineExceeded) as info:
                await worker.call("NVML sample of GPU 3", release.wait, timeout=0.05)
            assert "NVML sample of GPU 3" in str(info.value)
            with pytest.raises(WorkerBusy):
                await worker.call("again", lambda: None, timeout=1)
            # Another worker is not affected by the wedged one.
            assert await other.call("ok", lambda: "fine", timeout=5) == "fine"
            release.set()
            for _ in range(200):
                if not worker.busy:
                    break
                await asyncio.sleep(0.01)
            assert await worker.call("after", lambda: "back", timeout=5) == "back"
        finally:
            release.set()
            worker.close()
            other.close()

    async def test_with_deadline_converts_timeouts(self) -> None:
        """An awaitable that outlives its deadline raises DeadlineExceeded with the cause."""
        with pytest.raises(DeadlineExceeded) as info:
            await with_deadline("slow call", asyncio.sleep(10), timeout=0.01)
        assert isinstance(info.value.__cause__, TimeoutError)


class TestTaskGroup:
    async def test_first_failure_stops_everything_and_is_reraised(self) -> None:
        """A failing root task cancels the others and its error surfaces from the group."""
        group = TaskGroup()
        cancelled = asyncio.Event()

        async def forever() -> None:
            try:
                await asyncio.sleep(3600)
            finally:
                cancelled.set()

        async def failing() -> None:
            await asyncio.sleep(0)
            raise RuntimeError("probe loop broke")

        group.start("forever", forever())
        group.start("failing", failing())
        with pytest.raises(RuntimeError, match="probe loop broke"):
            await group.run_until_stopped(grace=1)
        assert cancelled.is_set()
        assert group.stop_reason is not None and "failing" in group.stop_reason

    async def test_unexpected_finish_stops_the_group(self) -> None:
        """A root task that returns is a fault: the group stops and says which task."""
        group = TaskGroup()

        async def quits() -> None:
            return None

        async def forever() -> None:
            await asyncio.sleep(3600)

        group.start("forever", forever())
        group.start("quits", quits())
        await group.run_until_stopped(grace=1)
        assert group.stop_reason == "task quits finished unexpectedly"

    async def test_finishable_tasks_may_return(self) -> None:
        """A task started as finishable can end without stopping the group."""
        group = TaskGroup()
        group.start("oneshot", asyncio.sleep(0), finishable=True)
        await asyncio.sleep(0.01)
        assert group.stop_reason is None
        await group.shutdown(grace=1)

    async def test_stuck_task_is_abandoned_after_grace(self) -> None:
        """A task that ignores cancellation does not hold shutdown past the grace period."""
        group = TaskGroup()
        stop = asyncio.Event()

        async def stubborn() -> None:
            while not stop.is_set():
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    continue  # misbehaving on purpose

        task = group.start("stubborn", stubborn())
        await asyncio.sleep(0)
        await group.shutdown(grace=0.05)
        assert not task.done()
        stop.set()
        task.cancel()
        await asyncio.sleep(0)
        await asyncio.gather(task, return_exceptions=True)
