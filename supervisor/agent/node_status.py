"""Publishes our NodeConditions and transition Events for one node.

The publisher owns the desired state (``conditions.evaluate`` over the active findings) and
the last state it knows the API server holds. It writes:

- at start: every one of our condition types, healthy ones as False with their healthy
  reason, so dashboards see "checked and fine" rather than "unknown";
- on every change: the types whose status, reason or message changed, plus one Event per
  status flip (Warning when a problem appears, Normal when it clears), worded like NPD's;
- every ``resync`` seconds: everything again, repairing conditions someone else clobbered.

A failed write leaves the state marked dirty and is retried on the next wake-up; the probe
loop never waits on the API server.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable

import structlog

from supervisor.agent.conditions import OUR_TYPES, NodeCondition, evaluate
from supervisor.errors import SupervisorError
from supervisor.findings import Finding
from supervisor.kube import KubeClient
from supervisor.runtime.clock import Clock

log = structlog.get_logger(__name__)

COMPONENT = "gpu-supervisor-agent"


class NodeConditionPublisher:
    def __init__(self, kube: KubeClient, node: str, findings: Callable[[], list[Finding]],
                 clock: Clock, resync: float) -> None:
        self._kube = kube
        self._node = node
        self._findings = findings
        self._clock = clock
        self._resync = resync
        self._wake = asyncio.Event()
        self._published: dict[str, NodeCondition] = {}
        self._transitions: dict[str, float] = {}
        self._node_uid: str | None = None
        self.writes = 0
        self.failures = 0
        self.events = 0
        self.last_error: str | None = None

    def poke(self) -> None:
        """Findings changed; publish soon. Safe to call from any finding listener."""
        self._wake.set()

    async def run(self) -> None:
        full = True
        while True:
            self._wake.clear()
            try:
                await self.publish(full=full)
                full = False
            except SupervisorError as exc:
                self.failures += 1
                self.last_error = str(exc)
                log.warning("node condition publish failed", node=self._node, error=str(exc))
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self._resync)
            except TimeoutError:
                full = True

    async def publish(self, *, full: bool) -> None:
        if self._node_uid is None:
            node = await self._kube.read_node(self._node)
            self._node_uid = node.get("metadata", {}).get("uid")
            for cond in node.get("status", {}).get("conditions") or []:
                if cond.get("type") in OUR_TYPES:
                    # Keep the existing transition time of conditions we wrote before a restart.
                    self._adopt(cond)
        desired = evaluate(self._findings())
        now = self._clock.wall()
        changed = [c for t, c in desired.items() if self._published.get(t) != c]
        to_write = list(desired.values()) if full else changed
        if not to_write:
            return
        # A status flip moves lastTransitionTime and deserves an Event; a condition seen
        # for the first time is a flip only if it starts out as a problem.
        flips = []
        for cond in changed:
            prev = self._published.get(cond.type)
            if prev is None or prev.status != cond.status:
                self._transitions[cond.type] = now
                if prev is not None or cond.status:
                    flips.append(cond)
        body = [KubeClient.condition(c.type, c.status, c.reason, c.message,
                                     self._transitions.get(c.type, now), now)
                for c in to_write]
        await self._kube.patch_node_conditions(self._node, body)
        self.writes += 1
        for cond in to_write:
            self._published[cond.type] = cond
        for cond in flips:
            await self._event(cond, now)

    def _adopt(self, raw: dict[str, object]) -> None:
        ctype = str(raw["type"])
        status = raw.get("status") == "True"
        self._published[ctype] = NodeCondition(ctype, status, str(raw.get("reason", "")),
                                               str(raw.get("message", "")))
        stamp = raw.get("lastTransitionTime")
        if isinstance(stamp, str):
            try:
                parsed = dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
                self._transitions[ctype] = parsed.timestamp()
            except ValueError:
                pass

    async def _event(self, cond: NodeCondition, now: float) -> None:
        message = (f"Node condition {cond.type} is now: {'True' if cond.status else 'False'}, "
                   f"reason: {cond.reason}, message: {cond.message!r}")
        try:
            await self._kube.node_event(self._node, self._node_uid, warning=cond.status,
                                        reason=cond.reason, message=message,
                                        component=COMPONENT, now=now)
            self.events += 1
        except SupervisorError as exc:
            self.last_error = str(exc)
            log.warning("node event failed", node=self._node, error=str(exc))
