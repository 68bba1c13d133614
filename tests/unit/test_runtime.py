"""The runtime: deadlines around blocking calls, supervised tasks and staged shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import selectors
import socket
import threading
from collections.abc import Iterator

import pytest

from supervisor.errors import DeadlineExceeded
from supervisor.runtime.deadline import BlockingWorker, WorkerBusy, with_deadline
from supervisor.runtime.tasks import TaskGroup
from supervisor.runtime.wakeups import CoalescingSelector, loop_factory


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


class TestCoalescingSelector:
    """Wake-ups are held back only while events come fast, within the hold after the last
    I/O wake-up, never past the loop's timeout, and never after a quiet spell. A fake
    clock and sleep make it exact; the sockets are real."""

    @staticmethod
    @contextlib.contextmanager
    def rig(window: float) -> Iterator[tuple[CoalescingSelector, list[float], list[float]]]:
        """The selector on a fake clock, a socket always readable, and the sleeps taken."""
        now = [100.0]
        slept: list[float] = []

        def sleep(seconds: float) -> None:
            slept.append(seconds)
            now[0] += seconds

        sel = CoalescingSelector(window, clock=lambda: now[0], sleep=sleep)
        a, b = socket.socketpair()
        try:
            sel.register(a, selectors.EVENT_READ)
            b.send(b"x")  # a stays readable: every select finds it
            yield sel, now, slept
        finally:
            sel.close()
            a.close()
            b.close()

    @staticmethod
    def busy(sel: CoalescingSelector, now: list[float], rate: float) -> None:
        """A second of events at ``rate``, each served at once (work queued: timeout 0)."""
        for _ in range(int(rate) + 2):
            sel.select(0)
            now[0] += 1 / rate

    def test_event_within_the_hold_waits_for_its_rest(self) -> None:
        with self.rig(0.1) as (sel, now, slept):
            self.busy(sel, now, 100)
            hold = sel.hold
            assert hold == pytest.approx(0.1, rel=0.02)
            assert len(sel.select(None)) == 1
            assert slept == [pytest.approx(hold - 0.01)] and sel.held == 1

    def test_quiet_spell_longer_than_the_hold_is_served_at_once(self) -> None:
        with self.rig(0.1) as (sel, now, slept):
            self.busy(sel, now, 100)
            now[0] += 0.2
            assert len(sel.select(None)) == 1 and slept == [] and sel.held == 0

    def test_never_sleeps_past_the_timeout_nor_when_work_is_queued(self) -> None:
        with self.rig(0.1) as (sel, now, slept):
            self.busy(sel, now, 100)
            sel.select(0)  # ready callbacks queued: no holding back
            assert slept == []
            sel.select(0.02)  # a timer due in 20 ms
            assert slept == [pytest.approx(0.02)]

    def test_hold_aims_at_a_batch_per_wake_up_at_the_measured_rate(self) -> None:
        """At 400 events a second, 10 per wake-up is 25 ms of hold, under the 100 ms cap;
        at 60 a second the cap; under 50 a second (half a batch per window), no hold."""
        with self.rig(0.1) as (sel, now, slept):
            assert sel.hold == 0.0  # rate not known yet: as the plain loop
            self.busy(sel, now, 400)
            assert sel.rate == pytest.approx(400, rel=0.01)
            assert sel.hold == pytest.approx(0.025, rel=0.01)
            sel.select(None)
            assert slept[-1] == pytest.approx(0.025 - 1 / 400, rel=0.01)
            self.busy(sel, now, 60)
            assert sel.hold == pytest.approx(0.1)
            self.busy(sel, now, 30)
            assert sel.hold == 0.0
            before = len(slept)
            sel.select(None)
            assert len(slept) == before

    def test_window_zero_is_the_plain_selector(self) -> None:
        with self.rig(0.0) as (sel, now, slept):
            self.busy(sel, now, 400)
            for _ in range(3):
                assert len(sel.select(None)) == 1
            assert slept == [] and sel.held == 0

    def test_a_loop_built_by_the_factory_runs_coroutines_over_real_sockets(self) -> None:
        """The loop the controller runs on: a TCP echo over loopback completes."""
        async def echo_once() -> bytes:
            async def handle(reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
                writer.write(await reader.readline())
                await writer.drain()
                writer.close()

            server = await asyncio.start_server(handle, "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"hello\n")
                line = await reader.readline()
                writer.close()
                await writer.wait_closed()
                return line
            finally:
                server.close()
                await server.wait_closed()

        with asyncio.Runner(loop_factory=loop_factory(0.01)) as runner:
            assert runner.run(echo_once()) == b"hello\n"
            selector = runner.get_loop()._selector  # type: ignore[attr-defined]
            assert isinstance(selector, CoalescingSelector)
