"""Scenario files: every shipped one is valid, and each mistake names its field."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from simulator.scenario import SCENARIOS, load, parse, seconds, shipped_names
from supervisor.errors import ConfigError

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


def test_a_scenario_kind_other_than_lws_is_shipped() -> None:
    kinds = {m.kind for name in shipped_names() for m in load(name).models}
    assert kinds - {"lws"}


def test_a_valid_scenario_reads_as_written() -> None:
    scenario = parse(BASE)
    (fault,) = scenario.faults
    assert (fault.at, fault.kind, str(fault.target), fault.params) == (5.0, "xid", "m/1/1",
                                                                      {"gpu": 3})
    assert scenario.expect[0].traffic_off_within == 5.0
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
])
def test_each_mistake_names_its_field(data: dict[str, Any], field: str, rule: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(data)
    assert info.value.field == field
    assert rule in info.value.rule


def test_durations() -> None:
    assert [seconds(v, "x") for v in ("10s", "2m", "500ms", 3, "1.5")] == [10, 120, 0.5, 3, 1.5]
    with pytest.raises(ConfigError):
        seconds("-1s", "x")


def test_shipped_scenarios_are_plain_yaml_files() -> None:
    for path in SCENARIOS.glob("*.yaml"):
        assert isinstance(yaml.safe_load(path.read_text()), dict)
