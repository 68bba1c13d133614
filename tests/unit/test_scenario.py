"""Scenario files: every shipped one is valid, and each mistake names its field."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from probes.engine_standin.server import EXECUTE_TIMEOUT_SECONDS
from simulator.run import FINDING_CLASSES
from simulator.scenario import (
    FAULT_KINDS,
    MODEL_LOAD_SECONDS,
    SCENARIOS,
    UNDOING,
    VLLM_LOAD_SECONDS,
    load,
    parse,
    seconds,
    shipped_names,
)
from supervisor.errors import ConfigError
from supervisor.findings import FaultClass

BASE: dict[str, Any] = {
    "cluster": {"nodes": 6}, "models": [{"name": "m", "replicas": 2, "size": 2}],
    "faults": [{"name": "f", "at": "5s", "kind": "xid", "target": "m/1/1", "gpu": 3}],
    "expect": [{"fault": "f", "traffic_off_within": "5s"}],
}


def with_(**changes: Any) -> dict[str, Any]:
    return {**BASE, **changes}


def test_every_shipped_scenario_is_valid_and_documented() -> None:
    names = shipped_names()
    assert "xid-fatal" in names
    assert len(names) >= 5
    for name in names:
        scenario = load(name)
        assert scenario.name == name
        assert scenario.description
        assert scenario.expect, f"{name} expects nothing"


def test_every_fault_class_the_daemons_report_has_a_shipped_scenario() -> None:
    """Each class the agent, the sidecar and the all-reduce checks report is what some
    shipped scenario injects and waits to see found. A kind covers the class named like it,
    or its only class (engine_hang may also be found as a collective_hang: that does not
    count for collective_hang)."""
    covered = set()
    for name in shipped_names():
        scenario = load(name)
        unseen = {e.fault for e in scenario.expect if "detected" in e.never}
        for fault in scenario.faults:
            if fault.name in unseen:
                continue  # expected never to be found (a starved sidecar: no partition)
            classes = FINDING_CLASSES.get(fault.kind, set())
            covered |= {c for c in classes if c == fault.kind or len(classes) == 1}
    assert set(FaultClass) - covered == set()


def test_every_fault_kind_does_something_the_simulator_knows() -> None:
    for kind in FAULT_KINDS:
        assert kind in FINDING_CLASSES or kind in UNDOING or kind == "kill_leader", kind


def test_a_scenario_kind_other_than_lws_is_shipped() -> None:
    kinds = {m.kind for name in shipped_names() for m in load(name).models}
    assert kinds - {"lws"}


def test_a_valid_scenario_reads_as_written() -> None:
    scenario = parse(BASE)
    (fault,) = scenario.faults
    assert (fault.at, fault.kind, str(fault.target), fault.params) == (5.0, "xid", "m/1/1",
                                                                      {"gpu": 3})
    assert scenario.expect[0].limits() == [("traffic_off", 5.0)]
    assert scenario.duration == 180.0


@pytest.mark.parametrize(("data", "field", "rule"), [
    (with_(models=[]), "models", "at least one"),
    (with_(models=[{"name": "Big_Model"}]), "models[0].name", "DNS label"),
    (with_(models=[{"name": "m", "kind": "ray"}]), "models[0].kind", "topology group kind"),
    (with_(models=[{"name": "m", "replicas": 4, "size": 2}]), "cluster.nodes", "cannot hold"),
    (with_(cluster={"nodes": "six"}), "cluster.nodes", "integer"),
    (with_(faults=[{"kind": "meteor", "target": "m/0/0"}]), "faults[0].kind", "one of"),
    (with_(faults=[{"kind": "xid", "target": "m/2/0"}]), "faults[0].target", "groups 0..1"),
    (with_(faults=[{"kind": "xid", "target": "x/0/0"}]), "faults[0].target", "names no model"),
    (with_(faults=[{"kind": "xid", "target": "m-0-0"}]), "faults[0].target", "model/group/rank"),
    (with_(faults=[{"kind": "xid", "target": "m/0/0", "at": "soon"}]), "faults[0].at",
     "duration"),
    (with_(faults=[{"kind": "xid", "target": "m/0/0", "colour": 1}]), "faults[0].colour",
     "unknown field"),
    (with_(expect=[{"fault": "g"}]), "expect[0].fault", "must name a fault"),
    (with_(expect=[{"fault": "f", "quarantined": "yes"}]), "expect[0].quarantined",
     "true or false"),
    (with_(expect=[{"fault": "f", "never": ["exploded"]}]), "expect[0].never",
     "must list steps"),
    (with_(fallbacks=[{"name": "small", "for": "big"}]), "fallbacks[0].for", "must name"),
    (with_(fallbacks=[{"name": "m", "for": "m"}]), "fallbacks[0].name", "no other model"),
    (with_(fallbacks=[{"name": "s", "for": "m", "replicas": 3}]), "cluster.nodes",
     "cannot hold 7 pods"),
    (with_(speed=3), "speed", "unknown field"),
    (with_(faults=[{"kind": "row_remap", "target": "m/0/0", "state": "melted"}]),
     "faults[0].state", "failure, limit, pending"),
    (with_(faults=[{"kind": "xid", "target": "m/0/0", "state": "pending"}]),
     "faults[0].state", "means nothing for xid"),
    (with_(faults=[{"kind": "clock_throttle", "target": "m/0/0", "reason": "sw_power_cap"}]),
     "faults[0].reason", "hw_slowdown"),
    (with_(faults=[{"kind": "sidecar_starved", "target": "m/0/0", "millicores": 0}]),
     "faults[0].millicores", "at least 1"),
    (with_(faults=[{"kind": "sidecar_starved", "target": "m/0/0", "millicores": 2.5}]),
     "faults[0].millicores", "whole number"),
    (with_(faults=[{"kind": "collective_slow", "target": "m/0/0", "share": 1.5}],
           settings={"sidecar": {"collective": {"enabled": True}}}),
     "faults[0].share", "between 0 and 1"),
    (with_(faults=[{"name": "f", "kind": "collective_hang", "target": "m/0/0"}]),
     "settings.sidecar.collective.enabled", "needs the all-reduce checks"),
    (with_(settings={"sidecar": {"collective": {"period_seconds": -1}}}),
     "settings.sidecar.collective.period_seconds", ""),
    (with_(settings={"controller": {}}), "settings.controller", "unknown field"),
    (with_(expect=[{"fault": "f", "detected_within": "soon"}]), "expect[0].detected_within",
     "duration"),
    (with_(faults=[{"kind": "xid", "target": "m/0/0", "gpu": "three"}]), "faults[0].gpu",
     "whole number"),
    (with_(faults=[{"kind": "xid", "target": "m/0/0", "gpu": 8}]), "faults[0].gpu",
     "GPUs 0..7"),
    (with_(faults=[{"kind": "ecc_storm", "target": "m/0/0", "per_minute": "many"}]),
     "faults[0].per_minute", "number"),
    (with_(faults=[{"kind": "engine_unhealthy", "target": "m/0/1"}]), "faults[0].target",
     "no health endpoint"),
    (with_(models=[{"name": "m", "engine": "sglang"}]), "models[0].engine",
     "standin, vllm"),
    (with_(models=[{"name": "m", "engine": "vllm"}],
           faults=[{"kind": "engine_unhealthy", "target": "m/0/0"}]), "models[0].engine",
     "cannot be told to answer /health with 503"),
    (with_(faults=[{"kind": "xid", "target": "m/0/0", "once_serving": "yes"}]),
     "faults[0].once_serving", "true or false"),
    (with_(faults=[{"kind": "kill_leader", "once_serving": True}]),
     "faults[0].once_serving", "only for a fault with a target"),
])
def test_each_mistake_names_its_field(data: dict[str, Any], field: str, rule: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(data)
    assert info.value.field == field
    assert rule in info.value.rule


def test_a_model_on_real_vllm_is_allowed_its_load_and_keeps_it_under_load_seconds() -> None:
    """A real vLLM loads as long as it takes: its load_seconds is only the limits' allowance
    (VLLM_LOAD_SECONDS unless written), and ``--load-seconds`` leaves it alone."""
    scenario = parse(with_(models=[{"name": "m", "engine": "vllm"},
                                   {"name": "n", "replicas": 1, "size": 1}]))
    assert [(m.engine, m.load_seconds) for m in scenario.models] == [
        ("vllm", VLLM_LOAD_SECONDS), ("standin", MODEL_LOAD_SECONDS)]
    quick = scenario.loading(5.0)
    assert [m.load_seconds for m in quick.models] == [VLLM_LOAD_SECONDS, 5.0]


def test_engine_flag_puts_the_first_model_on_vllm_or_names_itself_when_it_cannot() -> None:
    scenario = load("engine-hang").on_engine("vllm")
    assert (scenario.models[0].engine, scenario.models[0].load_seconds) == (
        "vllm", VLLM_LOAD_SECONDS)
    unhealthy = parse(with_(faults=[{"name": "f", "kind": "engine_unhealthy",
                                     "target": "m/0/0"}]))
    with pytest.raises(ConfigError) as info:
        unhealthy.on_engine("vllm")
    assert info.value.field == "--engine"


def test_without_the_supervisor_a_run_lasts_past_the_engines_own_timeout() -> None:
    """Today's stack acts first at the engine's execute-model timeout: a run without the
    supervisor lasts at least that long after its last fault, plus a load and a minute."""
    scenario = load("engine-hang")
    today = scenario.unsupervised()
    last = max(f.at for f in scenario.faults)
    assert today.duration == max(scenario.duration, last + EXECUTE_TIMEOUT_SECONDS
                                 + MODEL_LOAD_SECONDS + 60.0)
    assert today.faults == scenario.faults


def test_durations() -> None:
    assert [seconds(v, "x") for v in ("10s", "2m", "500ms", 3, "1.5")] == [10, 120, 0.5, 3, 1.5]
    with pytest.raises(ConfigError):
        seconds("-1s", "x")


def test_shipped_scenarios_are_plain_yaml_files() -> None:
    for path in SCENARIOS.glob("*.yaml"):
        assert isinstance(yaml.safe_load(path.read_text()), dict)


def test_every_timed_step_can_be_expected() -> None:
    scenario = parse(with_(expect=[{"fault": "f", "detected_within": "1s",
                                    "quarantined_within": "4s", "recovered_within": "90s"}]))
    assert scenario.expect[0].limits() == [("detected", 1.0), ("quarantined", 4.0),
                                           ("recovered", 90.0)]


def test_scenario_settings_reach_the_daemons_as_written() -> None:
    settings = {"sidecar": {"collective": {"enabled": True, "period_seconds": 3}},
                "agent": {"detectors": {"pcie_width_for_seconds": 10}}}
    scenario = parse(with_(settings=settings))
    assert scenario.settings == settings
    assert scenario.collective
    assert not parse(BASE).collective
