"""The sidecar's side of the all-reduce checks: the worker process, its deadlines, and
when checks run.

Every sidecar keeps one worker (``python -m probes.collective``) alive — restarted, with
backoff, whenever it exits — so ``torch`` is imported once, not per check. Only the group's
leader (rank 0) runs checks; the others' workers take part in whatever plan the leader's
store publishes.

When (leader):

- **preflight** — a full check (every size, localization on) as soon as the group is
  complete; until it passes, every member's ``/readyz`` says not ready;
- **periodic** — a small-message check every ``period_seconds`` (every ``full_every``th a
  full one); if it hangs or its latency is far above the group's usual, a full check with
  localization follows;
- **on demand** — a full check when this sidecar's engine or peer detectors raise a
  finding (``request``), at most once per ``on_demand_min_interval_seconds``.

The worker enforces the deadline of every step itself; the runner only guards against the
worker itself wedging (a driver call that ignores its timeout): a plan not answered within
its whole budget kills the worker and is a ``collective_hang`` of its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from supervisor.config import Settings
from supervisor.detectors.collective import Assessment, CollectiveJudge
from supervisor.errors import DeadlineExceeded
from supervisor.findings import Verdict
from supervisor.runtime.clock import Clock
from supervisor.runtime.deadline import with_deadline
from supervisor.sidecar.identity import Identity

log = structlog.get_logger(__name__)

ROOT = str(Path(__file__).resolve().parents[2])  # where ``probes`` can be imported from
WORKER_BUDGET_SLACK = 5.0  # seconds beyond a plan's own budget before the worker is killed


class WorkerDown(Exception):
    """The worker is not running (starting, restarting, or cannot start)."""


class CollectiveRunner:
    def __init__(self, settings: Settings, identity: Identity, clock: Clock,
                 apply: Callable[[list[Verdict]], None],
                 member_subject: Callable[[int], Any]) -> None:
        self.settings = settings
        self.c = settings.collective
        self.identity = identity
        self.clock = clock
        self._apply = apply
        self.judge = CollectiveJudge(identity.group, identity.size, self.c, member_subject)
        self.leader = identity.rank == 0
        self._proc: asyncio.subprocess.Process | None = None
        self._outcomes: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._ready = asyncio.Event()
        self._requested = asyncio.Event()
        self._lock = asyncio.Lock()
        self.counts: Counter[str] = Counter()
        self.busy_seconds = 0.0
        self.preflight_passed = False
        self._healthy_in_a_row = 0  # full checks since the last slow one
        self.participated_ok = 0
        self.last: dict[str, Any] | None = None
        self.running: dict[str, Any] | None = None  # the plan under way, for /status
        self.restarts = 0
        self._last_demand: float | None = None
        self.backend: str | None = None

    # --- the worker process ----------------------------------------------------------------

    def _command(self) -> list[str]:
        leader, _ = self.identity.peers[0]
        return [self.c.python or sys.executable, "-m", "probes.collective",
                "--rank", str(self.identity.rank), "--world", str(self.identity.size),
                "--store", f"{leader}:{self.c.port}", "--backend", self.c.backend,
                "--node", self.identity.node, "--interface", self.c.interface]

    async def keep_worker(self) -> None:
        """Supervised task: the worker runs, is read, and comes back when it exits."""
        backoff = 1.0
        while True:
            env = {**os.environ, "TORCH_CPP_LOG_LEVEL": "ERROR",
                   "PYTHONPATH": os.pathsep.join(filter(None, [
                       ROOT, os.environ.get("PYTHONPATH", "")]))}
            try:
                self._proc = await asyncio.create_subprocess_exec(
                    *self._command(), stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE, env=env)
            except OSError as exc:
                log.error("collective worker cannot start", error=str(exc))
                await asyncio.sleep(min(backoff, 30.0))
                backoff *= 2
                continue
            started = self.clock.monotonic()
            await self._read(self._proc)
            self._ready.clear()
            code = await self._proc.wait()
            self.restarts += 1
            log.warning("collective worker exited; restarting", code=code)
            if self.clock.monotonic() - started > 60:
                backoff = 1.0
            await asyncio.sleep(min(backoff, 30.0))
            backoff *= 2

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            kind = event.get("event")
            if kind == "ready":
                self.backend = event.get("backend")
                self._ready.set()
                log.info("collective worker ready", backend=self.backend,
                         rank=self.identity.rank)
            elif kind in ("outcome", "present"):
                await self._outcomes.put(event)
            elif kind == "participated":
                self.counts["participated_ok" if event.get("ok") else "participated_failed"] \
                    += 1
                if event.get("ok") and len(event.get("times", [])) > 1:
                    self.participated_ok += 1

    async def _ask(self, command: dict[str, Any], budget: float) -> dict[str, Any]:
        """One command to the (leader's) worker and its answer, bounded by ``budget``."""
        proc = self._proc
        if proc is None or proc.stdin is None or not self._ready.is_set():
            raise WorkerDown("collective worker not running")
        proc.stdin.write((json.dumps(command) + "\n").encode())
        await proc.stdin.drain()
        try:
            return await with_deadline("collective worker", self._outcomes.get(), budget)
        except DeadlineExceeded:
            log.error("collective worker wedged; killing it", budget=budget)
            proc.kill()
            raise

    async def all_present(self) -> bool:
        """Every member's worker is connected to the rendezvous store."""
        try:
            answer = await self._ask({"op": "present"}, WORKER_BUDGET_SLACK)
        except (WorkerDown, DeadlineExceeded):
            return False
        return len(answer.get("ranks", [])) == self.identity.size

    async def _run_plan(self, plan: dict[str, Any]) -> dict[str, Any]:
        """Send a plan to the (leader's) worker and wait for its outcome, bounded."""
        budget = plan["deadline"] * (len(plan["sizes"]) + 1) + WORKER_BUDGET_SLACK
        started = self.clock.monotonic()
        self.running = {"groups": plan["groups"], "sizes": plan["sizes"],
                        "started_at": self.clock.wall()}
        try:
            return await self._ask({"op": "run", "plan": plan}, budget)
        finally:
            self.running = None
            self.busy_seconds += self.clock.monotonic() - started

    # --- checks (leader) -------------------------------------------------------------------

    def request(self) -> None:
        """Another detector suspects the group: a full check soon (rate-limited)."""
        self._requested.set()

    async def schedule(self, group_complete: Callable[[], bool]) -> None:
        """Supervised task (leader): preflight, then periodic and on-demand checks."""
        if not self.leader:
            await asyncio.Event().wait()  # members only take part
        await self._ready.wait()
        if self.c.preflight:
            # Conditions polled until they first hold (the group's reachability is a
            # computed view; a failed preflight is simply tried again).
            while not group_complete() or not await self.all_present():  # noqa: ASYNC110
                await asyncio.sleep(0.5)
            while not await self.full_check("preflight"):  # noqa: ASYNC110
                await asyncio.sleep(5.0)
        else:
            self.preflight_passed = True
        periodic = 0
        while True:
            try:
                await asyncio.wait_for(self._requested.wait(), timeout=self.c.period_seconds)
                now = self.clock.monotonic()
                demanded = self._last_demand is None or \
                    now - self._last_demand >= self.c.on_demand_min_interval_seconds
                self._requested.clear()
                if demanded:
                    self._last_demand = now
                    await self.full_check("on_demand")
                continue
            except TimeoutError:
                pass
            periodic += 1
            if periodic % self.c.full_every == 0:
                await self.full_check("periodic")
            else:
                await self.periodic_check()

    async def _check(self, kind: str, sizes: list[int], why: str) -> Assessment | None:
        """Run one check across the whole group and assess it (the lock is held). None
        when it could not run; a worker that wedged is a hang of its own rank."""
        plan: dict[str, Any] = {"groups": [list(range(self.identity.size))],
                                "sizes": sizes, "deadline": self.c.deadline_seconds}
        started_at = self.clock.wall()
        try:
            outcome = await self._run_plan(plan)
        except (WorkerDown, DeadlineExceeded) as exc:
            self.counts[f"{kind}_failed"] += 1
            log.warning("collective check not run", kind=kind, why=why, error=str(exc))
            if isinstance(exc, DeadlineExceeded):
                self._apply([self.judge.hang_verdict(
                    Assessment(kind="hang", hung=[self.identity.rank]),
                    self.c.deadline_seconds)])
            return None
        a = self.judge.assess(outcome)
        self.counts[f"{kind}_{a.kind}"] += 1
        self.last = {"kind": kind, "why": why, "assessment": a.kind,
                     "started_at": started_at, "elapsed": outcome.get("elapsed"),
                     "busbw": {str(k): round(v, 4) for k, v in a.busbw.items()},
                     "baseline": a.baseline}
        log.info("collective check", kind=kind, why=why, assessment=a.kind,
                 busbw=self.last["busbw"], baseline=a.baseline)
        if a.kind == "hang":
            self._apply([self.judge.hang_verdict(a, self.c.deadline_seconds)])
        else:  # every rank finished within the deadline: no longer hung
            self._apply([Verdict.clear(self.judge.hang_key)])
        return a

    async def periodic_check(self) -> None:
        """The small check; a hang or an unusual latency calls for a full one."""
        async with self._lock:
            a = await self._check("periodic", [self.c.periodic_size_bytes], "periodic")
            if a is not None:
                self.judge.learn(a)
        if a is not None and a.kind in ("hang", "slow"):
            await self.full_check("after_periodic")

    async def full_check(self, why: str) -> bool:
        """Every size, then localization if slow. True when healthy."""
        async with self._lock:
            a = await self._check("full", sorted(self.c.sizes_bytes), why)
            if a is None or a.kind == "hang":
                return False
            if a.kind == "slow":
                self._healthy_in_a_row = 0
                loc = self.judge.start_localization()
                if self.c.localize:
                    while (round_plan := self.judge.next_plan(loc)) is not None:
                        try:
                            round_outcome = await self._run_plan(round_plan)
                        except (WorkerDown, DeadlineExceeded):
                            break
                        self.judge.after_round(loc, round_outcome)
                assert self.last is not None
                self.last["localized"] = {"rounds": loc.rounds, "found": loc.found}
                self._apply([self.judge.slow_verdict(a, loc)])
                return False
            self.judge.learn(a)
            self._healthy_in_a_row += 1
            # A straggler may pass a check between slow ones (a burst of its own work
            # elsewhere ended); clearing on one pass would restart the policy's `for:`
            # clock at the next slow check, and a flapping member would never be acted on.
            if self._healthy_in_a_row >= self.c.clear_after_checks:
                self._apply([Verdict.clear(self.judge.slow_key)])
            self.preflight_passed = True
            return True

    async def close(self, grace: float = 2.0) -> None:
        """End the worker with the sidecar (it also exits when its stdin closes, unless a
        collective has it wedged in C++)."""
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        proc.terminate()
        try:
            await with_deadline("collective worker exit", proc.wait(), grace)
        except DeadlineExceeded:
            proc.kill()
            await proc.wait()

    def ready(self) -> bool:
        """The preflight gate: passed (leader), or took part in a full check (member)."""
        if not self.c.preflight:
            return True
        return self.preflight_passed if self.leader else self.participated_ok > 0
