"""The policy engine: incidents, escalation ladders, the safety rules, degrade, persistence.

Time is a fake clock the tests move by hand; "the controller" is the test confirming (or
failing) what each evaluation returns.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterable

import pytest

from policies.engine import PolicyEngine
from policies.model import Action, Decision, Evaluation, GroupView, Signal, View
from policies.schema import Policy, load_policy

T0 = 1000.0

GPU_LOST = """
- name: gpu-lost
  when: {fault_classes: [gpu_lost, xid], min_severity: critical, scope: group}
  then:
    - action: fail_over
    - action: quarantine
    - action: restart_group
      after: 30s
  lift_quarantine: true
"""


WALL0 = 1.8e9  # the wall clock when the monotonic test clock reads T0


class Clock:
    """Monotonic seconds that only move when a test says so, and the wall clock with them
    (``wall_offset`` apart: another process's monotonic clock starts elsewhere)."""

    def __init__(self, t: float = T0, wall_offset: float = WALL0 - T0) -> None:
        self.t = t
        self.wall_offset = wall_offset

    def __call__(self) -> float:
        return self.t

    def wall(self) -> float:
        return self.t + self.wall_offset

    def advance(self, seconds: float) -> None:
        self.t += seconds


def make_policy(*rules: str, budgets: str = "{max_groups_disrupted: 100, min_healthy_groups: 0}",
                breaker: str = "{max_actions: 1000, window: 5m}", extra: str = "") -> Policy:
    """A policy from rule snippets, with budgets and breaker out of the way unless given."""
    body = "".join(textwrap.indent(textwrap.dedent(r).strip() + "\n", "  ")
                   for r in rules or (GPU_LOST,))
    return load_policy(f"budgets: {budgets}\ncircuit_breaker: {breaker}\n{extra}\n"
                       f"rules:\n{body}")


def sig(fault_class: str = "gpu_lost", severity: str = "critical", *,
        groups: Iterable[str] = ("g1",), node: str | None = "n1", node_local: bool = True,
        since: float = T0, subject: str = "GPU-1", kind: str = "gpu") -> Signal:
    return Signal(fault_class, severity, kind, subject, node, tuple(groups), node_local, since)


def view(*groups: tuple[str, str, bool, tuple[str, ...]]) -> View:
    """(key, model, healthy, nodes) per group."""
    return View({k: GroupView(k, model, healthy, nodes) for k, model, healthy, nodes in groups})


# g1, g2 on n1; g3 on n2; g4 on n3: one model "m". g1 is the sick one in most tests.
VIEW = view(("g1", "m", False, ("n1",)), ("g2", "m", True, ("n1",)),
            ("g3", "m", True, ("n2",)), ("g4", "m", True, ("n3",)))


def brief(ev: Evaluation) -> list[tuple[str, str, int]]:
    return [(str(d.action), d.target, d.step) for d in ev.decisions]


def refused(ev: Evaluation) -> list[tuple[str, str, str]]:
    return [(str(r.decision.action), r.decision.target, r.why) for r in ev.refusals]


def settle(engine: PolicyEngine, ev: Evaluation, ok: bool = True) -> Evaluation:
    for decision in ev.decisions:
        engine.confirm(decision, ok)
    return ev


def step(engine: PolicyEngine, signals: Iterable[Signal], v: View = VIEW,
         ok: bool = True) -> Evaluation:
    """One evaluation whose decisions the controller carries out (or fails) at once."""
    return settle(engine, engine.evaluate(list(signals), v), ok)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def engine(clock: Clock) -> PolicyEngine:
    return PolicyEngine(make_policy(), clock, clock.wall)


class TestIdle:
    def test_idle_until_an_incident_opens_and_again_once_it_is_released(
            self, engine: PolicyEngine, clock: Clock) -> None:
        """The controller skips its periodic evaluation while the engine is idle: nothing
        open, nothing in flight, nothing degraded — so idle must end with the first
        incident, stay off while a decision is in flight, and come back only after the
        incident is closed and released."""
        assert engine.idle()
        ev = engine.evaluate([sig()], VIEW)
        assert brief(ev) == [("fail_over", "g1", 0)] and not engine.idle()  # in flight
        settle(engine, ev)
        assert not engine.idle()  # open
        healthy = view(("g1", "m", True, ("n1",)))
        for _ in range(20):  # the signal is gone: the incident closes, recovers, releases
            step(engine, [], healthy)
            clock.advance(60)
            if engine.idle():
                break
        assert engine.idle()


class TestOpening:
    @pytest.mark.parametrize(
        ("fault_class", "severity", "min_severity", "opens"),
        [
            ("gpu_lost", "critical", "critical", True),
            ("gpu_lost", "warning", "critical", False),
            ("gpu_lost", "info", "warning", False),
            ("gpu_lost", "warning", "warning", True),
            ("gpu_lost", "critical", "warning", True),
            ("gpu_lost", "info", "info", True),
            ("thermal", "critical", "info", False),  # not one of the rule's fault classes
        ],
    )
    def test_match_on_fault_class_and_severity(self, clock: Clock, fault_class: str,
                                               severity: str, min_severity: str,
                                               opens: bool) -> None:
        """A signal matches a rule when its class is listed and its severity is at least
        the rule's minimum (info < warning < critical)."""
        engine = PolicyEngine(make_policy(f"""
            - name: r
              when: {{fault_classes: [gpu_lost], min_severity: {min_severity}}}
              then: [{{action: fail_over}}]
        """), clock)
        ev = engine.evaluate([sig(fault_class, severity)], VIEW)
        assert brief(ev) == ([("fail_over", "g1", 0)] if opens else [])

    def test_incident_waits_for_the_signal_to_last(self, clock: Clock) -> None:
        """With `for: 30s` nothing happens until the finding is 30 s old, measured from its
        `since`, not from when the engine first saw it."""
        engine = PolicyEngine(make_policy("""
            - name: slow
              when: {fault_classes: [thermal], for: 30s}
              then: [{action: fail_over}]
        """), clock)
        s = sig("thermal", "warning", since=T0 - 20)
        assert brief(engine.evaluate([s], VIEW)) == []
        assert engine.incidents() == []
        clock.advance(9.9)
        assert brief(engine.evaluate([s], VIEW)) == []
        clock.advance(0.1)
        ev = engine.evaluate([s], VIEW)
        assert brief(ev) == [("fail_over", "g1", 0)]
        assert ev.decisions[0].incident == "slow/group/g1"

    def test_no_for_means_at_once(self, engine: PolicyEngine) -> None:
        """Without `for`, a finding stamped slightly ahead of our clock still acts now."""
        assert brief(engine.evaluate([sig(since=T0 + 0.5)], VIEW)) == [("fail_over", "g1", 0)]

    def test_group_scope_opens_one_incident_per_group(self, engine: PolicyEngine) -> None:
        """Scope group: every group the signal names gets its own incident and ladder."""
        ev = engine.evaluate([sig(groups=("g1", "g2"))], VIEW)
        assert [(d.incident, d.target) for d in ev.decisions] == [
            ("gpu-lost/group/g1", "g1"), ("gpu-lost/group/g2", "g2")]

    def test_group_scope_ignores_signals_without_groups(self, engine: PolicyEngine) -> None:
        """A node with no serving pods opens nothing for a group rule."""
        assert brief(engine.evaluate([sig(groups=())], VIEW)) == []
        assert engine.incidents() == []

    def test_node_scope_keys_by_node(self, clock: Clock) -> None:
        """Scope node: one incident per node, whatever the number of findings on it; a
        finding with no node opens none."""
        engine = PolicyEngine(make_policy("""
            - name: hot
              when: {fault_classes: [thermal], scope: node}
              then: [{action: quarantine}]
        """), clock)
        ev = engine.evaluate([sig("thermal", "warning", subject="GPU-1"),
                              sig("thermal", "warning", subject="GPU-2"),
                              sig("thermal", "warning", node=None, subject="link")], VIEW)
        assert [(d.incident, str(d.action), d.target) for d in ev.decisions] == [
            ("hot/node/n1", "quarantine", "n1")]

    def test_one_signal_can_open_incidents_of_several_rules(self, clock: Clock) -> None:
        """Rules are independent: a finding matching two rules opens two incidents."""
        engine = PolicyEngine(make_policy(GPU_LOST, """
            - name: tell
              when: {fault_classes: [gpu_lost], scope: node}
              then: [{action: notify}]
        """), clock)
        ev = engine.evaluate([sig()], VIEW)
        assert [(d.incident, str(d.action)) for d in ev.decisions] == [
            ("gpu-lost/group/g1", "fail_over"), ("tell/node/n1", "notify")]

    def test_signal_severity_is_checked(self) -> None:
        """A Signal with a severity outside info/warning/critical is a bug caught at once."""
        with pytest.raises(ValueError, match="severity"):
            sig(severity="fatal")


class TestLadder:
    def test_steps_run_in_order_each_after_the_previous_is_confirmed(
            self, engine: PolicyEngine, clock: Clock) -> None:
        """Step k is decided only once step k-1 is confirmed, and `after` counts from that
        confirmation."""
        s = [sig()]
        assert brief(step(engine, s)) == [("fail_over", "g1", 0)]
        assert brief(step(engine, s)) == [("quarantine", "n1", 1)]
        clock.advance(29)
        assert brief(step(engine, s)) == []
        clock.advance(1)
        assert brief(step(engine, s)) == [("restart_group", "g1", 2)]
        for _ in range(3):
            clock.advance(60)
            assert brief(step(engine, s)) == []

    def test_after_counts_from_the_confirmation_not_the_decision(
            self, engine: PolicyEngine, clock: Clock) -> None:
        """A slow action delays the next step: the clock starts when it is confirmed."""
        s = [sig()]
        step(engine, s)
        ev = engine.evaluate(s, VIEW)  # quarantine decided at T0 ...
        clock.advance(20)
        settle(engine, ev)  # ... confirmed at T0+20
        clock.advance(29)
        assert brief(engine.evaluate(s, VIEW)) == []
        clock.advance(1)
        assert brief(engine.evaluate(s, VIEW)) == [("restart_group", "g1", 2)]

    def test_unconfirmed_decision_is_held_in_flight(self, engine: PolicyEngine) -> None:
        """A decision not confirmed yet is not returned again, nor is the next step."""
        s = [sig()]
        first = engine.evaluate(s, VIEW)
        assert brief(first) == [("fail_over", "g1", 0)]
        for _ in range(3):
            ev = engine.evaluate(s, VIEW)
            assert (brief(ev), refused(ev)) == ([], [])
        settle(engine, first)
        assert brief(engine.evaluate(s, VIEW)) == [("quarantine", "n1", 1)]

    def test_failed_decision_is_decided_again(self, engine: PolicyEngine) -> None:
        """confirm(ok=False) puts the step back: the next evaluation returns it again."""
        s = [sig()]
        assert brief(step(engine, s, ok=False)) == [("fail_over", "g1", 0)]
        assert brief(step(engine, s, ok=False)) == [("fail_over", "g1", 0)]
        assert brief(step(engine, s)) == [("fail_over", "g1", 0)]
        assert brief(step(engine, s)) == [("quarantine", "n1", 1)]

    def test_confirmed_step_is_never_decided_again(self, engine: PolicyEngine,
                                                   clock: Clock) -> None:
        """Idempotent per incident: however often evaluate runs, each step goes out once."""
        s = [sig()]
        seen: list[tuple[str, str, int]] = []
        for _ in range(50):
            seen += brief(step(engine, s))
            clock.advance(5)
        assert seen == [("fail_over", "g1", 0), ("quarantine", "n1", 1),
                        ("restart_group", "g1", 2)]

    def test_repeated_or_unknown_confirmations_are_ignored(self,
                                                           engine: PolicyEngine) -> None:
        """Confirming twice, or confirming something never decided, changes nothing."""
        s = [sig()]
        (decision,) = engine.evaluate(s, VIEW).decisions
        engine.confirm(decision, True)
        engine.confirm(decision, False)  # late duplicate: must not undo the step
        engine.confirm(Decision("x/group/y", "x", 0, Action.FAIL_OVER, "y", "", False), True)
        assert brief(engine.evaluate(s, VIEW)) == [("quarantine", "n1", 1)]

    def test_after_on_the_first_step_counts_from_the_opening(self, clock: Clock) -> None:
        """Step 0 with `after` waits that long after the incident opened."""
        engine = PolicyEngine(make_policy("""
            - name: r
              when: {fault_classes: [gpu_lost]}
              then: [{action: fail_over, after: 10s}]
        """), clock)
        s = [sig()]
        assert brief(engine.evaluate(s, VIEW)) == []
        clock.advance(10)
        assert brief(engine.evaluate(s, VIEW)) == [("fail_over", "g1", 0)]

    def test_decision_fields(self, engine: PolicyEngine) -> None:
        """A decision names its incident, rule, step, target, node-locality and a reason."""
        (d,) = engine.evaluate([sig(since=T0 - 12)], VIEW).decisions
        assert d == Decision(
            incident="gpu-lost/group/g1", rule="gpu-lost", step=0, action=Action.FAIL_OVER,
            target="g1", dry_run=False, node_local=True, opened=WALL0,
            reason="gpu_lost (critical) on gpu GPU-1 on node n1 for 12s matched rule "
                   "gpu-lost, step 1 of 3: fail_over g1.")

    def test_a_later_incident_of_the_same_rule_and_group_is_told_apart(
            self, engine: PolicyEngine, clock: Clock) -> None:
        """The incident id repeats when the same group fails again; the decision's
        ``opened`` does not, so the second restart is not mistaken for the first one
        (found by `python -m bench e2e`: the second restart of a group deleted nothing)."""
        first = step(engine, [sig()]).decisions[0]
        step(engine, [])  # recovered: the incident closes and is forgotten
        clock.advance(60)
        second = step(engine, [sig(since=clock.t)]).decisions[0]
        assert (first.incident, first.step) == (second.incident, second.step)
        assert (first.opened, second.opened) == (WALL0, WALL0 + 60)
        # A new leader (another process, its monotonic clock elsewhere) continuing the
        # incident names the same one.
        fresh_clock = Clock(T0 - 900.0, wall_offset=clock.wall() - (T0 - 900.0))
        fresh = PolicyEngine(engine.policy, fresh_clock, fresh_clock.wall)
        fresh.restore(json.loads(json.dumps(engine.snapshot())))
        (quarantine,) = fresh.evaluate([sig()], VIEW).decisions
        assert (quarantine.action, quarantine.opened) == (Action.QUARANTINE, second.opened)


class TestTargets:
    def test_node_scope_acts_on_every_group_on_the_node(self, clock: Clock) -> None:
        """Scope node: fail_over/restart_group go to each group on the node (from the view
        and from the signals), one decision per group, in a stable order."""
        engine = PolicyEngine(make_policy("""
            - name: down
              when: {fault_classes: [node_down], scope: node}
              then: [{action: fail_over}, {action: restart_group}]
        """), clock)
        s = [sig("node_down", kind="node", subject="n1", groups=("g9",))]
        assert brief(step(engine, s)) == [("fail_over", "g1", 0), ("fail_over", "g2", 0),
                                          ("fail_over", "g9", 0)]
        assert brief(step(engine, s)) == [("restart_group", "g1", 1),
                                          ("restart_group", "g2", 1),
                                          ("restart_group", "g9", 1)]

    def test_step_waits_for_all_of_its_targets(self, clock: Clock) -> None:
        """With several targets, the next step waits until every one is confirmed ok."""
        engine = PolicyEngine(make_policy("""
            - name: down
              when: {fault_classes: [node_down], scope: node}
              then: [{action: fail_over}, {action: restart_group}]
        """), clock)
        s = [sig("node_down", kind="node", subject="n1")]
        ev = engine.evaluate(s, VIEW)
        engine.confirm(ev.decisions[0], True)
        engine.confirm(ev.decisions[1], False)
        assert brief(step(engine, s)) == [("fail_over", "g2", 0)]
        assert brief(step(engine, s)) == [("restart_group", "g1", 1),
                                          ("restart_group", "g2", 1)]

    @pytest.mark.parametrize(
        ("scope", "node", "node_local", "quarantined"),
        [
            ("group", "n1", True, ["n1"]),
            ("group", "n1", False, []),  # a group-level cause: no node to blame
            ("group", None, True, []),
            ("node", "n1", False, ["n1"]),  # node scope: the node is the subject
        ],
    )
    def test_quarantine_target(self, clock: Clock, scope: str, node: str | None,
                               node_local: bool, quarantined: list[str]) -> None:
        """Quarantine goes to the signal's node — for scope group only when the cause is
        node-local — and is skipped when there is no node."""
        engine = PolicyEngine(make_policy(f"""
            - name: r
              when: {{fault_classes: [gpu_lost], scope: {scope}}}
              then: [{{action: quarantine}}, {{action: notify}}]
        """), clock)
        s = [sig(node=node, node_local=node_local)]
        decisions = brief(step(engine, s)) + brief(step(engine, s))
        assert [t for a, t, _ in decisions if a == "quarantine"] == quarantined
        assert [a for a, _, _ in decisions][-1] == "notify"  # the ladder goes on regardless

    def test_quarantine_uses_every_node_local_signal(self, engine: PolicyEngine) -> None:
        """A group hit on two nodes gets both quarantined."""
        s = [sig(node="n1"), sig(node="n2", subject="GPU-9"),
             sig("xid", node="n3", node_local=False)]
        step(engine, s)
        assert brief(step(engine, s)) == [("quarantine", "n1", 1), ("quarantine", "n2", 1)]

    def test_skipped_step_does_not_restart_the_after_clock(self, engine: PolicyEngine,
                                                           clock: Clock) -> None:
        """When quarantine has no target, restart_group's 30 s count from the fail-over."""
        s = [sig("xid", node_local=False)]
        assert brief(step(engine, s)) == [("fail_over", "g1", 0)]
        clock.advance(29)
        assert brief(step(engine, s)) == []
        clock.advance(1)
        assert brief(step(engine, s)) == [("restart_group", "g1", 2)]

    def test_notify_targets_the_incident_subject(self, clock: Clock) -> None:
        """Notify names the group (scope group) or the node (scope node)."""
        engine = PolicyEngine(make_policy("""
            - name: a
              when: {fault_classes: [thermal], scope: group}
              then: [{action: notify}]
        """, """
            - name: b
              when: {fault_classes: [thermal], scope: node}
              then: [{action: notify}]
        """), clock)
        ev = engine.evaluate([sig("thermal", "warning")], VIEW)
        assert brief(ev) == [("notify", "g1", 0), ("notify", "n1", 0)]

    def test_node_local_is_carried_on_the_decision(self, engine: PolicyEngine) -> None:
        """Decisions say whether the cause sits on a node (restart must avoid it)."""
        (local,) = engine.evaluate([sig()], VIEW).decisions
        (remote,) = engine.evaluate([sig(groups=("g3",), node_local=False)], VIEW).decisions
        assert (local.node_local, remote.node_local) == (True, False)


class TestClosing:
    def test_close_recovers_and_lifts_what_the_incident_did(self, engine: PolicyEngine,
                                                            clock: Clock) -> None:
        """No matching signal left: recover each group it failed over, unquarantine each
        node it quarantined (lift_quarantine), then the incident is gone."""
        s = [sig()]
        step(engine, s)
        step(engine, s)
        ev = step(engine, [])
        assert brief(ev) == [("recover", "g1", -1), ("unquarantine", "n1", -1)]
        assert {d.incident for d in ev.decisions} == {"gpu-lost/group/g1"}
        assert engine.incidents() == []
        assert brief(step(engine, [])) == []

    def test_a_group_restarted_elsewhere_is_recovered_but_its_sick_node_stays_quarantined(
            self, engine: PolicyEngine, clock: Clock) -> None:
        """The group's incident closes when its restart moves it off the sick node (the
        node's finding maps to no group any more): the group goes back to traffic, but the
        quarantine is lifted only once the node's own finding clears. Found by
        `gpu-supervisor simulate`: the node was released the moment the group's pods were
        deleted, and the recreated group landed on it again."""
        step(engine, [sig()])
        step(engine, [sig()])
        clock.advance(30)
        assert brief(step(engine, [sig()])) == [("restart_group", "g1", 2)]
        moved = [sig(groups=())]  # the group left n1; XID still reported by n1's agent
        assert brief(step(engine, moved)) == [("recover", "g1", -1)]
        assert brief(step(engine, moved)) == []
        assert [i["id"] for i in engine.incidents()] == ["gpu-lost/group/g1"]
        ev = step(engine, [])  # the node repaired: its finding clears
        assert brief(ev) == [("unquarantine", "n1", -1)]
        assert engine.incidents() == []

    def test_no_unquarantine_unless_the_rule_lifts(self, clock: Clock) -> None:
        """Without lift_quarantine the node stays quarantined for a person to return."""
        engine = PolicyEngine(make_policy(GPU_LOST.replace("lift_quarantine: true",
                                                           "lift_quarantine: false")), clock)
        step(engine, [sig()])
        step(engine, [sig()])
        assert brief(step(engine, [])) == [("recover", "g1", -1)]
        assert engine.incidents() == []

    def test_any_matching_signal_keeps_it_open_regardless_of_for(self, clock: Clock) -> None:
        """Closing ignores `for`: a matching finding younger than `for` keeps it open."""
        engine = PolicyEngine(make_policy("""
            - name: r
              when: {fault_classes: [gpu_lost, xid], for: 10s}
              then: [{action: fail_over}]
        """), clock)
        assert brief(step(engine, [sig(since=T0 - 10)])) == [("fail_over", "g1", 0)]
        fresh = sig("xid", since=T0)  # a different finding, seen just now
        assert brief(step(engine, [fresh])) == []
        assert [i["state"] for i in engine.incidents()] == ["open"]
        assert brief(step(engine, [])) == [("recover", "g1", -1)]

    def test_below_severity_does_not_keep_it_open(self, engine: PolicyEngine) -> None:
        """A finding that no longer matches (severity dropped) closes the incident."""
        step(engine, [sig()])
        assert brief(step(engine, [sig(severity="warning")])) == [("recover", "g1", -1)]

    def test_closing_while_a_step_is_in_flight(self, engine: PolicyEngine) -> None:
        """A fail-over confirmed after its incident closed is still undone."""
        pending = engine.evaluate([sig()], VIEW)
        assert brief(step(engine, [])) == []  # closed; the fail-over is still out
        settle(engine, pending)
        assert brief(step(engine, [])) == [("recover", "g1", -1)]
        assert engine.incidents() == []

    def test_closing_drops_steps_not_yet_taken(self, engine: PolicyEngine) -> None:
        """A closed incident decides no further steps of its ladder."""
        step(engine, [sig()])
        ev = step(engine, [])
        assert ("quarantine", "n1", 1) not in brief(ev)

    def test_failed_recover_is_decided_again(self, engine: PolicyEngine) -> None:
        """A recover that failed is returned again on the next evaluation."""
        step(engine, [sig("xid", node_local=False)])
        assert brief(step(engine, [], ok=False)) == [("recover", "g1", -1)]
        assert brief(step(engine, [])) == [("recover", "g1", -1)]
        assert engine.incidents() == []

    def test_signal_back_before_anything_was_released_resumes(
            self, clock: Clock) -> None:
        """If the finding returns while the recover is still held back, the incident simply
        goes on: no new fail-over, no recover, the ladder continues."""
        engine = PolicyEngine(make_policy(breaker="{max_actions: 2, window: 5m}"), clock)
        s = [sig()]
        step(engine, s)
        step(engine, s)
        clock.advance(30)
        assert refused(step(engine, s)) == [("restart_group", "g1", "breaker")]
        assert refused(step(engine, [])) == [("recover", "g1", "breaker"),
                                            ("unquarantine", "n1", "breaker")]
        assert refused(step(engine, s)) == [("restart_group", "g1", "breaker")]
        engine.reset_breaker()
        assert brief(step(engine, s)) == [("restart_group", "g1", 2)]

    def test_signal_back_after_release_starts_a_fresh_incident(
            self, engine: PolicyEngine, clock: Clock) -> None:
        """Once the group was put back, a returning fault is a new incident from step 0
        (subject to the cooldown of the old fail-over)."""
        engine.replace_policy(make_policy(extra="cooldown: 0s"))
        step(engine, [sig("xid", node_local=False)])
        assert brief(step(engine, [])) == [("recover", "g1", -1)]
        assert brief(step(engine, [sig("xid", node_local=False)])) == [
            ("fail_over", "g1", 0)]

    def test_recover_in_flight_finishes_before_a_new_incident(
            self, engine: PolicyEngine) -> None:
        """While a recover is out, the returning fault waits for it; then starts afresh."""
        engine.replace_policy(make_policy(extra="cooldown: 0s"))
        s = [sig("xid", node_local=False)]
        step(engine, s)
        recover = engine.evaluate([], VIEW)
        assert brief(recover) == [("recover", "g1", -1)]
        assert brief(engine.evaluate(s, VIEW)) == []
        settle(engine, recover)
        assert brief(engine.evaluate(s, VIEW)) == [("fail_over", "g1", 0)]


class TestSharedTargets:
    TWO_RULES = (GPU_LOST, """
        - name: down
          when: {fault_classes: [node_down], scope: group}
          then: [{action: fail_over}, {action: restart_group}]
    """)

    def test_group_already_out_is_not_failed_over_again(self, clock: Clock) -> None:
        """A second incident wanting a group out that another holds out shares it: no
        second fail-over, no cooldown refusal, and its ladder goes on."""
        engine = PolicyEngine(make_policy(*self.TWO_RULES), clock)
        assert brief(step(engine, [sig()])) == [("fail_over", "g1", 0)]
        ev = step(engine, [sig(), sig("node_down", kind="node", subject="n1")])
        assert (brief(ev), refused(ev)) == (
            [("quarantine", "n1", 1), ("restart_group", "g1", 1)], [])

    def test_same_evaluation_decides_a_target_once(self, clock: Clock) -> None:
        """Two incidents opening together send one fail-over; the other follows it."""
        engine = PolicyEngine(make_policy(*self.TWO_RULES), clock)
        s = [sig(), sig("node_down", kind="node", subject="n1")]
        first = engine.evaluate(s, VIEW)
        assert brief(first) == [("fail_over", "g1", 0)]
        settle(engine, first)
        assert brief(engine.evaluate(s, VIEW)) == [("quarantine", "n1", 1),
                                                   ("restart_group", "g1", 1)]

    def test_recover_waits_for_the_last_holder(self, clock: Clock) -> None:
        """The group goes back in traffic only when every incident holding it has closed."""
        engine = PolicyEngine(make_policy(*self.TWO_RULES), clock)
        down = sig("node_down", kind="node", subject="n1")
        step(engine, [sig(), down])
        step(engine, [sig(), down])
        assert brief(step(engine, [down])) == [("unquarantine", "n1", -1)]
        assert brief(step(engine, [])) == [("recover", "g1", -1)]

    def test_incident_closing_hands_its_group_to_one_opening(self, clock: Clock) -> None:
        """When one fault gives way to another in the same evaluation, the group stays out:
        no recover, no second fail-over, and the new ladder goes on."""
        engine = PolicyEngine(make_policy(*self.TWO_RULES), clock)
        step(engine, [sig()])
        ev = step(engine, [sig("node_down", kind="node", subject="n1")])
        assert (brief(ev), refused(ev)) == ([("restart_group", "g1", 1)], [])
        assert brief(step(engine, [])) == [("recover", "g1", -1)]

    def test_unquarantine_waits_while_another_incident_holds_the_node(
            self, clock: Clock) -> None:
        """A node another open incident still wants quarantined stays quarantined."""
        engine = PolicyEngine(make_policy(GPU_LOST, """
            - name: hot
              when: {fault_classes: [thermal], scope: node}
              then: [{action: quarantine}]
              lift_quarantine: true
        """), clock)
        hot = sig("thermal", "warning", subject="GPU-2")
        step(engine, [sig(), hot])
        step(engine, [sig(), hot])
        assert brief(step(engine, [hot])) == [("recover", "g1", -1)]
        assert brief(step(engine, [])) == [("unquarantine", "n1", -1)]


class TestCooldown:
    RESTARTS = ("""
        - name: a
          when: {fault_classes: [collective_hang]}
          then: [{action: restart_group}]
    """, """
        - name: b
          when: {fault_classes: [engine_hang]}
          then: [{action: restart_group}]
          cooldown: 1m
    """)

    def test_same_action_on_same_target_is_refused_during_cooldown(self,
                                                                   clock: Clock) -> None:
        """After a confirmed restart of g1, another restart of g1 (from any incident) is
        refused with why=cooldown until the cooldown has passed."""
        engine = PolicyEngine(make_policy(*self.RESTARTS, extra="cooldown: 10m"), clock)
        hang = sig("collective_hang", node=None, node_local=False)
        assert brief(step(engine, [hang])) == [("restart_group", "g1", 0)]
        other = sig("engine_hang", node=None, node_local=False)
        ev = step(engine, [hang, other])
        assert (brief(ev), refused(ev)) == ([], [("restart_group", "g1", "cooldown")])
        clock.advance(599)
        assert refused(step(engine, [hang, other])) == [("restart_group", "g1", "cooldown")]
        clock.advance(1)
        assert brief(step(engine, [hang, other])) == [("restart_group", "g1", 0)]

    def test_failing_over_a_sick_group_ignores_cooldown(self, clock: Clock) -> None:
        """A sick group whose fault comes back inside the cooldown is failed over again at
        once; a healthy group is still held back by it."""
        engine = PolicyEngine(make_policy(GPU_LOST, extra="cooldown: 10m"), clock)
        assert brief(step(engine, [sig()])) == [("fail_over", "g1", 0)]
        step(engine, [])  # fault clears: recover
        clock.advance(60)
        assert brief(step(engine, [sig()])) == [("fail_over", "g1", 0)]
        step(engine, [])
        clock.advance(60)
        healthy = view(("g1", "m", True, ("n1",)), ("g2", "m", True, ("n1",)),
                       ("g3", "m", True, ("n2",)), ("g4", "m", True, ("n3",)))
        ev = step(engine, [sig()], healthy)
        assert refused(ev) == [("fail_over", "g1", "cooldown")]

    def test_rule_cooldown_overrides_the_default(self, clock: Clock) -> None:
        """The cooldown is that of the rule whose action was confirmed."""
        engine = PolicyEngine(make_policy(*self.RESTARTS, extra="cooldown: 10m"), clock)
        b = sig("engine_hang", node=None, node_local=False)
        step(engine, [b])
        a = sig("collective_hang", node=None, node_local=False)
        clock.advance(59)
        assert refused(step(engine, [a, b])) == [("restart_group", "g1", "cooldown")]
        clock.advance(1)
        assert brief(step(engine, [a, b])) == [("restart_group", "g1", 0)]

    @pytest.mark.parametrize(
        ("first", "second", "why"),
        [
            (("restart_group", "g1"), ("restart_group", "g1"), "cooldown"),
            (("restart_group", "g1"), ("restart_group", "g3"), None),  # other target
            (("restart_group", "g1"), ("fail_over", "g1"), None),  # other action
            (("quarantine", "n1"), ("quarantine", "n1"), "cooldown"),
            (("notify", "g1"), ("notify", "g1"), None),  # exempt
        ],
    )
    def test_cooldown_is_per_action_and_target(self, clock: Clock, first: tuple[str, str],
                                              second: tuple[str, str],
                                              why: str | None) -> None:
        """Cooldown keys on (action, target) and spares notify."""
        def rule(name: str, fc: str, action: str) -> str:
            return f"""
                - name: {name}
                  when: {{fault_classes: [{fc}], scope: {"node" if action == "quarantine"
                                                           else "group"}}}
                  then: [{{action: {action}}}]
                  lift_quarantine: false
            """
        engine = PolicyEngine(make_policy(rule("a", "xid", first[0]),
                                          rule("b", "thermal", second[0])), clock)
        a = sig("xid", groups=(first[1],), node=first[1] if first[1].startswith("n") else "n1")
        assert brief(step(engine, [a])) == [(first[0], first[1], 0)]
        step(engine, [])  # the first incident closes (its quarantine is not lifted)
        b = sig("thermal", "warning", groups=(second[1],),
                node=second[1] if second[1].startswith("n") else "n1")
        ev = step(engine, [b])
        if why is None:
            assert (brief(ev), refused(ev)) == ([(second[0], second[1], 0)], [])
        else:
            assert (brief(ev), refused(ev)) == ([], [(second[0], second[1], why)])

    def test_failed_action_starts_no_cooldown(self, clock: Clock) -> None:
        """Only a confirmed-ok action starts a cooldown."""
        engine = PolicyEngine(make_policy(*self.RESTARTS), clock)
        hang = sig("collective_hang", node=None, node_local=False)
        step(engine, [hang], ok=False)
        assert brief(step(engine, [hang])) == [("restart_group", "g1", 0)]

    def test_recover_is_exempt(self, clock: Clock) -> None:
        """Recover and unquarantine follow the incident's close, never a cooldown."""
        engine = PolicyEngine(make_policy(extra="cooldown: 1h"), clock)
        for _ in range(2):
            step(engine, [sig()])
            step(engine, [sig()])
            ev = step(engine, [])
            assert brief(ev) == [("recover", "g1", -1), ("unquarantine", "n1", -1)]
            clock.advance(3600)


class TestBudget:
    RULES = ("""
        - name: out
          when: {fault_classes: [gpu_lost]}
          then: [{action: fail_over}]
    """, """
        - name: restart
          when: {fault_classes: [collective_hang]}
          then: [{action: restart_group}]
    """)

    def engine(self, clock: Clock, limit: int = 1) -> PolicyEngine:
        return PolicyEngine(make_policy(*self.RULES, budgets=f"{{max_groups_disrupted: "
                                                             f"{limit}, min_healthy_groups: 0}}"),
                            clock)

    @pytest.mark.parametrize(
        ("fault_class", "healthy", "why"),
        [
            ("gpu_lost", False, None),  # failing over a sick group: always allowed
            ("gpu_lost", True, "budget"),
            ("collective_hang", False, "budget"),  # a restart is never exempt
            ("collective_hang", True, "budget"),
        ],
    )
    def test_second_disruption_against_a_budget_of_one(self, clock: Clock, fault_class: str,
                                                       healthy: bool, why: str | None) -> None:
        """With g1 already failed over and max_groups_disrupted 1, a second group may only
        be failed over if it is already unhealthy."""
        engine = self.engine(clock)
        step(engine, [sig()])
        v = view(("g1", "m", False, ("n1",)), ("g2", "m", healthy, ("n2",)))
        ev = step(engine, [sig(), sig(fault_class, groups=("g2",), node="n2")], v)
        action = "fail_over" if fault_class == "gpu_lost" else "restart_group"
        if why is None:
            assert (brief(ev), refused(ev)) == ([(action, "g2", 0)], [])
        else:
            assert (brief(ev), refused(ev)) == ([], [(action, "g2", why)])

    def test_acting_again_on_a_disrupted_group_costs_nothing(self, clock: Clock) -> None:
        """Restarting the group already failed over does not add to the count."""
        engine = self.engine(clock)
        step(engine, [sig()])
        hang = sig("collective_hang", node=None, node_local=False)
        assert brief(step(engine, [sig(), hang])) == [("restart_group", "g1", 0)]

    def test_in_flight_and_same_evaluation_decisions_count(self, clock: Clock) -> None:
        """The budget counts what is decided but not yet confirmed."""
        engine = self.engine(clock)
        v = view(("g1", "m", True, ("n1",)), ("g2", "m", True, ("n2",)))
        hang = [sig("collective_hang", groups=("g1", "g2"), node=None, node_local=False)]
        ev = engine.evaluate(hang, v)
        assert (brief(ev), refused(ev)) == ([("restart_group", "g1", 0)],
                                            [("restart_group", "g2", "budget")])
        assert refused(engine.evaluate(hang, v)) == [("restart_group", "g2", "budget")]

    def test_budget_frees_when_the_incident_lets_go(self, clock: Clock) -> None:
        """A group counts until its incident has closed and put it back in traffic."""
        engine = self.engine(clock)
        v = view(("g1", "m", True, ("n1",)), ("g2", "m", True, ("n2",)))
        g1 = sig(groups=("g1",))
        g2 = sig(groups=("g2",), node="n2")
        step(engine, [g1], v)
        assert refused(step(engine, [g1, g2], v)) == [("fail_over", "g2", "budget")]
        recover = engine.evaluate([g2], v)  # g1's incident closes; recover not confirmed
        assert (brief(recover), refused(recover)) == (
            [("recover", "g1", -1)], [("fail_over", "g2", "budget")])
        settle(engine, recover)
        assert brief(step(engine, [g2], v)) == [("fail_over", "g2", 0)]

    def test_restart_counts_while_its_incident_is_open(self, clock: Clock) -> None:
        """A restarted group stays counted until its incident closes."""
        engine = self.engine(clock)
        v = view(("g1", "m", True, ("n1",)), ("g2", "m", True, ("n2",)))
        h1 = sig("collective_hang", groups=("g1",), node=None, node_local=False)
        h2 = sig("collective_hang", groups=("g2",), node=None, node_local=False)
        step(engine, [h1], v)
        assert refused(step(engine, [h1, h2], v)) == [("restart_group", "g2", "budget")]
        assert brief(step(engine, [h2], v)) == [("restart_group", "g2", 0)]

    def test_quarantine_and_notify_are_not_disruptions(self, clock: Clock) -> None:
        """Quarantine does not evict and notify does nothing: neither uses the budget."""
        engine = PolicyEngine(make_policy("""
            - name: r
              when: {fault_classes: [thermal], scope: node}
              then: [{action: quarantine}, {action: notify}]
        """, budgets="{max_groups_disrupted: 1, min_healthy_groups: 5}"), clock)
        signals = [sig("thermal", "warning", node=n) for n in ("n1", "n2", "n3")]
        assert [a for a, _, _ in brief(step(engine, signals))] == ["quarantine"] * 3
        assert [a for a, _, _ in brief(step(engine, signals))] == ["notify"] * 3


class TestFloor:
    RULE = """
        - name: r
          when: {fault_classes: [thermal], scope: node}
          then: [{action: fail_over}]
    """

    @pytest.mark.parametrize(
        ("healthy_groups", "minimum", "by_model", "expected"),
        [
            # g2 (healthy, on n1) would leave g3, g4: 2 healthy groups.
            (("g2", "g3", "g4"), 2, "{}", "fail_over"),
            (("g2", "g3", "g4"), 3, "{}", "floor"),
            (("g2", "g3", "g4"), 1, "{m: 3}", "floor"),  # per-model override
            (("g2", "g3", "g4"), 3, "{m: 2}", "fail_over"),
            (("g2", "g3"), 2, "{}", "floor"),
            (("g2",), 0, "{}", "fail_over"),
        ],
    )
    def test_taking_a_healthy_group_out(self, clock: Clock, healthy_groups: tuple[str, ...],
                                        minimum: int, by_model: str, expected: str) -> None:
        """A healthy group is only taken out if its model keeps min_healthy_groups healthy
        groups (overridable per model); the sick g1 on the same node always goes."""
        engine = PolicyEngine(make_policy(self.RULE, budgets=(
            f"{{max_groups_disrupted: 100, min_healthy_groups: {minimum}, "
            f"min_healthy_groups_by_model: {by_model}}}")), clock)
        v = view(*((k, "m", k in healthy_groups, n) for k, n in
                   (("g1", ("n1",)), ("g2", ("n1",)), ("g3", ("n2",)), ("g4", ("n3",)))))
        ev = engine.evaluate([sig("thermal", "warning")], v)
        assert ("fail_over", "g1", 0) in brief(ev)
        if expected == "floor":
            assert refused(ev) == [("fail_over", "g2", "floor")]
        else:
            assert ("fail_over", "g2", 0) in brief(ev)

    def test_disrupted_groups_do_not_count_as_healthy(self, clock: Clock) -> None:
        """Groups we already took out are not healthy capacity even if the view says so."""
        engine = PolicyEngine(make_policy(self.RULE, budgets=(
            "{max_groups_disrupted: 100, min_healthy_groups: 1}")), clock)
        v = view(("g2", "m", True, ("n1",)), ("g3", "m", True, ("n2",)))
        n1, n2 = (sig("thermal", "warning", node=n, groups=()) for n in ("n1", "n2"))
        assert brief(step(engine, [n1], v)) == [("fail_over", "g2", 0)]
        ev = engine.evaluate([n1, n2], v)
        assert refused(ev) == [("fail_over", "g3", "floor")]

    def test_floor_is_per_model(self, clock: Clock) -> None:
        """Only the model of the group taken out matters."""
        engine = PolicyEngine(make_policy(self.RULE, budgets=(
            "{max_groups_disrupted: 100, min_healthy_groups: 1}")), clock)
        v = view(("a1", "a", True, ("n1",)), ("b1", "b", True, ("n2",)),
                 ("b2", "b", True, ("n3",)))
        ev = engine.evaluate([sig("thermal", "warning", node="n1", groups=()),
                              sig("thermal", "warning", node="n2", groups=())], v)
        assert (brief(ev), refused(ev)) == ([("fail_over", "b1", 0)],
                                            [("fail_over", "a1", "floor")])


class TestCircuitBreaker:
    def engine(self, clock: Clock, rules: tuple[str, ...] = (GPU_LOST,)) -> PolicyEngine:
        return PolicyEngine(make_policy(*rules, breaker="{max_actions: 3, window: 5m}"),
                            clock)

    def test_the_action_beyond_the_limit_opens_the_breaker(self, clock: Clock) -> None:
        """Three actions fit in the window; the fourth is refused and opens the breaker,
        which then refuses everything until reset."""
        engine = self.engine(clock)
        s = [sig(groups=("g1", "g2"))]
        assert brief(step(engine, s)) == [("fail_over", "g1", 0), ("fail_over", "g2", 0)]
        assert brief(step(engine, s)) == [("quarantine", "n1", 1)]  # g2's shares it
        assert not engine.breaker_open
        clock.advance(30)
        ev = step(engine, s)
        assert (brief(ev), refused(ev)) == ([], [("restart_group", "g1", "breaker")])
        assert engine.breaker_open
        assert "4 actions within 300s would exceed max_actions 3" in ev.refusals[0].detail
        clock.advance(30)
        assert refused(step(engine, s)) == [("restart_group", "g1", "breaker"),
                                            ("restart_group", "g2", "breaker")]

    def test_a_storm_in_one_evaluation_is_cut_at_the_limit(self, clock: Clock) -> None:
        """Decisions in flight count: a burst of ten fail-overs sends three."""
        engine = self.engine(clock)
        groups = [f"g{i}" for i in range(10)]
        ev = engine.evaluate([sig(groups=groups)], View({}))
        assert [t for _, t, _ in brief(ev)] == groups[:3]
        assert [why for _, _, why in refused(ev)] == ["breaker"] * 7
        assert engine.breaker_open

    def test_open_breaker_refuses_recover_but_not_notify(self, clock: Clock) -> None:
        """While open: recover and unquarantine wait too; notify is no remediation and
        still goes out (it is how people hear about it)."""
        engine = self.engine(clock, (GPU_LOST, """
            - name: tell
              when: {fault_classes: [thermal], scope: node}
              then: [{action: notify}]
        """))
        step(engine, [sig(groups=("g1", "g2", "g3", "g4"))])
        assert engine.breaker_open
        ev = step(engine, [sig("thermal", "warning")])
        assert brief(ev) == [("notify", "n1", 0)]
        assert refused(ev) == [("recover", "g1", "breaker"), ("recover", "g2", "breaker"),
                               ("recover", "g3", "breaker")]

    def test_reset_lets_refused_decisions_through(self, clock: Clock) -> None:
        """Refused decisions were never marked done: after reset they are returned."""
        engine = self.engine(clock)
        s = [sig(groups=("g1", "g2", "g3", "g4"))]
        assert len(step(engine, s).decisions) == 3
        engine.reset_breaker()
        assert not engine.breaker_open
        assert ("fail_over", "g4", 0) in brief(step(engine, s))

    def test_window_slides(self, clock: Clock) -> None:
        """Actions older than the window no longer count."""
        engine = self.engine(clock)
        step(engine, [sig(groups=("g1", "g2", "g3"))])
        clock.advance(300)
        assert ("fail_over", "g4", 0) in brief(step(engine, [sig(groups=("g1", "g2", "g3",
                                                                         "g4"))]))
        assert not engine.breaker_open

    def test_failed_actions_and_exempt_actions_do_not_count(self, clock: Clock) -> None:
        """Only confirmed-ok fail_over/restart/quarantine/degrade/restore count: failures,
        notify and recover do not."""
        engine = PolicyEngine(make_policy("""
            - name: r
              when: {fault_classes: [xid], scope: group}
              then: [{action: notify}, {action: fail_over}]
        """, breaker="{max_actions: 3, window: 5m}", extra="cooldown: 0s"), clock)
        s = [sig("xid", node_local=False)]
        for _ in range(5):  # two counted actions too many, if any of these counted
            assert brief(step(engine, s)) == [("notify", "g1", 0)]
            assert brief(step(engine, s, ok=False)) == [("fail_over", "g1", 1)]
            assert brief(step(engine, s)) == [("fail_over", "g1", 1)]
            assert brief(step(engine, [])) == [("recover", "g1", -1)]
            clock.advance(100)
        assert not engine.breaker_open


class TestDryRun:
    def test_dry_run_decisions_are_marked_and_not_repeated(self, clock: Clock) -> None:
        """In dry-run every decision says so; confirming it marks it done all the same."""
        engine = PolicyEngine(make_policy(extra="dry_run: true"), clock)
        seen: list[Decision] = []
        for _ in range(10):
            seen += step(engine, [sig()]).decisions
            clock.advance(30)
        seen += step(engine, []).decisions
        assert [(str(d.action), d.dry_run) for d in seen] == [
            ("fail_over", True), ("quarantine", True), ("restart_group", True),
            ("recover", True), ("unquarantine", True)]


class TestRefusals:
    def test_refusals_are_reported_on_every_evaluation(self, clock: Clock) -> None:
        """A refused decision comes back as a refusal each time while the reason holds."""
        engine = PolicyEngine(make_policy(
            budgets="{max_groups_disrupted: 100, min_healthy_groups: 1}"), clock)
        v = view(("g1", "m", True, ("n1",)))
        for _ in range(3):
            ev = step(engine, [sig()], v)
            assert refused(ev) == [("fail_over", "g1", "floor")]
            assert ev.refusals[0].detail == ("taking healthy group g1 out would leave m with "
                                             "0 healthy group(s), fewer than "
                                             "min_healthy_groups 1")
        v = view(("g1", "m", True, ("n1",)), ("g2", "m", True, ("n2",)))
        assert brief(step(engine, [sig()], v)) == [("fail_over", "g1", 0)]

    def test_refusal_order_breaker_then_cooldown_then_budget_then_floor(
            self, clock: Clock) -> None:
        """When several rules would refuse, the first of breaker, cooldown, budget, floor
        is reported."""
        engine = PolicyEngine(make_policy("""
            - name: r
              when: {fault_classes: [collective_hang]}
              then: [{action: restart_group}]
        """, budgets="{max_groups_disrupted: 1, min_healthy_groups: 9}",
            breaker="{max_actions: 3, window: 1h}"), clock)
        v = view(*((f"h{i}", "m", True, ()) for i in range(10)))

        def hang(group: str) -> Signal:
            return sig("collective_hang", groups=(group,), node=None, node_local=False)

        assert brief(step(engine, [hang("h0")], v)) == [("restart_group", "h0", 0)]
        # h1: over budget (h0 is restarting) and under the floor (9 healthy left - 1 < 9)
        assert refused(step(engine, [hang("h0"), hang("h1")], v)) == [
            ("restart_group", "h1", "budget")]
        assert brief(step(engine, [hang("h1")], v)) == [("restart_group", "h1", 0)]
        # h0 again: in cooldown and over budget (h1 is restarting)
        assert refused(step(engine, [hang("h1"), hang("h0")], v)) == [
            ("restart_group", "h0", "cooldown")]
        step(engine, [], v)
        assert brief(step(engine, [hang("h2")], v)) == [("restart_group", "h2", 0)]
        step(engine, [], v)
        assert refused(step(engine, [hang("h3")], v)) == [("restart_group", "h3", "breaker")]
        # h0 again: in cooldown, but the open breaker comes first
        assert refused(step(engine, [hang("h0")], v)) == [("restart_group", "h0", "breaker")]


class TestDegrade:
    DEGRADE = "degrade: [{model: big, fallback: small, floor: 2, restore_after: 5m}]"

    def engine(self, clock: Clock, breaker: str = "{max_actions: 1000, window: 5m}"
               ) -> PolicyEngine:
        return PolicyEngine(make_policy(extra=self.DEGRADE, breaker=breaker), clock)

    @staticmethod
    def big(healthy: int, total: int = 3) -> View:
        return view(*((f"b{i}", "big", i < healthy, (f"n{i}",)) for i in range(total)),
                    ("s0", "small", True, ("s",)))

    def test_below_floor_degrades_once(self, clock: Clock) -> None:
        """Fewer healthy primary groups than the floor: one degrade, not repeated while
        the count of healthy groups stays what it was."""
        engine = self.engine(clock)
        assert brief(step(engine, [], self.big(2))) == []
        ev = step(engine, [], self.big(1))
        assert brief(ev) == [("degrade", "big", -1)]
        assert ev.decisions[0].incident == "degrade/big"
        assert ev.decisions[0].rule == "degrade"
        for _ in range(3):
            assert brief(step(engine, [], self.big(1))) == []

    def test_a_degraded_model_is_degraded_again_when_its_healthy_groups_change(
            self, clock: Clock) -> None:
        """Degraded traffic is shared with the model's healthy groups: when the last one
        fails too, or one comes back before restore_after, degrade is decided again (once
        per change) so the share follows; the restore wait is not restarted by it."""
        engine = self.engine(clock)
        assert brief(step(engine, [], self.big(1))) == [("degrade", "big", -1)]
        ev = step(engine, [], self.big(0))
        assert brief(ev) == [("degrade", "big", -1)]
        assert "0 healthy group(s) now, 1 when" in ev.decisions[0].reason
        assert brief(step(engine, [], self.big(0))) == []
        assert brief(step(engine, [], self.big(2))) == [("degrade", "big", -1)]
        assert brief(step(engine, [], self.big(2))) == []
        clock.advance(300)
        assert brief(step(engine, [], self.big(2))) == [("restore", "big", -1)]

    def test_a_failed_share_again_is_retried_and_the_last_count_kept(
            self, clock: Clock) -> None:
        """A degrade again that failed leaves the traffic shared for the old count: it is
        decided again on the next evaluation."""
        engine = self.engine(clock)
        step(engine, [], self.big(1))
        assert brief(step(engine, [], self.big(0), ok=False)) == [("degrade", "big", -1)]
        assert brief(step(engine, [], self.big(0))) == [("degrade", "big", -1)]
        assert brief(step(engine, [], self.big(0))) == []

    def test_sharing_again_is_not_counted_by_the_breaker_but_held_by_it(
            self, clock: Clock) -> None:
        """A degrade of a model degraded already follows the groups as a recover does: the
        breaker does not count it; an open breaker still refuses it."""
        engine = self.engine(clock, breaker="{max_actions: 1, window: 1h}")
        assert brief(step(engine, [], self.big(1))) == [("degrade", "big", -1)]
        for healthy in (0, 1, 0):
            assert brief(step(engine, [], self.big(healthy))) == [("degrade", "big", -1)]
        assert not engine.breaker_open
        other = View({**self.big(0).groups, "g1": GroupView("g1", "m", True, ("n1",))})
        assert refused(step(engine, [sig()], other)) == [("fail_over", "g1", "breaker")]
        assert refused(step(engine, [], self.big(1))) == [("degrade", "big", "breaker")]

    def test_restore_after_healthy_long_enough(self, clock: Clock) -> None:
        """Back at the floor for restore_after without a dip: restore, once (degrading
        again as the healthy groups change meanwhile does not delay it)."""
        engine = self.engine(clock)
        step(engine, [], self.big(1))
        assert brief(step(engine, [], self.big(2))) == [("degrade", "big", -1)]
        clock.advance(299)
        assert brief(step(engine, [], self.big(3))) == [("degrade", "big", -1)]
        clock.advance(1)
        assert brief(step(engine, [], self.big(2))) == [("restore", "big", -1)]
        clock.advance(600)
        assert brief(step(engine, [], self.big(3))) == []

    def test_a_dip_restarts_the_restore_wait(self, clock: Clock) -> None:
        """Hysteresis: any evaluation below the floor starts the wait again."""
        engine = self.engine(clock)
        step(engine, [], self.big(0))
        step(engine, [], self.big(2))
        clock.advance(200)
        assert "restore" not in str(brief(step(engine, [], self.big(1))))
        clock.advance(1)
        step(engine, [], self.big(2))
        clock.advance(299)
        assert brief(step(engine, [], self.big(2))) == []
        clock.advance(1)
        assert brief(step(engine, [], self.big(2))) == [("restore", "big", -1)]

    def test_unconfirmed_degrade_is_held_and_a_failed_one_retried(self,
                                                                  clock: Clock) -> None:
        """Degrade follows the in-flight rules of every decision."""
        engine = self.engine(clock)
        ev = engine.evaluate([], self.big(1))
        assert brief(ev) == [("degrade", "big", -1)]
        assert brief(engine.evaluate([], self.big(1))) == []
        settle(engine, ev, ok=False)
        assert brief(engine.evaluate([], self.big(1))) == [("degrade", "big", -1)]

    def test_groups_we_take_out_count_against_capacity(self, clock: Clock) -> None:
        """A fail-over decided in the same evaluation lowers capacity at once."""
        engine = self.engine(clock)
        v = view(("b0", "big", True, ("n1",)), ("b1", "big", True, ("n2",)))
        ev = engine.evaluate([sig(groups=("b0",))], v)
        assert brief(ev) == [("fail_over", "b0", 0), ("degrade", "big", -1)]

    def test_degrade_ignores_cooldown_and_floor_but_counts_for_the_breaker(
            self, clock: Clock) -> None:
        """Degrade/restore flip as often as capacity does, but each counts as an action."""
        engine = self.engine(clock, breaker="{max_actions: 3, window: 1h}")
        assert brief(step(engine, [], self.big(0))) == [("degrade", "big", -1)]
        clock.advance(300)
        step(engine, [], self.big(3))
        clock.advance(300)
        assert brief(step(engine, [], self.big(3))) == [("restore", "big", -1)]
        assert brief(step(engine, [], self.big(0))) == [("degrade", "big", -1)]
        clock.advance(300)
        step(engine, [], self.big(3))
        clock.advance(300)
        assert refused(step(engine, [], self.big(3))) == [("restore", "big", "breaker")]

    def test_degraded_model_shows_in_status(self, clock: Clock) -> None:
        """/status lists a degraded model with its fallback."""
        engine = self.engine(clock)
        step(engine, [], self.big(0))
        (entry,) = engine.incidents()
        assert (entry["id"], entry["state"], entry["fallback"]) == (
            "degrade/big", "degraded", "small")


class TestReload:
    def test_replace_policy_keeps_incident_state(self, engine: PolicyEngine,
                                                 clock: Clock) -> None:
        """A reload does not repeat steps already done: the ladder goes on."""
        s = [sig()]
        step(engine, s)
        step(engine, s)
        engine.replace_policy(make_policy(GPU_LOST.replace("after: 30s", "after: 60s")))
        clock.advance(30)
        assert brief(step(engine, s)) == []
        clock.advance(30)
        assert brief(step(engine, s)) == [("restart_group", "g1", 2)]

    def test_removed_rule_drops_its_incidents_quietly(self, clock: Clock) -> None:
        """Incidents of a rule no longer in the policy vanish without recover/unquarantine."""
        engine = PolicyEngine(make_policy(GPU_LOST, """
            - name: tell
              when: {fault_classes: [thermal]}
              then: [{action: notify}]
        """), clock)
        step(engine, [sig()])
        step(engine, [sig()])
        engine.replace_policy(make_policy("""
            - name: tell
              when: {fault_classes: [thermal]}
              then: [{action: notify}]
        """))
        assert engine.incidents() == []
        assert brief(step(engine, [])) == []
        assert brief(step(engine, [sig()])) == []

    def test_rule_changing_scope_drops_its_incidents(self, engine: PolicyEngine) -> None:
        """An incident keyed by group means nothing to a rule now keyed by node: dropped."""
        step(engine, [sig()])
        engine.replace_policy(make_policy(GPU_LOST.replace("scope: group", "scope: node")))
        assert engine.incidents() == []
        ev = step(engine, [sig()])  # a new node incident: every group on n1
        # g2 is new; g1 is sick, and failing a sick group over is exempt from cooldown.
        assert (brief(ev), refused(ev)) == ([("fail_over", "g1", 0), ("fail_over", "g2", 0)],
                                            [])
        assert [i["id"] for i in engine.incidents()] == ["gpu-lost/node/n1"]

    def test_pending_step_is_decided_with_the_new_ladder(self, clock: Clock) -> None:
        """A step that was refused and never sent is decided afresh from the new rule."""
        engine = PolicyEngine(make_policy(
            budgets="{max_groups_disrupted: 100, min_healthy_groups: 1}"), clock)
        v = view(("g1", "m", True, ("n1",)))
        assert refused(step(engine, [sig()], v)) == [("fail_over", "g1", "floor")]
        engine.replace_policy(make_policy("""
            - name: gpu-lost
              when: {fault_classes: [gpu_lost], min_severity: critical}
              then: [{action: notify}]
        """, budgets="{max_groups_disrupted: 100, min_healthy_groups: 1}"))
        assert brief(step(engine, [sig()], v)) == [("notify", "g1", 0)]

    def test_confirmation_after_a_drop_still_counts(self, clock: Clock) -> None:
        """An action carried out for a dropped incident still starts its cooldown."""
        engine = PolicyEngine(make_policy(GPU_LOST, extra="cooldown: 10m"), clock)
        out = engine.evaluate([sig()], VIEW)
        engine.replace_policy(make_policy("""
            - name: other
              when: {fault_classes: [gpu_lost], min_severity: critical}
              then: [{action: fail_over}]
        """))
        settle(engine, out)
        # (g1 healthy now: failing over a *sick* group is exempt from cooldown)
        g1_healthy = view(("g1", "m", True, ("n1",)), ("g2", "m", True, ("n1",)),
                          ("g3", "m", True, ("n2",)), ("g4", "m", True, ("n3",)))
        assert refused(engine.evaluate([sig()], g1_healthy)) == [
            ("fail_over", "g1", "cooldown")]


class TestPersistence:
    def moved(self, engine: PolicyEngine, clock: Clock, policy: Policy | None = None,
              gap: float = 0.0) -> tuple[PolicyEngine, Clock]:
        """The state through JSON into a fresh engine whose monotonic clock started
        elsewhere (another process), ``gap`` seconds of wall-clock time after the save."""
        text = json.dumps(engine.snapshot())
        fresh_clock = Clock(T0 - 900.0, wall_offset=clock.wall() + gap - (T0 - 900.0))
        fresh = PolicyEngine(policy or engine.policy, fresh_clock, fresh_clock.wall)
        fresh.restore(json.loads(text))
        return fresh, fresh_clock

    def test_new_leader_continues_the_ladder(self, engine: PolicyEngine,
                                             clock: Clock) -> None:
        """After snapshot → JSON → restore, step 0 and 1 are not repeated and step 2 still
        waits its 30 s from the confirmation of step 1."""
        s = [sig()]
        step(engine, s)
        step(engine, s)
        clock.advance(10)
        fresh, fresh_clock = self.moved(engine, clock)
        s2 = [sig(since=fresh_clock.t - 10)]
        assert brief(step(fresh, s2)) == []
        fresh_clock.advance(19)
        assert brief(step(fresh, s2)) == []
        fresh_clock.advance(1)
        assert brief(step(fresh, s2)) == [("restart_group", "g1", 2)]
        assert brief(step(fresh, [])) == [("recover", "g1", -1), ("unquarantine", "n1", -1)]

    def test_timers_run_on_across_a_long_gap_since_the_save(self, engine: PolicyEngine,
                                                           clock: Clock) -> None:
        """A snapshot saved 10 s after step 1 and restored 15 s later: step 2's 30 s
        ``after`` ends 5 s after the restore, not 30 s (timers are times, not ages)."""
        s = [sig()]
        step(engine, s)
        step(engine, s)
        clock.advance(10)
        fresh, fresh_clock = self.moved(engine, clock, gap=15)
        s2 = [sig(since=fresh_clock.t - 25)]
        fresh_clock.advance(4)
        assert brief(step(fresh, s2)) == []
        fresh_clock.advance(1)
        assert brief(step(fresh, s2)) == [("restart_group", "g1", 2)]

    def test_cooldown_ends_on_time_after_a_long_gap(self, engine: PolicyEngine,
                                                    clock: Clock) -> None:
        """A 10-minute cooldown restored 9 minutes after its save has one minute left."""
        step(engine, [sig()])
        step(engine, [], VIEW)  # recovered: the next fail-over of g1 is a healthy group's
        fresh, fresh_clock = self.moved(engine, clock, gap=540)
        healthy = view(("g1", "m", True, ("n1",)), ("g2", "m", True, ("n1",)))
        assert refused(fresh.evaluate([sig(since=fresh_clock.t)], healthy)) == [
            ("fail_over", "g1", "cooldown")]
        fresh_clock.advance(60)
        assert brief(fresh.evaluate([sig(since=fresh_clock.t)], healthy)) == [
            ("fail_over", "g1", 0)]

    def test_in_flight_decision_is_decided_again_after_restore(
            self, engine: PolicyEngine, clock: Clock) -> None:
        """A decision out but unconfirmed when the snapshot was taken is pending for the
        new leader (the action layer's idempotence covers a repeat)."""
        assert brief(engine.evaluate([sig()], VIEW)) == [("fail_over", "g1", 0)]
        fresh, fresh_clock = self.moved(engine, clock)
        assert brief(fresh.evaluate([sig(since=fresh_clock.t)], VIEW)) == [
            ("fail_over", "g1", 0)]

    def test_closing_incident_with_a_fail_over_in_flight_recovers(
            self, engine: PolicyEngine, clock: Clock) -> None:
        """If the old leader may have failed a group over just as the incident closed, the
        new one puts it back rather than leaving it out of traffic."""
        engine.evaluate([sig()], VIEW)
        engine.evaluate([], VIEW)
        fresh, _ = self.moved(engine, clock)
        assert brief(fresh.evaluate([], VIEW)) == [("recover", "g1", -1)]

    def test_cooldowns_breaker_and_degrade_survive(self, clock: Clock) -> None:
        """Cooldown remaining, the breaker's state and degrade state move across."""
        policy = make_policy(GPU_LOST, breaker="{max_actions: 2, window: 5m}",
                             extra="cooldown: 10m\n" + TestDegrade.DEGRADE)
        engine = PolicyEngine(policy, clock, clock.wall)
        v = view(("g1", "m", False, ("n1",)), ("g2", "m", False, ("n2",)),
                 ("b0", "big", False, ("n9",)))
        ev = step(engine, [sig()], v)
        assert brief(ev) == [("fail_over", "g1", 0), ("degrade", "big", -1)]
        assert brief(step(engine, [], v)) == [("recover", "g1", -1)]
        assert refused(step(engine, [sig(groups=("g2",), node="n2")], v)) == [
            ("fail_over", "g2", "breaker")]
        clock.advance(60)
        fresh, fresh_clock = self.moved(engine, clock)
        assert fresh.breaker_open
        assert refused(fresh.evaluate([sig(since=fresh_clock.t)], v)) == [
            ("fail_over", "g1", "breaker")]
        fresh.reset_breaker()
        g1_healthy = view(("g1", "m", True, ("n1",)), ("g2", "m", False, ("n2",)),
                          ("b0", "big", False, ("n9",)))
        assert refused(fresh.evaluate([sig(since=fresh_clock.t)], g1_healthy)) == [
            ("fail_over", "g1", "cooldown")]
        fresh_clock.advance(540)
        ev = fresh.evaluate([sig(since=fresh_clock.t)], v)
        assert brief(ev) == [("fail_over", "g1", 0)]  # degraded already: no second degrade

    def test_a_degrade_snapshot_from_before_sharing_shares_the_traffic_once(
            self, clock: Clock) -> None:
        """A snapshot whose degrade entry does not say which count the traffic was shared
        for (written before sharing): the new leader decides degrade once to share it, then
        keeps the count across the next move."""
        policy = make_policy(extra=TestDegrade.DEGRADE)
        engine = PolicyEngine(policy, clock, clock.wall)
        engine.restore({"version": 2, "incidents": [], "cooldowns": [],
                        "breaker": {"opened_at": None, "detail": "", "action_times": []},
                        "degrade": [{"model": "big", "degraded": True,
                                     "changed_at": WALL0 - 10, "healthy_since": None}]})
        one = TestDegrade.big(1)
        assert brief(step(engine, [], one)) == [("degrade", "big", -1)]
        assert brief(step(engine, [], one)) == []
        fresh, _ = self.moved(engine, clock, policy)
        assert brief(fresh.evaluate([], one)) == []

    def test_snapshot_is_plain_json_with_wall_clock_times(self, engine: PolicyEngine,
                                                          clock: Clock) -> None:
        """The snapshot holds wall-clock times, not this process's monotonic times, and an
        unchanged state snapshots to the same JSON (so the controller saves only changes)."""
        step(engine, [sig()])
        clock.advance(42)
        snap = engine.snapshot()
        assert json.loads(json.dumps(snap)) == snap
        (inc,) = snap["incidents"]
        assert inc["id"] == "gpu-lost/group/g1"
        assert inc["opened_at"] == WALL0
        assert inc["history"] == [{"step": 0, "action": "fail_over", "target": "g1",
                                   "at": WALL0, "shared": False}]
        assert snap["cooldowns"] == [{"action": "fail_over", "target": "g1",
                                      "until": WALL0 + 600}]
        clock.advance(1)
        assert engine.snapshot() == snap

    def test_version_1_snapshot_reads_as_saved_now(self, clock: Clock) -> None:
        """Snapshots of earlier controllers (ages) still load; their timers restart."""
        engine = PolicyEngine(make_policy(), clock, clock.wall)
        engine.restore({"version": 1, "incidents": [{
            "id": "gpu-lost/group/g1", "rule": "gpu-lost", "scope": "group", "scope_id": "g1",
            "opened_age": 5.0, "ready_age": 5.0, "closed_age": None, "step": 2,
            "targets": None, "step_done_age": None, "node_local": True,
            "released_any": False, "failed_over": ["g1"], "quarantined": ["n1"],
            "restarted": [], "history": []}],
            "cooldowns": [], "breaker": {"opened_age": None, "detail": "",
                                         "action_ages": []}, "degrade": []})
        s = [sig(since=clock.t - 5)]
        clock.advance(24)
        assert brief(step(engine, s)) == []
        clock.advance(1)
        assert brief(step(engine, s)) == [("restart_group", "g1", 2)]

    def test_restore_drops_incidents_of_unknown_rules(self, engine: PolicyEngine,
                                                      clock: Clock) -> None:
        """A new leader with a different policy forgets incidents it has no rule for."""
        step(engine, [sig()])
        fresh, _ = self.moved(engine, clock, make_policy("""
            - name: other
              when: {fault_classes: [thermal]}
              then: [{action: notify}]
        """))
        assert fresh.incidents() == []

    @pytest.mark.parametrize("bad", [{}, {"version": 99}, {"version": 1, "incidents": 5},
                                     {"version": 1, "incidents": [{"id": "x"}],
                                      "cooldowns": [], "breaker": {}, "degrade": []}])
    def test_malformed_snapshot_is_refused_whole(self, engine: PolicyEngine,
                                                 bad: dict[str, object]) -> None:
        """A broken snapshot raises ValueError and leaves the engine as it was."""
        step(engine, [sig()])
        with pytest.raises(ValueError, match="not a policy engine snapshot"):
            engine.restore(bad)
        assert [i["id"] for i in engine.incidents()] == ["gpu-lost/group/g1"]


class TestStatus:
    def test_incidents_describe_progress(self, engine: PolicyEngine, clock: Clock) -> None:
        """/status shows each incident's step, what it waits for and what it has done."""
        step(engine, [sig()])
        step(engine, [sig()])
        clock.advance(10)
        (inc,) = engine.incidents()
        assert (inc["id"], inc["state"], inc["step"], inc["steps"]) == (
            "gpu-lost/group/g1", "open", 2, 3)
        assert inc["waiting_for"] == "next step in 20s"
        assert [(d["action"], d["target"]) for d in inc["done"]] == [
            ("fail_over", "g1"), ("quarantine", "n1")]
        assert (inc["failed_over"], inc["quarantined"]) == (["g1"], ["n1"])
        engine.evaluate([], VIEW)
        assert engine.incidents()[0]["state"] == "closing"


class TestScale:
    def test_many_groups_and_signals(self, clock: Clock) -> None:
        """512 groups and 300 signals evaluate to one decision per affected group."""
        engine = PolicyEngine(make_policy(), clock)
        groups = {f"g{i}": GroupView(f"g{i}", f"m{i % 4}", i >= 300, (f"n{i}",))
                  for i in range(512)}
        signals = [sig(groups=(f"g{i}",), node=f"n{i}", subject=f"GPU-{i}")
                   for i in range(300)]
        ev = step(engine, signals, View(groups))
        assert len(ev.decisions) == 300
        assert len(step(engine, signals, View(groups)).decisions) == 300
        assert step(engine, signals, View(groups)).decisions == []


class TestSuspects:
    def suspect_sig(self, groups: Iterable[str] = ("g1",), node: str = "n1") -> Signal:
        return Signal("xid", "critical", "gpu", "GPU-1", node, tuple(groups), False, T0,
                      suspect=True)

    def test_a_suspected_node_is_softly_marked_not_quarantined(
            self, engine: PolicyEngine, clock: Clock) -> None:
        """A quarantine step on a node the cause only may sit on is ``suspect`` (new work
        prefers other nodes), and the ladder goes on to restart the group elsewhere."""
        assert brief(step(engine, [self.suspect_sig()])) == [("fail_over", "g1", 0)]
        assert brief(step(engine, [self.suspect_sig()])) == [("suspect", "n1", 1)]
        clock.advance(30)
        assert brief(step(engine, [self.suspect_sig()])) == [("restart_group", "g1", 2)]
        (incident,) = engine.incidents()
        assert incident["suspected"] == ["n1"] and incident["quarantined"] == []

    def test_a_suspect_is_lifted_when_its_incident_closes_whatever_lift_quarantine_says(
            self, clock: Clock) -> None:
        """The workload turned out to be at fault (its signal gone): the suspicion goes,
        even under a rule that never lifts a quarantine by itself."""
        engine = PolicyEngine(make_policy(GPU_LOST.replace("lift_quarantine: true",
                                                           "lift_quarantine: false")),
                              clock, clock.wall)
        step(engine, [self.suspect_sig()])
        step(engine, [self.suspect_sig()])
        clock.advance(30)
        step(engine, [self.suspect_sig()])
        ev = step(engine, [])
        assert sorted(brief(ev)) == [("recover", "g1", -1), ("unsuspect", "n1", -1)]
        assert engine.incidents() == []

    def test_a_quarantine_proven_later_is_not_taken_for_the_suspicion(
            self, engine: PolicyEngine, clock: Clock) -> None:
        """While n1 is suspected for g1, another group's incident proves the cause on n1
        (a node-local signal): n1 is quarantined for real, not counted as held already."""
        step(engine, [self.suspect_sig()])
        step(engine, [self.suspect_sig()])
        proven = sig("xid", groups=("g2",), subject="GPU-1")
        ev = step(engine, [self.suspect_sig(), proven])
        assert ("fail_over", "g2", 0) in brief(ev)
        ev = step(engine, [self.suspect_sig(), proven])
        assert ("quarantine", "n1", 1) in brief(ev)

    def test_suspects_survive_a_snapshot(self, engine: PolicyEngine, clock: Clock) -> None:
        """A new leader knows which nodes its predecessor suspected, to lift them."""
        step(engine, [self.suspect_sig()])
        step(engine, [self.suspect_sig()])
        other = PolicyEngine(make_policy(), clock, clock.wall)
        other.restore(json.loads(json.dumps(engine.snapshot())))
        clock.advance(30)
        step(other, [self.suspect_sig()])
        assert sorted(brief(step(other, []))) == [("recover", "g1", -1),
                                                  ("unsuspect", "n1", -1)]
