"""The policy engine: signals and a view of the cluster in, decisions and refusals out.

It decides and remembers; it never acts. The controller calls ``evaluate`` on every batch of
reports, carries out the returned decisions, and reports each outcome with ``confirm``. All
state the engine keeps — open incidents and how far up their ladder they are, cooldowns,
the breaker's history, degrade state — can be written out with ``snapshot`` and read back
by another controller with ``restore``, which is how a new leader continues an incident
instead of starting it again.

Incidents
    A rule matching a signal opens an incident keyed by ``rule/scope/scope-id`` (a group key
    or a node name). Its ladder is climbed one step at a time: step 0 when it opens, step k
    once every decision of step k-1 is confirmed and ``after`` has passed. Each step's
    targets are fixed when the step is first decided, and each (step, target) is decided
    once: it is *in flight* from the moment it is returned until ``confirm``, *done* after
    ``confirm(ok=True)`` and never returned again; ``confirm(ok=False)`` makes it *pending*
    so the next evaluation decides it again. When no signal matches any more the incident
    closes: the groups it took out of traffic are put back (``recover``) and, if the rule
    says so, the nodes it quarantined are released (``unquarantine``) — each once no finding
    on that node matches the rule either (a group restarted elsewhere leaves the node as sick
    as it was); then it is forgotten.

Suspects
    A quarantine step's targets are the nodes of the incident's node-local signals; a node
    whose signals only *suspect* it (``Signal.suspect``: the cause may sit there, unproven)
    gets the soft form instead, ``suspect`` — new work prefers other nodes, nothing is
    cordoned — in a lane of its own, so a quarantine proven later is not mistaken for one
    already in place. It is lifted (``unsuspect``) when its incident closes, once no finding
    on the node matches the rule any more, whatever ``lift_quarantine`` says.
    A signal coming back before anything was released resumes the incident where it was.

Shared targets
    Two incidents often want the same thing (a GPU fault and a node-down on one node both
    fail the same group over). What an incident holds — groups out of traffic, quarantined
    nodes — is indexed by target; a fail-over or quarantine of a target another incident
    already holds is done without acting again, and the recover or unquarantine is emitted
    only by the last incident that lets go. Only one decision per target and *lane*
    (traffic: fail_over/recover; cordon: quarantine/unquarantine; restart; degrade) is in
    flight at a time, so opposite moves on one target are never racing each other.

Safety, checked for every decision in this order (first reason wins)
    breaker → cooldown → budget → floor, with the breaker's own count last so that a
    decision refused for another reason does not trip it. A refused decision stays pending
    and is reported again on every evaluation while the reason holds.

    - cooldown: fail_over, restart_group and quarantine of one target at most once per
      cooldown (the rule's, else the policy's), counted from the confirmation — except
      failing over a group that is already unhealthy, which is never held back.
    - budget: groups disrupted by us (failed over or restarting, in flight or done, until
      their incident lets go) at most ``max_groups_disrupted``; failing over a group that is
      already unhealthy is always allowed — it costs no serving capacity.
    - floor: never take a *healthy* group out if that leaves its model with fewer healthy,
      undisrupted groups than ``min_healthy_groups``.
    - breaker: counted actions (all but notify, recover, unquarantine, unsuspect and a
      degrade that only shares a degraded model's traffic again) within the window,
      those in flight included, may not exceed ``max_actions``. The decision that would
      exceed it opens the breaker instead of acting — counting only confirmations would let
      one evaluation's storm through whole, since a batch is returned before any of it is
      confirmed — and then everything except notify is refused until ``reset_breaker``.

Degrade
    A model with fewer healthy groups (not disrupted by us) than its ``floor`` is degraded:
    its traffic is shared with its fallback. While it is degraded, every change in its
    count of healthy groups — down, or up before ``restore_after`` has passed — is decided
    as a degrade again, so that the action layer shares the traffic anew (off a group that
    failed too, back onto one that returned); a model that stays at or above its floor for
    ``restore_after`` without a dip is restored.

Time is injected: ``clock`` returns monotonic seconds, which all timers run on, and
``wall`` wall-clock seconds. Snapshots store every time as wall-clock time — a monotonic
clock means nothing in another process, and an age means nothing once the snapshot has
been lying in the ConfigMap for an hour — so a new leader's ``for:``, ``after:``, cooldown
and breaker windows end when they would have ended under the old one. ``evaluate`` is
linear in signals, incidents and groups: it runs on every report batch.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from policies.model import (
    SEVERITY_RANK,
    Action,
    Decision,
    Evaluation,
    GroupView,
    Refusal,
    Signal,
    View,
)
from policies.schema import DEGRADE_RULE, Policy, Rule

__all__ = ["SNAPSHOT_VERSION", "Evaluation", "PolicyEngine"]

SNAPSHOT_VERSION = 2  # 1 stored ages (relative to the save); 2 stores wall-clock times
WALL_STEP_TOLERANCE = 0.5  # seconds the wall clock may move against the monotonic one

_TRAFFIC, _CORDON, _RESTART, _DEGRADE = "traffic", "cordon", "restart", "degrade"
_SUSPECT = "suspect"
_HELD_LANES = (_TRAFFIC, _CORDON, _SUSPECT)  # what an incident holds until it lets go
_LANE: Mapping[Action, str | None] = {
    Action.FAIL_OVER: _TRAFFIC, Action.RECOVER: _TRAFFIC,
    Action.QUARANTINE: _CORDON, Action.UNQUARANTINE: _CORDON,
    Action.SUSPECT: _SUSPECT, Action.UNSUSPECT: _SUSPECT,
    Action.RESTART_GROUP: _RESTART,
    Action.DEGRADE: _DEGRADE, Action.RESTORE: _DEGRADE,
    Action.NOTIFY: None,  # an Event per incident; nothing to race
}
_COOLDOWN = frozenset({Action.FAIL_OVER, Action.RESTART_GROUP, Action.QUARANTINE})
_DISRUPTIVE = frozenset({Action.FAIL_OVER, Action.RESTART_GROUP})
_COUNTED = frozenset({Action.FAIL_OVER, Action.RESTART_GROUP, Action.QUARANTINE,
                      Action.SUSPECT, Action.DEGRADE, Action.RESTORE})
_RELEASE = {_TRAFFIC: Action.RECOVER, _CORDON: Action.UNQUARANTINE,
            _SUSPECT: Action.UNSUSPECT}

_Key = tuple[str, int, Action, str]  # (incident, step, action, target): one decision


def _key(decision: Decision) -> _Key:
    return (decision.incident, decision.step, decision.action, decision.target)


class _Status(enum.Enum):
    PENDING = "pending"  # to be decided (again): never returned, refused, or confirmed failed
    IN_FLIGHT = "in_flight"  # returned by evaluate, not confirmed yet
    DONE = "done"  # confirmed ok, or already held by another incident


@dataclass(slots=True)
class _Done:
    step: int
    action: Action
    target: str
    at: float
    shared: bool = False  # already in place because of another incident; nothing was done


@dataclass(slots=True)
class _Incident:
    id: str
    rule: str
    scope: str
    scope_id: str
    opened_at: float
    ready_from: float  # the current step's ``after`` counts from here
    step: int = 0
    targets: dict[str, _Status] | None = None  # the current step's, once decided
    step_done_at: float | None = None  # latest confirmation within the current step
    node_local: bool = False
    closed_at: float | None = None
    released_any: bool = False  # a recover/unquarantine was confirmed since closing
    failed_over: set[str] = field(default_factory=set)  # held: out of traffic because of us
    quarantined: set[str] = field(default_factory=set)  # held: quarantined because of us
    suspected: set[str] = field(default_factory=set)  # held: suspected because of us
    restarted: set[str] = field(default_factory=set)
    history: list[_Done] = field(default_factory=list)

    def held(self, lane: str) -> set[str]:
        if lane == _TRAFFIC:
            return self.failed_over
        return self.quarantined if lane == _CORDON else self.suspected


@dataclass(slots=True)
class _Breaker:
    times: deque[float] = field(default_factory=deque)  # confirmations of counted actions
    in_flight: int = 0  # counted actions returned and not yet confirmed
    opened_at: float | None = None
    detail: str = ""

    def prune(self, since: float) -> None:
        while self.times and self.times[0] <= since:
            self.times.popleft()


@dataclass(slots=True)
class _DegradeState:
    degraded: bool = False
    changed_at: float | None = None  # last confirmed degrade or restore (not a re-split)
    healthy_since: float | None = None  # degraded, and at/above the floor since then
    # Degraded: the healthy groups the traffic was last split for (None: not known — a
    # snapshot from before splits — so split again). Deciding: those of the degrade out.
    split_for: int | None = None
    deciding: int | None = None


class _Pass:
    """Working set of one evaluation: the view, what is disrupted, healthy capacity."""

    __slots__ = ("_by_node", "_healthy", "decisions", "disrupted", "now", "refusals",
                 "sick_nodes", "view")

    def __init__(self, view: View, now: float, disrupted: set[str],
                 sick_nodes: set[tuple[str, str]] | None = None) -> None:
        self.view = view
        self.now = now
        self.disrupted = disrupted
        # (rule, node): a finding on the node still matches the rule, whatever group (if
        # any) it maps to now — a quarantine the rule put on the node is not lifted yet.
        self.sick_nodes = sick_nodes or set()
        self.decisions: list[Decision] = []
        self.refusals: list[Refusal] = []
        self._healthy: dict[str, int] | None = None
        self._by_node: dict[str, list[str]] | None = None

    def group(self, key: str) -> GroupView | None:
        return self.view.groups.get(key)

    def healthy(self, model: str) -> int:
        """Healthy groups of ``model`` that we have not disrupted."""
        if self._healthy is None:
            counts: dict[str, int] = {}
            for g in self.view.groups.values():
                if g.healthy and g.key not in self.disrupted:
                    counts[g.model] = counts.get(g.model, 0) + 1
            self._healthy = counts
        return self._healthy.get(model, 0)

    def disrupt(self, key: str) -> None:
        if key in self.disrupted:
            return
        g = self.view.groups.get(key)
        if self._healthy is not None and g is not None and g.healthy:
            self._healthy[g.model] -= 1
        self.disrupted.add(key)

    def groups_on(self, node: str) -> list[str]:
        if self._by_node is None:
            index: dict[str, list[str]] = {}
            for g in self.view.groups.values():
                for n in g.nodes:
                    index.setdefault(n, []).append(g.key)
            self._by_node = index
        return self._by_node.get(node, [])


class PolicyEngine:
    """Decides what to do about signals under a ``Policy``; see the module docstring."""

    def __init__(self, policy: Policy, clock: Callable[[], float],
                 wall: Callable[[], float] | None = None) -> None:
        self._clock = clock
        self._wall = wall or clock
        self._wall_offset: float | None = None
        self.policy = policy
        self._rules: dict[str, Rule] = {}
        self._by_class: dict[str, list[tuple[Rule, int]]] = {}
        self._index_rules()
        self._incidents: dict[str, _Incident] = {}
        self._in_flight: dict[_Key, Decision] = {}
        self._busy: dict[tuple[str, str], _Key] = {}  # (lane, target) → the decision on it
        self._holders: dict[tuple[str, str], set[str]] = {}  # (lane, target) → incident ids
        self._cooldowns: dict[tuple[Action, str], float] = {}  # → monotonic end
        self._breaker = _Breaker()
        self._degrade: dict[str, _DegradeState] = {}
        # Decisions in flight that the breaker does not count: degrades that only share a
        # degraded model's traffic again (they follow capacity, as a recover does).
        self._uncounted: set[_Key] = set()

    # --- policy ----------------------------------------------------------------------------

    def _index_rules(self) -> None:
        self._rules = {r.name: r for r in self.policy.rules}
        self._by_class = {}
        for rule in self.policy.rules:
            rank = SEVERITY_RANK[rule.when.min_severity]
            for fc in rule.when.fault_classes:
                self._by_class.setdefault(fc, []).append((rule, rank))

    def replace_policy(self, policy: Policy) -> None:
        """Hot reload. Incidents keep their state; those whose rule is gone (or changed scope)
        are dropped quietly — nothing is emitted for them, so what they did stays in place.
        A step not started yet is decided afresh from the new ladder."""
        self.policy = policy
        self._index_rules()
        for inc in list(self._incidents.values()):
            rule = self._rules.get(inc.rule)
            if rule is None or rule.when.scope != inc.scope:
                self._drop(inc)
            elif inc.step >= len(rule.then):
                inc.step, inc.targets = len(rule.then), None
            elif inc.targets is not None and all(s is _Status.PENDING
                                                 for s in inc.targets.values()):
                inc.targets = None
        for model in [m for m in self._degrade if policy.degrade_for(m) is None]:
            del self._degrade[model]

    def _drop(self, inc: _Incident) -> None:
        del self._incidents[inc.id]
        for lane in _HELD_LANES:
            for target in inc.held(lane):
                self._unindex(inc.id, lane, target)
        # Its decisions in flight stay tracked: their confirmations still feed cooldowns
        # and the breaker, since the action did happen.

    # --- holding ---------------------------------------------------------------------------

    def _hold(self, inc: _Incident, lane: str, target: str) -> None:
        inc.held(lane).add(target)
        self._holders.setdefault((lane, target), set()).add(inc.id)

    def _unindex(self, incident: str, lane: str, target: str) -> None:
        holders = self._holders.get((lane, target))
        if holders is not None:
            holders.discard(incident)
            if not holders:
                del self._holders[(lane, target)]

    def _let_go(self, inc: _Incident, lane: str, target: str) -> None:
        inc.held(lane).discard(target)
        self._unindex(inc.id, lane, target)

    def _held_by_other(self, inc: _Incident, lane: str, target: str) -> bool:
        holders = self._holders.get((lane, target))  # never empty: _unindex drops empties
        return holders is not None and (len(holders) > 1 or inc.id not in holders)

    # --- evaluation ------------------------------------------------------------------------

    def evaluate(self, signals: Sequence[Signal], view: View) -> Evaluation:
        now = self._clock()
        present, ready, sick_nodes = self._match(signals, now)
        for inc in list(self._incidents.values()):
            key = (inc.rule, inc.scope_id)
            if inc.closed_at is None:
                if key not in present:
                    inc.closed_at = now
            elif key in ready and self._may_resume(inc):
                inc.closed_at = None
        for rule_name, scope_id in ready:
            rule = self._rules[rule_name]
            incident = f"{rule_name}/{rule.when.scope}/{scope_id}"
            if incident not in self._incidents:
                self._incidents[incident] = _Incident(
                    id=incident, rule=rule_name, scope=rule.when.scope, scope_id=scope_id,
                    opened_at=now, ready_from=now)

        ctx = _Pass(view, now, self._disrupted(), sick_nodes)
        # Open incidents first: one that wants a group a closing incident still holds takes
        # it over (no recover, then a fail-over straight after it, refused by cooldown).
        for inc in [i for i in self._incidents.values() if i.closed_at is None]:
            self._climb(inc, present[(inc.rule, inc.scope_id)], ctx)
        for inc in [i for i in self._incidents.values() if i.closed_at is not None]:
            self._release(inc, ctx)
        # Degrade last, so that it sees the capacity this evaluation's decisions take away.
        self._degrade_pass(ctx)
        return Evaluation(decisions=ctx.decisions, refusals=ctx.refusals)

    def _match(self, signals: Iterable[Signal], now: float
               ) -> tuple[dict[tuple[str, str], list[Signal]], dict[tuple[str, str], None],
                          set[tuple[str, str]]]:
        """(rule, scope id) → the signals matching it; those whose ``for`` is met; and the
        (rule, node) pairs with a matching signal on the node."""
        present: dict[tuple[str, str], list[Signal]] = {}
        ready: dict[tuple[str, str], None] = {}  # a dict keeps first-seen order
        sick_nodes: set[tuple[str, str]] = set()
        for sig in signals:
            rules = self._by_class.get(sig.fault_class)
            if not rules:
                continue
            rank = SEVERITY_RANK[sig.severity]
            for rule, min_rank in rules:
                if rank < min_rank:
                    continue
                when = rule.when
                if sig.node is not None:
                    sick_nodes.add((rule.name, sig.node))
                if when.scope == "group":
                    scope_ids: Iterable[str] = sig.groups
                else:
                    scope_ids = () if sig.node is None else (sig.node,)
                # `for: 0` means at once, even for a `since` a hair ahead of our clock.
                lasted = when.for_seconds <= 0 or now - sig.since >= when.for_seconds
                for scope_id in scope_ids:
                    key = (rule.name, scope_id)
                    present.setdefault(key, []).append(sig)
                    if lasted:
                        ready[key] = None
        return present, ready, sick_nodes

    def _disrupted(self) -> set[str]:
        out: set[str] = set()
        for inc in self._incidents.values():
            out |= inc.failed_over
            if inc.closed_at is None:
                out |= inc.restarted
        for _, _, action, target in self._in_flight:
            if action in _DISRUPTIVE:
                out.add(target)
        return out

    def _may_resume(self, inc: _Incident) -> bool:
        """A closing incident picks up where it was if it has not started letting go."""
        if inc.released_any:
            return False
        return not any((inc.id, -1, _RELEASE[lane], target) in self._in_flight
                       for lane in _HELD_LANES for target in inc.held(lane))

    # --- the ladder ------------------------------------------------------------------------

    def _climb(self, inc: _Incident, signals: list[Signal], ctx: _Pass) -> None:
        rule = self._rules[inc.rule]
        while inc.step < len(rule.then):
            step = rule.then[inc.step]
            if inc.targets is None:
                if ctx.now - inc.ready_from < step.after_seconds:
                    return
                inc.node_local = any(s.node_local for s in signals)
                inc.targets = dict.fromkeys(self._targets(inc, step.action, signals, ctx),
                                            _Status.PENDING)
            for target, status in inc.targets.items():
                if status is _Status.PENDING:
                    action = self._action_for(inc, step.action, target, signals)
                    self._decide_step(inc, rule, action, target, signals, ctx)
            if not self._advance(inc):
                return

    def _targets(self, inc: _Incident, action: Action, signals: list[Signal],
                 ctx: _Pass) -> list[str]:
        if action in _DISRUPTIVE:
            if inc.scope == "group":
                return [inc.scope_id]
            groups = set(ctx.groups_on(inc.scope_id))
            for sig in signals:
                groups.update(sig.groups)
            return sorted(groups)
        if action is Action.QUARANTINE:
            if inc.scope == "node":
                return [inc.scope_id]
            return sorted({s.node for s in signals
                           if (s.node_local or s.suspect) and s.node is not None})
        return [inc.scope_id]  # notify: about the incident's own subject

    @staticmethod
    def _action_for(inc: _Incident, action: Action, target: str, signals: list[Signal]
                    ) -> Action:
        """A quarantine of a node only suspected (no node-local signal on it) is the soft
        form, ``suspect``."""
        if action is not Action.QUARANTINE or inc.scope == "node" or any(
                s.node_local and s.node == target for s in signals):
            return action
        return Action.SUSPECT
    def _decide_step(self, inc: _Incident, rule: Rule, action: Action, target: str,
                     signals: list[Signal], ctx: _Pass) -> None:
        lane = _LANE[action]
        if lane is not None:
            if (lane, target) in self._busy:
                return  # another decision on this target is out; wait for its outcome
            if action in (Action.FAIL_OVER, Action.QUARANTINE, Action.SUSPECT) and \
                    self._holders.get((lane, target)):
                # Already out of traffic / quarantined for another incident: share it.
                self._hold(inc, lane, target)
                self._mark_done(inc, action, target, ctx.now, shared=True)
                return
        decision = Decision(
            incident=inc.id, rule=rule.name, step=inc.step, action=action, target=target,
            reason=self._reason(rule, inc.step, action, target, signals, ctx.now),
            dry_run=self.policy.dry_run, node_local=inc.node_local,
            opened=round(inc.opened_at + self._offset(), 3))
        if self._admit(decision, ctx):
            assert inc.targets is not None
            inc.targets[target] = _Status.IN_FLIGHT

    def _mark_done(self, inc: _Incident, action: Action, target: str, now: float,
                   shared: bool = False) -> None:
        assert inc.targets is not None
        inc.targets[target] = _Status.DONE
        inc.step_done_at = now if inc.step_done_at is None else max(inc.step_done_at, now)
        inc.history.append(_Done(inc.step, action, target, now, shared))

    def _advance(self, inc: _Incident) -> bool:
        """Move past the current step if all of it is done (a step with no target is done
        at once and does not restart the ``after`` clock)."""
        if inc.targets is None or any(s is not _Status.DONE for s in inc.targets.values()):
            return False
        if inc.step_done_at is not None:
            inc.ready_from = inc.step_done_at
        inc.step += 1
        inc.targets = None
        inc.step_done_at = None
        return True

    @staticmethod
    def _reason(rule: Rule, step: int, action: Action, target: str,
                signals: list[Signal], now: float) -> str:
        what = f"rule {rule.name}, step {step + 1} of {len(rule.then)}: {action} {target}"
        if not signals:
            return f"{what[0].upper()}{what[1:]}."
        first = min(signals, key=lambda s: s.since)
        where = f" on node {first.node}" if first.node and first.subject_id != first.node else ""
        more = f" and {len(signals) - 1} more finding(s)" if len(signals) > 1 else ""
        return (f"{first.fault_class} ({first.severity}) on {first.subject_kind} "
                f"{first.subject_id}{where} for {max(0.0, now - first.since):.0f}s{more} "
                f"matched {what}.")

    # --- closing ---------------------------------------------------------------------------

    def _release(self, inc: _Incident, ctx: _Pass) -> None:
        rule = self._rules[inc.rule]
        for lane in _HELD_LANES:
            action = _RELEASE[lane]
            for target in sorted(inc.held(lane)):
                if (inc.id, -1, action, target) in self._in_flight:
                    continue
                if self._held_by_other(inc, lane, target) or (
                        action is Action.UNQUARANTINE and not rule.lift_quarantine):
                    self._let_go(inc, lane, target)  # another incident keeps it, or we keep it
                    continue
                if (lane, target) in self._busy:
                    continue  # another incident is acting on it right now
                if action in (Action.UNQUARANTINE, Action.UNSUSPECT) and \
                        (rule.name, target) in ctx.sick_nodes:
                    # The group's incident may close because the group left the node (it was
                    # restarted elsewhere); the node is as sick as before. Lifted when the
                    # node's own findings clear (a GPU reset, a reboot), not before.
                    continue
                if action is Action.RECOVER:
                    reason = (f"No finding matches rule {rule.name} for {inc.scope} "
                              f"{inc.scope_id} any more: put group {target} back in traffic.")
                elif action is Action.UNSUSPECT:
                    reason = (f"No finding matches rule {rule.name} for {inc.scope} "
                              f"{inc.scope_id} any more: node {target} is no longer a "
                              "suspect.")
                else:
                    reason = (f"No finding matches rule {rule.name} for {inc.scope} "
                              f"{inc.scope_id} any more: lift the quarantine of node {target}.")
                decision = Decision(incident=inc.id, rule=rule.name, step=-1, action=action,
                                    target=target, reason=reason, dry_run=self.policy.dry_run,
                                    node_local=inc.node_local)
                if self._admit(decision, ctx):
                    # Being released: no other incident may count on it any more.
                    self._unindex(inc.id, lane, target)
        self._forget_if_finished(inc)

    def _forget_if_finished(self, inc: _Incident) -> None:
        if inc.closed_at is None or inc.failed_over or inc.quarantined or inc.suspected:
            return
        if inc.targets is not None and any(s is _Status.IN_FLIGHT
                                           for s in inc.targets.values()):
            return
        self._incidents.pop(inc.id, None)

    # --- degrade ---------------------------------------------------------------------------

    def _degrade_pass(self, ctx: _Pass) -> None:
        for entry in self.policy.degrade:
            model = entry.model
            state = self._degrade.setdefault(model, _DegradeState())
            if (_DEGRADE, model) in self._busy:
                continue
            healthy = ctx.healthy(model)
            action: Action | None = None
            reason = ""
            if not state.degraded:
                if healthy < entry.floor:
                    action = Action.DEGRADE
                    reason = (f"{model} has {healthy} healthy group(s), below its floor of "
                              f"{entry.floor}: serve {entry.fallback} instead.")
            else:
                if healthy < entry.floor:
                    state.healthy_since = None  # hysteresis: any dip starts the wait again
                elif state.healthy_since is None:
                    state.healthy_since = ctx.now
                if state.healthy_since is not None and \
                        ctx.now - state.healthy_since >= entry.restore_after_seconds:
                    action = Action.RESTORE
                    reason = (f"{model} has had at least {entry.floor} healthy group(s) for "
                              f"{ctx.now - state.healthy_since:.0f}s: move traffic back from "
                              f"{entry.fallback}.")
                elif healthy != state.split_for:
                    # Degraded traffic is shared between the model's serving groups and
                    # the fallback: degrade again so that the share follows the groups —
                    # above all, to take it off the last group when that one fails too.
                    action = Action.DEGRADE
                    reason = (f"{model} has {healthy} healthy group(s) now, "
                              f"{'unknown' if state.split_for is None else state.split_for}"
                              f" when its traffic was last shared with {entry.fallback}: "
                              "share it again.")
            if action is not None and self._admit(
                    Decision(incident=f"{DEGRADE_RULE}/{model}", rule=DEGRADE_RULE, step=-1,
                             action=action, target=model, reason=reason,
                             dry_run=self.policy.dry_run), ctx):
                state.deciding = healthy

    # --- safety ----------------------------------------------------------------------------

    def _admit(self, decision: Decision, ctx: _Pass) -> bool:
        """Return the decision (and track it in flight) or report why it is held back."""
        refused = self._check(decision, ctx)
        if refused is not None:
            ctx.refusals.append(Refusal(decision, *refused))
            return False
        key = _key(decision)
        self._in_flight[key] = decision
        lane = _LANE[decision.action]
        if lane is not None:
            self._busy[(lane, decision.target)] = key
        if self._counted(decision):
            self._breaker.in_flight += 1
        elif decision.action in _COUNTED:
            self._uncounted.add(key)
        if decision.action in _DISRUPTIVE:
            ctx.disrupt(decision.target)
        ctx.decisions.append(decision)
        return True

    def _check(self, decision: Decision, ctx: _Pass) -> tuple[str, str] | None:
        action, target, now = decision.action, decision.target, ctx.now
        if action is Action.NOTIFY:
            return None  # not a remediation: people need it most when the breaker is open
        breaker = self._breaker
        if breaker.opened_at is not None:
            return ("breaker", f"the circuit breaker has been open for "
                               f"{now - breaker.opened_at:.0f}s ({breaker.detail}); "
                               "reset it to act again")
        sick_fail_over = action is Action.FAIL_OVER and not getattr(ctx.group(target),
                                                                    "healthy", True)
        # Taking an already-sick group out of traffic is never held back: not by cooldown,
        # not by budget (below) — leaving it in traffic only hurts.
        if action in _COOLDOWN and not sick_fail_over:
            until = self._cooldowns.get((action, target))
            if until is not None:
                if now < until:
                    return ("cooldown", f"{action} on {target} was done recently; its "
                                        f"cooldown ends in {until - now:.0f}s")
                del self._cooldowns[(action, target)]
        if action in _DISRUPTIVE and target not in ctx.disrupted:
            budgets = self.policy.budgets
            group = ctx.group(target)
            healthy = group is not None and group.healthy
            if (healthy or action is not Action.FAIL_OVER) and (
                    len(ctx.disrupted) + 1 > budgets.max_groups_disrupted):
                return ("budget", f"{len(ctx.disrupted)} group(s) already disrupted; "
                                  f"max_groups_disrupted is {budgets.max_groups_disrupted}")
            if healthy:
                assert group is not None
                left, floor = ctx.healthy(group.model) - 1, budgets.min_healthy(group.model)
                if left < floor:
                    return ("floor", f"taking healthy group {target} out would leave "
                                     f"{group.model} with {left} healthy group(s), fewer "
                                     f"than min_healthy_groups {floor}")
        if self._counted(decision):
            limit = self.policy.circuit_breaker
            breaker.prune(now - limit.window_seconds)
            count = len(breaker.times) + breaker.in_flight + 1
            if count > limit.max_actions:
                breaker.opened_at = now
                breaker.detail = (f"{count} actions within {limit.window_seconds:g}s would "
                                  f"exceed max_actions {limit.max_actions}")
                return ("breaker", breaker.detail)
        return None

    def _counted(self, decision: Decision) -> bool:
        """Whether the breaker counts ``decision``: every action of ``_COUNTED`` except a
        degrade of a model degraded already — it only shares the traffic again as the
        model's groups come and go, each of which the breaker counts where we caused it
        (a fail-over, a restart). Still refused while the breaker is open."""
        if decision.action is Action.DEGRADE:
            state = self._degrade.get(decision.target)
            return state is None or not state.degraded
        return decision.action in _COUNTED

    @property
    def breaker_open(self) -> bool:
        return self._breaker.opened_at is not None

    def idle(self) -> bool:
        """Nothing open, nothing in flight, no model on its fallback: with no signals and
        no change in the cluster, an evaluation now could decide nothing (no timer runs)."""
        return not self._incidents and not self._in_flight and not any(
            state.degraded for state in self._degrade.values())

    def degrade_states(self) -> dict[str, bool]:
        """Every model the policy can degrade → whether a confirmed degrade has its
        traffic on the fallback now."""
        return {d.model: bool((st := self._degrade.get(d.model)) and st.degraded)
                for d in self.policy.degrade}

    def reset_breaker(self) -> None:
        """Close the breaker and forget the actions that opened it (else the next action
        would open it again at once). Refused decisions are decided again."""
        self._breaker.opened_at = None
        self._breaker.detail = ""
        self._breaker.times.clear()

    # --- outcomes --------------------------------------------------------------------------

    def confirm(self, decision: Decision, ok: bool) -> None:
        """The controller carried ``decision`` out (``ok``) or failed to (it is decided again
        on the next evaluation). Unknown or repeated confirmations are ignored."""
        key = _key(decision)
        if self._in_flight.pop(key, None) is None:
            return
        action, target = decision.action, decision.target
        lane = _LANE[action]
        if lane is not None and self._busy.get((lane, target)) == key:
            del self._busy[(lane, target)]
        now = self._clock()
        counted = action in _COUNTED and key not in self._uncounted
        self._uncounted.discard(key)
        if counted:
            self._breaker.in_flight -= 1
        if ok:
            self._count(action, target, decision.rule, now, counted)
        if action in (Action.DEGRADE, Action.RESTORE):
            self._confirm_degrade(decision, ok, now)
            return
        inc = self._incidents.get(decision.incident)
        if inc is None:
            return  # dropped by a policy reload
        if decision.step < 0:
            assert lane is not None
            if ok:
                inc.held(lane).discard(target)
                inc.released_any = True
                inc.history.append(_Done(-1, action, target, now))
            elif target in inc.held(lane):
                self._holders.setdefault((lane, target), set()).add(inc.id)
            self._forget_if_finished(inc)
            return
        if inc.targets is None or decision.step != inc.step or target not in inc.targets:
            return
        if not ok:
            inc.targets[target] = _Status.PENDING
            return
        if action is Action.FAIL_OVER:
            self._hold(inc, _TRAFFIC, target)
        elif action is Action.QUARANTINE:
            self._hold(inc, _CORDON, target)
        elif action is Action.SUSPECT:
            self._hold(inc, _SUSPECT, target)
        elif action is Action.RESTART_GROUP:
            inc.restarted.add(target)
        self._mark_done(inc, action, target, now)
        self._advance(inc)
        self._forget_if_finished(inc)

    def _count(self, action: Action, target: str, rule_name: str, now: float,
               counted: bool) -> None:
        if action in _COOLDOWN:
            rule = self._rules.get(rule_name)
            cooldown = (rule.cooldown_seconds if rule is not None
                        and rule.cooldown_seconds is not None else self.policy.cooldown_seconds)
            self._cooldowns[(action, target)] = now + cooldown
        if counted:
            breaker, limit = self._breaker, self.policy.circuit_breaker
            breaker.times.append(now)
            breaker.prune(now - limit.window_seconds)
            # Only reachable after a reload lowered the limit: decisions stop before this.
            if breaker.opened_at is None and len(breaker.times) > limit.max_actions:
                breaker.opened_at = now
                breaker.detail = (f"{len(breaker.times)} actions within "
                                  f"{limit.window_seconds:g}s exceed max_actions "
                                  f"{limit.max_actions}")

    def _confirm_degrade(self, decision: Decision, ok: bool, now: float) -> None:
        state = self._degrade.get(decision.target)
        if state is None or not ok:
            return
        if decision.action is Action.DEGRADE:
            state.split_for = state.deciding
            if state.degraded:
                return  # shared again: still degraded since then, the restore wait runs on
        else:
            state.split_for = None
        state.degraded = decision.action is Action.DEGRADE
        state.changed_at = now
        state.healthy_since = None

    # --- persistence and status ------------------------------------------------------------

    def _offset(self) -> float:
        """wall - monotonic, held steady so that an unchanged state snapshots to the same
        JSON (the controller saves only what changed); re-read when the wall clock was
        stepped (NTP) by more than ``WALL_STEP_TOLERANCE``."""
        offset = self._wall() - self._clock()
        if self._wall_offset is None or abs(offset - self._wall_offset) > WALL_STEP_TOLERANCE:
            self._wall_offset = offset
        return self._wall_offset

    def snapshot(self) -> dict[str, Any]:
        """Everything needed to continue elsewhere, JSON-serialisable, times as wall-clock
        seconds (rounded to the millisecond)."""
        now = self._clock()
        offset = self._offset()

        def w(t: float | None) -> float | None:
            return None if t is None else round(t + offset, 3)

        breaker = self._breaker
        return {
            "version": SNAPSHOT_VERSION,
            "incidents": [_incident_to_json(inc, w) for inc in self._incidents.values()],
            "cooldowns": [{"action": str(a), "target": t, "until": w(until)}
                          for (a, t), until in self._cooldowns.items() if until > now],
            "breaker": {
                "open": breaker.opened_at is not None,
                "opened_at": w(breaker.opened_at),
                "detail": breaker.detail,
                "action_times": [w(t) for t in breaker.times],
            },
            "degrade": [{"model": model, "degraded": s.degraded,
                         "changed_at": w(s.changed_at), "healthy_since": w(s.healthy_since),
                         "split_for": s.split_for}
                        for model, s in self._degrade.items()],
        }

    def restore(self, snapshot: Mapping[str, Any]) -> None:
        """Continue from ``snapshot()`` of another engine (a new leader). Decisions that were
        in flight there are pending here: nobody can tell whether they were carried out, so
        they are decided again and the action layer's own idempotence covers a repeat.
        Incidents of rules this policy no longer has are dropped. All or nothing: a
        malformed snapshot raises ``ValueError`` and leaves the state as it was.

        A version-1 snapshot (ages) is read as if it had been saved just now: its age is
        unknown, so its timers restart — the behaviour of the controllers that wrote it."""
        try:
            version = snapshot.get("version")
            if version not in (1, SNAPSHOT_VERSION):
                raise ValueError(f"version {version!r}, expected {SNAPSHOT_VERSION}")
            now = self._clock()
            if version == 1:
                snapshot = _from_ages(snapshot, self._wall())
            offset = self._offset()

            def m(t: Any) -> float | None:
                return None if t is None else float(t) - offset

            incidents: dict[str, _Incident] = {}
            for raw in snapshot["incidents"]:
                inc, was_in_flight = _incident_from_json(raw, m)
                rule = self._rules.get(inc.rule)
                if rule is None or rule.when.scope != inc.scope:
                    continue
                if inc.closed_at is not None and inc.step < len(rule.then):
                    # A closing incident does not decide its ladder again, so assume what was
                    # in flight happened: its recover/unquarantine is harmless if it did not.
                    action = rule.then[inc.step].action
                    if action is Action.FAIL_OVER:
                        inc.failed_over.update(was_in_flight)
                    elif action is Action.QUARANTINE:
                        # Which of them were only suspected is not kept: either release
                        # of a node we did not mark is a no-op.
                        inc.quarantined.update(was_in_flight)
                        inc.suspected.update(was_in_flight)
                inc.step = min(inc.step, len(rule.then))
                incidents[inc.id] = inc
            cooldowns = {(Action(c["action"]), str(c["target"])): float(c["until"]) - offset
                         for c in snapshot["cooldowns"]}
            cooldowns = {k: v for k, v in cooldowns.items() if v > now}
            raw_breaker = snapshot["breaker"]
            breaker = _Breaker(
                times=deque(sorted(float(t) - offset for t in raw_breaker["action_times"])),
                opened_at=m(raw_breaker["opened_at"]), detail=str(raw_breaker["detail"]))
            degrade = {
                str(d["model"]): _DegradeState(
                    degraded=bool(d["degraded"]), changed_at=m(d["changed_at"]),
                    healthy_since=m(d["healthy_since"]),
                    # Absent before splits: unknown, so the traffic is split again.
                    split_for=(None if d.get("split_for") is None
                               else int(d["split_for"])))
                for d in snapshot["degrade"] if self.policy.degrade_for(str(d["model"]))}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"not a policy engine snapshot: {exc}") from exc
        self._incidents = incidents
        self._in_flight = {}
        self._uncounted = set()
        self._busy = {}
        self._holders = {}
        for inc in incidents.values():
            for lane in _HELD_LANES:
                for target in inc.held(lane):
                    self._holders.setdefault((lane, target), set()).add(inc.id)
        self._cooldowns = cooldowns
        self._breaker = breaker
        self._degrade = degrade

    def incidents(self) -> list[dict[str, Any]]:
        """Open and closing incidents, and degraded models, for /status."""
        now = self._clock()
        out: list[dict[str, Any]] = []
        for inc in self._incidents.values():
            rule = self._rules[inc.rule]
            in_flight = [{"step": k[1], "action": str(k[2]), "target": k[3]}
                         for k in self._in_flight if k[0] == inc.id]
            if inc.closed_at is not None:
                waiting = "releasing"
            elif inc.step >= len(rule.then):
                waiting = "ladder complete; open while its findings last"
            elif inc.targets is None:
                left = rule.then[inc.step].after_seconds - (now - inc.ready_from)
                waiting = f"next step in {max(0.0, left):.0f}s"
            elif in_flight:
                waiting = "confirmation"
            else:
                waiting = "a refused or held-back decision"
            out.append({
                "id": inc.id, "rule": inc.rule, "scope": inc.scope, "scope_id": inc.scope_id,
                "state": "open" if inc.closed_at is None else "closing",
                "age_seconds": now - inc.opened_at, "step": inc.step,
                "steps": len(rule.then), "waiting_for": waiting, "in_flight": in_flight,
                "done": [{"step": d.step, "action": str(d.action), "target": d.target,
                          "age_seconds": now - d.at, "shared": d.shared}
                         for d in inc.history],
                "failed_over": sorted(inc.failed_over), "quarantined": sorted(inc.quarantined),
                "suspected": sorted(inc.suspected),
            })
        for model, state in self._degrade.items():
            if state.degraded:
                entry = self.policy.degrade_for(model)
                out.append({
                    "id": f"{DEGRADE_RULE}/{model}", "rule": DEGRADE_RULE, "scope": "model",
                    "scope_id": model, "state": "degraded",
                    "fallback": entry.fallback if entry else None,
                    "age_seconds": None if state.changed_at is None else now - state.changed_at,
                    "healthy_for_seconds": (None if state.healthy_since is None
                                            else now - state.healthy_since),
                })
        return out


def _incident_to_json(inc: _Incident, w: Callable[[float | None], float | None]
                      ) -> dict[str, Any]:
    return {
        "id": inc.id, "rule": inc.rule, "scope": inc.scope, "scope_id": inc.scope_id,
        "opened_at": w(inc.opened_at), "ready_from": w(inc.ready_from),
        "closed_at": w(inc.closed_at), "step": inc.step,
        "targets": (None if inc.targets is None
                    else {t: s.value for t, s in inc.targets.items()}),
        "step_done_at": w(inc.step_done_at),
        "node_local": inc.node_local, "released_any": inc.released_any,
        "failed_over": sorted(inc.failed_over), "quarantined": sorted(inc.quarantined),
        "suspected": sorted(inc.suspected), "restarted": sorted(inc.restarted),
        "history": [{"step": d.step, "action": str(d.action), "target": d.target,
                     "at": w(d.at), "shared": d.shared} for d in inc.history],
    }


def _incident_from_json(raw: Mapping[str, Any], m: Callable[[Any], float | None]
                        ) -> tuple[_Incident, list[str]]:
    """The incident, and the current step's targets that were in flight."""
    targets = raw["targets"]
    in_flight = [] if targets is None else [str(t) for t, s in targets.items()
                                            if s == _Status.IN_FLIGHT.value]

    def required(t: Any) -> float:
        value = m(t)
        if value is None:
            raise ValueError("a required time is null")
        return value

    return _Incident(
        id=str(raw["id"]), rule=str(raw["rule"]), scope=str(raw["scope"]),
        scope_id=str(raw["scope_id"]), opened_at=required(raw["opened_at"]),
        ready_from=required(raw["ready_from"]), step=int(raw["step"]),
        # In flight there means undecided here (see ``PolicyEngine.restore``).
        targets=(None if targets is None else
                 {str(t): _Status.DONE if s == _Status.DONE.value else _Status.PENDING
                  for t, s in targets.items()}),
        step_done_at=m(raw["step_done_at"]),
        node_local=bool(raw["node_local"]),
        closed_at=m(raw["closed_at"]),
        released_any=bool(raw["released_any"]),
        failed_over={str(g) for g in raw["failed_over"]},
        quarantined={str(n) for n in raw["quarantined"]},
        suspected={str(n) for n in raw.get("suspected", ())},  # absent before suspects
        restarted={str(g) for g in raw["restarted"]},
        history=[_Done(int(d["step"]), Action(d["action"]), str(d["target"]),
                       required(d["at"]), bool(d["shared"])) for d in raw["history"]],
    ), in_flight


def _from_ages(old: Mapping[str, Any], wall_now: float) -> dict[str, Any]:
    """A version-1 snapshot (ages relative to its save) as version 2, taking the save to
    have been now."""
    def at(age: Any) -> float | None:
        return None if age is None else wall_now - float(age)

    return {
        "version": SNAPSHOT_VERSION,
        "incidents": [{**{k: v for k, v in inc.items() if not k.endswith("_age")},
                       "opened_at": at(inc["opened_age"]), "ready_from": at(inc["ready_age"]),
                       "closed_at": at(inc["closed_age"]),
                       "step_done_at": at(inc["step_done_age"]),
                       "history": [{**{k: v for k, v in d.items() if k != "age"},
                                    "at": at(d["age"])} for d in inc["history"]]}
                      for inc in old["incidents"]],
        "cooldowns": [{"action": c["action"], "target": c["target"],
                       "until": wall_now + float(c["remaining"])} for c in old["cooldowns"]],
        "breaker": {"opened_at": at(old["breaker"]["opened_age"]),
                    "detail": old["breaker"]["detail"],
                    "action_times": [at(a) for a in old["breaker"]["action_ages"]]},
        "degrade": [{"model": d["model"], "degraded": d["degraded"],
                     "changed_at": at(d["changed_age"]), "healthy_since": at(d["healthy_age"])}
                    for d in old["degrade"]],
    }
