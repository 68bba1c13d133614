"""The policy file: what it accepts, the defaults it fills in, and errors that name the field."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from policies import default_policy, load_policy, load_policy_file
from policies.engine import PolicyEngine
from policies.model import FAULT_CLASSES, Action, GroupView, Signal, View
from policies.schema import Policy, PolicyError, parse_duration
from supervisor.findings import FaultClass

FULL = """
dry_run: false
cooldown: 10m
budgets:
  max_groups_disrupted: 1
  min_healthy_groups: 1
  min_healthy_groups_by_model: {llama-70b: 2}
circuit_breaker:
  max_actions: 20
  window: 5m
rules:
  - name: gpu-lost
    when:
      fault_classes: [gpu_lost, xid]
      min_severity: critical
      scope: group
      for: 0s
    then:
      - action: fail_over
      - action: quarantine
      - action: restart_group
        after: 30s
    cooldown: 15m
    lift_quarantine: true
degrade:
  - model: llama-70b
    fallback: llama-8b
    floor: 2
    restore_after: 5m
"""


def rules_doc(*rules: str) -> str:
    return "rules:\n" + "".join(textwrap.indent(textwrap.dedent(r).strip() + "\n", "  ")
                                for r in rules)


GOOD_RULE = """
- name: r{n}
  when: {{fault_classes: [gpu_lost]}}
  then: [{{action: fail_over}}]
"""


class TestAccepted:
    def test_the_documented_example_loads_with_every_value(self) -> None:
        """The example of the policy format parses into the values it spells out."""
        policy = load_policy(FULL)
        assert policy.dry_run is False
        assert policy.cooldown_seconds == 600
        assert policy.budgets.max_groups_disrupted == 1
        assert policy.budgets.min_healthy("llama-70b") == 2
        assert policy.budgets.min_healthy("other") == 1
        assert (policy.circuit_breaker.max_actions,
                policy.circuit_breaker.window_seconds) == (20, 300)
        (rule,) = policy.rules
        assert rule.name == "gpu-lost"
        assert rule.when.fault_classes == ("gpu_lost", "xid")
        assert (rule.when.min_severity, rule.when.scope, rule.when.for_seconds) == (
            "critical", "group", 0)
        assert [(s.action, s.after_seconds) for s in rule.then] == [
            (Action.FAIL_OVER, 0), (Action.QUARANTINE, 0), (Action.RESTART_GROUP, 30)]
        assert (rule.cooldown_seconds, rule.lift_quarantine) == (900, True)
        (entry,) = policy.degrade
        assert (entry.model, entry.fallback, entry.floor, entry.restore_after_seconds) == (
            "llama-70b", "llama-8b", 2, 300)
        assert policy.degrade_for("llama-70b") is entry
        assert policy.rule("gpu-lost") is rule

    def test_a_minimal_policy_takes_the_defaults(self) -> None:
        """Only fault classes and a ladder are required; the rest has documented defaults."""
        policy = load_policy(rules_doc(GOOD_RULE.format(n=1)))
        assert policy == Policy(rules=policy.rules)
        (rule,) = policy.rules
        assert (rule.when.min_severity, rule.when.scope, rule.when.for_seconds) == (
            "warning", "group", 0)
        assert (rule.cooldown_seconds, rule.lift_quarantine) == (None, False)
        assert (policy.cooldown_seconds, policy.budgets.max_groups_disrupted,
                policy.circuit_breaker.max_actions) == (600, 1, 20)

    def test_repeated_fault_classes_are_kept_once(self) -> None:
        """Listing a fault class twice is harmless."""
        policy = load_policy(rules_doc("""
            - name: r
              when: {fault_classes: [xid, xid, gpu_lost]}
              then: [{action: notify}]
        """))
        assert policy.rules[0].when.fault_classes == ("xid", "gpu_lost")

    @pytest.mark.parametrize(
        ("value", "seconds"),
        [(0, 0.0), (2, 2.0), (1.5, 1.5), ("500ms", 0.5), ("0s", 0.0), ("30s", 30.0),
         ("5m", 300.0), ("1h", 3600.0), ("1.5m", 90.0), ("45", 45.0), (" 10s ", 10.0)],
    )
    def test_durations(self, value: object, seconds: float) -> None:
        """Durations are a number of seconds or a number with ms, s, m or h."""
        assert parse_duration(value) == seconds

    @pytest.mark.parametrize("value", ["soon", "5 minutes", "1d", "", "-5s", None, True,
                                       [], "inf", float("nan")])
    def test_bad_durations(self, value: object) -> None:
        """Anything else is refused with the expected shape in the message."""
        with pytest.raises(PolicyError, match="must be a duration"):
            parse_duration(value, "x")

    def test_negative_duration_is_refused(self) -> None:
        """A negative number of seconds is not a duration."""
        with pytest.raises(PolicyError, match=r"x: must be a duration >= 0, got -1"):
            parse_duration(-1, "x")

    def test_fault_class_check_can_be_widened_or_switched_off(self) -> None:
        """Callers with more fault classes pass their own vocabulary, or None for any."""
        doc = rules_doc("""
            - name: r
              when: {fault_classes: [brand_new]}
              then: [{action: notify}]
        """)
        with pytest.raises(PolicyError, match="unknown fault class 'brand_new'"):
            load_policy(doc)
        assert load_policy(doc, fault_classes=None).rules[0].when.fault_classes == (
            "brand_new",)
        assert load_policy(doc, fault_classes=FAULT_CLASSES | {"brand_new"}).rules

    def test_policy_file(self, tmp_path: Path) -> None:
        """load_policy_file reads a file; an unreadable one is a PolicyError naming it."""
        path = tmp_path / "policy.yaml"
        path.write_text(FULL)
        assert load_policy_file(path) == load_policy(FULL)
        missing = tmp_path / "missing.yaml"
        with pytest.raises(PolicyError) as err:
            load_policy_file(missing)
        assert err.value.field == str(missing)
        assert "cannot be read" in err.value.rule


ACTIONS = "['fail_over', 'restart_group', 'quarantine', 'notify']"


class TestRejected:
    @pytest.mark.parametrize(
        ("doc", "message"),
        [
            (rules_doc(GOOD_RULE.format(n=0), GOOD_RULE.format(n=1), """
                - name: r2
                  when: {fault_classes: [xid]}
                  then: [{action: reboot}]
             """),
             f"rules[2].then[0].action: must be one of {ACTIONS}, got 'reboot'"),
            (rules_doc("""
                - name: r
                  when: {fault_classes: [xid], for: soon}
                  then: [{action: notify}]
             """),
             "rules[0].when.for: must be a duration like 30s, 5m, 1h or a number of seconds, "
             "got 'soon'"),
            ("budgets: {max_groups_disrupted: 0}",
             "budgets.max_groups_disrupted: must be an integer >= 1, got 0"),
            ("budgets: {max_groups_disrupted: true}",
             "budgets.max_groups_disrupted: must be an integer >= 1, got True"),
            ("budgets: {min_healthy_groups: -1}",
             "budgets.min_healthy_groups: must be an integer >= 0, got -1"),
            ("budgets: {min_healthy_groups_by_model: {llama: -2}}",
             "budgets.min_healthy_groups_by_model.llama: must be an integer >= 0, got -2"),
            ("budgets: {min_healthy_groups_by_model: [llama]}",
             "budgets.min_healthy_groups_by_model: must be a mapping of model name to count, "
             "got a list"),
            ("cooldwn: 5m",
             "cooldwn: unknown key; expected one of ['budgets', 'circuit_breaker', 'cooldown', "
             "'degrade', 'dry_run', 'rules']"),
            ("dry_run: maybe", "dry_run: must be true or false, got 'maybe'"),
            ("cooldown: -5", "cooldown: must be a duration >= 0, got -5"),
            ("circuit_breaker: {window: 0s}",
             "circuit_breaker.window: must be a duration > 0, got '0s'"),
            ("circuit_breaker: {max_actions: 0}",
             "circuit_breaker.max_actions: must be an integer >= 1, got 0"),
            ("circuit_breaker: {limit: 3}",
             "circuit_breaker.limit: unknown key; expected one of ['max_actions', 'window']"),
            (rules_doc("""
                - name: r
                  when: {fault_class: [xid]}
                  then: [{action: notify}]
             """),
             "rules[0].when.fault_class: unknown key; expected one of ['fault_classes', 'for', "
             "'min_severity', 'scope']"),
            (rules_doc("""
                - name: r
                  when: {fault_classes: [xid], min_severity: fatal}
                  then: [{action: notify}]
             """),
             "rules[0].when.min_severity: must be one of ['info', 'warning', 'critical'], "
             "got 'fatal'"),
            (rules_doc("""
                - name: r
                  when: {fault_classes: [xid], scope: pod}
                  then: [{action: notify}]
             """),
             "rules[0].when.scope: must be one of ['group', 'node'], got 'pod'"),
            (rules_doc("""
                - name: r
                  when: {fault_classes: [gpu_lsot]}
                  then: [{action: notify}]
             """),
             f"rules[0].when.fault_classes[0]: unknown fault class 'gpu_lsot'; known: "
             f"{sorted(FAULT_CLASSES)}"),
            (rules_doc("""
                - name: r
                  when: {fault_classes: []}
                  then: [{action: notify}]
             """),
             "rules[0].when.fault_classes: must not be empty"),
            (rules_doc("""
                - name: r
                  when: {fault_classes: [xid]}
                  then: []
             """),
             "rules[0].then: must not be empty"),
            (rules_doc("""
                - name: r
                  when: {fault_classes: [xid]}
                  then: {action: notify}
             """),
             "rules[0].then: must be a list, got a mapping"),
            (rules_doc("""
                - name: r
                  then: [{action: notify}]
             """),
             "rules[0].when: is required"),
            (rules_doc("""
                - name: r
                  when: {fault_classes: [xid]}
                  then: [{after: 5s}]
             """),
             "rules[0].then[0].action: is required"),
            (rules_doc("""
                - name: r
                  when: {fault_classes: [xid]}
                  then: [{action: notify, after: later}]
             """),
             "rules[0].then[0].after: must be a duration like 30s, 5m, 1h or a number of "
             "seconds, got 'later'"),
            (rules_doc("""
                - name: r
                  when: {fault_classes: [xid]}
                  then: [{action: recover}]
             """),
             f"rules[0].then[0].action: must be one of {ACTIONS}, got 'recover'"),
            (rules_doc("""
                - name: r
                  when: {fault_classes: [xid]}
                  then: [{action: notify}]
                  lift_quarantine: sometimes
             """),
             "rules[0].lift_quarantine: must be true or false, got 'sometimes'"),
            (rules_doc(GOOD_RULE.format(n=1), GOOD_RULE.format(n=2), GOOD_RULE.format(n=1)),
             "rules[2].name: duplicate rule name 'r1' (also rules[0].name)"),
            (rules_doc("""
                - name: a/b
                  when: {fault_classes: [xid]}
                  then: [{action: notify}]
             """),
             "rules[0].name: must be a name of letters, digits, '.', '_' or '-' (it becomes "
             "part of incident ids), got 'a/b'"),
            (rules_doc("""
                - name: degrade
                  when: {fault_classes: [xid]}
                  then: [{action: notify}]
             """),
             "rules[0].name: 'degrade' is reserved for the degrade entries"),
            ("rules: {name: r}", "rules: must be a list, got a mapping"),
            ("rules: [notify]", "rules[0]: must be a mapping, got a string"),
            ("degrade: [{model: a, fallback: a}]", "degrade[0].fallback: must differ from "
                                                   "model 'a'"),
            ("degrade: [{model: a}]", "degrade[0].fallback: is required"),
            ("degrade: [{model: a, fallback: b, floor: 0}]",
             "degrade[0].floor: must be an integer >= 1, got 0"),
            ("degrade: [{model: a, fallback: b}, {model: a, fallback: c}]",
             "degrade[1].model: duplicate degrade entry for model 'a' (also degrade[0].model)"),
            ("degrade: [{model: a, fallback: b, restore_after: 1w}]",
             "degrade[0].restore_after: must be a duration like 30s, 5m, 1h or a number of "
             "seconds, got '1w'"),
            ("- rules", "policy: must be a mapping, got a list"),
            ("", "policy: is empty"),
            ("cooldown: 5m\ncooldown: 10m",
             "policy: line 2: key 'cooldown' appears twice in one mapping"),
            ("rules: [", "policy: is not valid YAML: line 1, column 9: expected the node "
                         "content, but found '<stream end>'"),
        ],
    )
    def test_error_names_the_field_and_the_rule(self, doc: str, message: str) -> None:
        """Each mistake is reported as 'field: rule broken', nothing is half-loaded."""
        with pytest.raises(PolicyError) as err:
            load_policy(doc)
        assert str(err.value) == message

    def test_error_is_a_value_error_with_its_parts(self) -> None:
        """PolicyError is a ValueError carrying the field and the rule separately."""
        with pytest.raises(ValueError, match="budgets") as err:
            load_policy("budgets: {max_groups_disrupted: 0}")
        assert isinstance(err.value, PolicyError)
        assert (err.value.field, err.value.rule) == (
            "budgets.max_groups_disrupted", "must be an integer >= 1, got 0")


class TestDefaultPolicy:
    def test_default_policy_loads(self) -> None:
        """The shipped default.yaml is valid and is what default_policy() returns."""
        policy = default_policy()
        text = (Path(__file__).parents[2] / "policies" / "default.yaml").read_text()
        assert policy == load_policy(text)
        assert not policy.dry_run
        assert {r.name for r in policy.rules} >= {"gpu-fatal", "group-hang", "node-down",
                                                  "node-degraded"}

    def test_every_fault_class_is_known_and_handled(self) -> None:
        """Every fault class the agent reports is in the policy vocabulary, and the default
        policy has a rule for every class of the vocabulary."""
        assert {str(fc) for fc in FaultClass} <= FAULT_CLASSES
        covered = {fc for r in default_policy().rules for fc in r.when.fault_classes}
        assert covered == FAULT_CLASSES

    @pytest.mark.parametrize(
        ("fault_class", "severity", "ladder"),
        [
            ("gpu_lost", "critical", ["fail_over", "quarantine", "restart_group"]),
            ("xid", "critical", ["fail_over", "quarantine", "restart_group"]),
            ("ecc_uncorrectable", "critical", ["fail_over", "quarantine", "restart_group"]),
            # Also matches gpu-memory-pending: the node is quarantined once for both rules,
            # and that rule's notify follows.
            ("row_remap", "critical", ["fail_over", "quarantine", "restart_group", "notify"]),
            ("row_remap", "warning", ["quarantine", "notify"]),
            ("nvlink_down", "critical", ["fail_over", "quarantine", "restart_group"]),
            ("collective_hang", "critical", ["fail_over", "restart_group"]),
            ("engine_hang", "critical", ["fail_over", "restart_group"]),
            ("partition", "critical", ["fail_over", "restart_group"]),
            ("node_down", "critical", ["fail_over", "restart_group"]),
            ("thermal", "warning", ["quarantine", "notify"]),
            ("clock_throttle", "warning", ["quarantine", "notify"]),
            ("pcie_degraded", "warning", ["quarantine", "notify"]),
            ("xid", "warning", []),
        ],
    )
    def test_default_ladders(self, fault_class: str, severity: str,
                             ladder: list[str]) -> None:
        """Driven through the engine, the default policy climbs the ladder the design gives
        each fault class (group faults fail over at once; degradations only quarantine)."""
        now = [1000.0]
        engine = PolicyEngine(default_policy(), lambda: now[0])
        node_local = fault_class not in {"collective_hang", "engine_hang", "partition"}
        signal = Signal(fault_class, severity, "gpu", "GPU-0", "n1" if node_local else None,
                        ("ns/llama/0",), node_local, since=now[0])
        view = View({"ns/llama/0": GroupView("ns/llama/0", "llama", False, ("n1",)),
                     "ns/llama/1": GroupView("ns/llama/1", "llama", True, ("n2",))})
        actions: list[str] = []
        for _ in range(20):
            now[0] += 15  # 5 minutes in all: past every `for` and `after` of the defaults
            evaluation = engine.evaluate([signal], view)
            assert not evaluation.refusals
            for decision in evaluation.decisions:
                actions.append(str(decision.action))
                engine.confirm(decision, True)
        assert actions == ladder
