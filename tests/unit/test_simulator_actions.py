"""What the simulator makes of the API server's state: which actions happened, which fault
explains each, and what fails a run — without a cluster (the view fed the watch events)."""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import pytest

from simulator.cli import _one_line
from simulator.run import Simulation
from simulator.scenario import Allow, parse
from simulator.timeline import Action, ClusterView, FaultRecord, Snapshot, changes, explaining
from simulator.world import GROUP_LABEL, READINESS_GATE, groups_of, member_pod
from supervisor.controller.actions import QUARANTINE_TAINT
from supervisor.errors import ConfigError

SCENARIO: dict[str, Any] = {
    "name": "three", "cluster": {"nodes": 8},
    "models": [{"name": "m", "replicas": 3, "size": 2}],
    "faults": [{"name": "xid", "at": "5s", "kind": "xid", "target": "m/1/1"}],
    "expect": [{"fault": "xid", "traffic_off_within": "5s"}],
}


def pod(group: str, rank: int, uid: str, node: str, ip: str, ready: bool = True,
        deleting: bool = False) -> dict[str, Any]:
    name = group if rank == 0 else f"{group}-{rank}"
    meta: dict[str, Any] = {"name": name, "uid": uid, "labels": {GROUP_LABEL: group}}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": meta, "spec": {"nodeName": node},
            "status": {"podIP": ip, "conditions": [
                {"type": "Ready", "status": "True" if ready else "False"}]}}


def serving_view() -> ClusterView:
    """Three groups of two, each on nodes of its own, every leader a ready endpoint."""
    view = ClusterView()
    ips = []
    for g in range(3):
        for rank in range(2):
            view.on_pod("ADDED", pod(f"m-{g}", rank, f"u{g}{rank}", f"gpu-{2 * g + rank}",
                                     f"10.0.0.{10 * g + rank}"))
        ips.append(f"10.0.0.{10 * g}")
    set_ready(view, ips)
    return view


def set_ready(view: ClusterView, ips: list[str]) -> None:
    view.on_slice("MODIFIED", {
        "metadata": {"name": "m-abc", "labels": {"kubernetes.io/service-name": "m"}},
        "endpoints": [{"addresses": [ip], "conditions": {"ready": True}} for ip in ips]})


def test_a_restart_is_one_action_however_many_pods_it_deletes_and_the_next_is_another(
) -> None:
    scenario = parse(SCENARIO)
    groups = groups_of(scenario)
    view = serving_view()
    restarting: set[str] = set()
    before = Snapshot.of(view, groups)
    view.on_pod("MODIFIED", pod("m-1", 0, "u10", "gpu-2", "10.0.0.10", deleting=True))
    set_ready(view, ["10.0.0.0", "10.0.0.20"])
    first = Snapshot.of(view, groups)
    assert changes(before, first, restarting) == [("restart", "m-1"), ("traffic_off", "m-1")]
    view.on_pod("DELETED", pod("m-1", 0, "u10", "gpu-2", "10.0.0.10"))
    view.on_pod("MODIFIED", pod("m-1", 1, "u11", "gpu-3", "10.0.0.11", deleting=True))
    second = Snapshot.of(view, groups)
    assert changes(first, second, restarting) == []  # the same restart, its second pod
    view.on_pod("DELETED", pod("m-1", 1, "u11", "gpu-3", "10.0.0.11"))
    view.on_pod("ADDED", pod("m-1", 0, "n10", "gpu-6", "10.0.0.16", ready=False))
    view.on_pod("ADDED", pod("m-1", 1, "n11", "gpu-7", "10.0.0.17", ready=False))
    third = Snapshot.of(view, groups)
    assert changes(second, third, restarting) == []  # new pods: no action
    view.on_pod("MODIFIED", pod("m-1", 0, "n10", "gpu-6", "10.0.0.16", deleting=True))
    assert changes(third, Snapshot.of(view, groups), restarting) == [("restart", "m-1")]


def test_quarantines_and_their_lifting_are_seen_per_node() -> None:
    groups = groups_of(parse(SCENARIO))
    view = serving_view()
    before = Snapshot.of(view, groups)
    view.on_node("MODIFIED", {"metadata": {"name": "gpu-3"},
                              "spec": {"taints": [{"key": QUARANTINE_TAINT}]}})
    tainted = Snapshot.of(view, groups)
    assert changes(before, tainted, set()) == [("quarantine", "gpu-3")]
    view.on_node("MODIFIED", {"metadata": {"name": "gpu-3"}, "spec": {}})
    assert changes(tainted, Snapshot.of(view, groups), set()) == [
        ("quarantine_lifted", "gpu-3")]


def record(scenario_data: dict[str, Any], node: str = "gpu-3", injected: float = 100.0
           ) -> FaultRecord:
    scenario = parse(scenario_data)
    (fault,) = scenario.faults
    group = next(g for g in groups_of(scenario) if g.name == "m-1")
    r = FaultRecord(fault, group, node=node, pod="m-1-1")
    r.mark("injected", injected)
    return r


def test_an_action_is_explained_by_a_fault_in_its_group_on_its_node_or_in_its_model(
) -> None:
    records = [record(SCENARIO)]
    assert explaining("restart", "m-1", 101.0, records) == ["xid"]
    assert explaining("traffic_off", "m-1", 101.0, records) == ["xid"]
    assert explaining("quarantine", "gpu-3", 101.0, records) == ["xid"]
    assert explaining("degrade", "m", 101.0, records) == ["xid"]
    # A bystander group, another node, or before the fault: nothing explains it.
    assert explaining("restart", "m-0", 101.0, records) == []
    assert explaining("quarantine", "gpu-0", 101.0, records) == []
    assert explaining("restart", "m-1", 99.0, records) == []


def test_a_group_the_faults_xids_reached_is_explained_too() -> None:
    r = record(SCENARIO)
    r.groups_hit.add("m-2")
    assert explaining("restart", "m-2", 101.0, [r]) == ["xid"]


def simulation(data: dict[str, Any], tmp_path: Path) -> Simulation:
    return Simulation(parse(data), tmp_path, io.StringIO())


def test_an_action_no_fault_explains_fails_the_run_and_is_marked_so(tmp_path: Path) -> None:
    sim = simulation(SCENARIO, tmp_path)
    sim.records.append(record(SCENARIO))
    sim.records[0].mark("traffic_off", 100.5)
    sim.actions += [Action(100.5, "traffic_off", "m-1", ("xid",)),
                    Action(101.0, "restart", "m-0"),
                    Action(130.0, "quarantine_lifted", "gpu-3", ("xid",))]
    assert sim.judge() == ["restart of m-0 at +1.0 s from the first fault: no fault explains "
                           "it (list it under allow: if the scenario expects it)"]
    assert " ".join(sim.actions[1].describe().split()) == (
        "restart m-0 UNATTRIBUTED: no fault explains it")
    assert " ".join(sim.actions[0].describe().split()) == "traffic off m-1 for xid"


def test_an_allowed_action_passes_though_no_fault_explains_it(tmp_path: Path) -> None:
    data = {**SCENARIO, "allow": [{"action": "restart", "group": "m-0"}]}
    sim = simulation(data, tmp_path)
    sim.records.append(record(data))
    sim.records[0].mark("traffic_off", 100.5)
    sim.actions.append(Action(101.0, "restart", "m-0",
                              allowed=sim.scenario.allows("restart", "m-0")))
    assert sim.judge() == []
    assert not sim.scenario.allows("restart", "m-2")


def test_a_skipped_fault_with_expectations_fails_the_run_saying_why(tmp_path: Path) -> None:
    sim = simulation(SCENARIO, tmp_path)
    scenario = sim.scenario
    skipped = FaultRecord(scenario.faults[0], groups_of(scenario)[1],
                          skipped="no pod holds rank 1 of m-1 after 60 s")
    sim.records.append(skipped)
    assert sim.judge() == ["xid: skipped (no pod holds rank 1 of m-1 after 60 s), so its "
                           "expectations could not be checked"]
    assert skipped.as_json()["skipped"] == "no pod holds rank 1 of m-1 after 60 s"


def test_allow_entries_read_as_written() -> None:
    scenario = parse({**SCENARIO, "allow": [{"action": "restart", "group": "m-2"},
                                            {"action": "quarantine"},
                                            {"action": "degrade", "model": "m"}]})
    assert scenario.allow == (Allow("restart", "m-2"), Allow("quarantine"),
                              Allow("degrade", "m"))
    assert scenario.allows("quarantine", "gpu-5")
    assert scenario.group_names == ["m-0", "m-1", "m-2"]


@pytest.mark.parametrize(("allow", "field", "rule"), [
    ({"restart": "m-0"}, "allow", "must be a list"),
    ([{"action": "explode"}], "allow[0].action", "traffic_off, restart, quarantine, degrade"),
    ([{"action": "restart", "group": "m-3"}], "allow[0].group", "m-0, m-1, m-2"),
    ([{"action": "restart", "node": "gpu-1"}], "allow[0].node", "done to a group"),
    ([{"action": "quarantine", "node": "gpu-8"}], "allow[0].node", "gpu-7"),
    ([{"action": "degrade", "model": "x"}], "allow[0].model", "must be one of m"),
    ([{"action": "restart", "pod": "m-0"}], "allow[0].pod", "unknown field"),
])
def test_a_bad_allow_entry_names_its_field(allow: Any, field: str, rule: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse({**SCENARIO, "allow": allow})
    assert info.value.field == field
    assert rule in info.value.rule


def test_an_internal_error_is_one_line() -> None:
    assert _one_line(KeyError("llama-70b-1")) == "KeyError: 'llama-70b-1'"
    assert _one_line(AssertionError()) == "AssertionError"
    assert _one_line(ValueError("two\nlines")) == "ValueError: two lines"
    group = ExceptionGroup("x", [KeyError("a"), ValueError("b")])
    assert _one_line(group) == "KeyError: 'a' (and 1 more)"


def test_a_record_is_marked_from_its_injection_on() -> None:
    r = record(SCENARIO, injected=time.time())
    assert r.mark("traffic_off")
    assert not r.mark("traffic_off")


def test_without_the_supervisor_pods_are_the_upstream_examples() -> None:
    """Today's stack: the engine alone (no sidecar, no readiness gate), the leader ready by
    a TCP probe of its port after 15 s, every 10 s, and no liveness probe — as the upstream
    LWS + vLLM example has it; supervised pods keep our sidecar and gate."""
    (group, *_) = groups_of(parse({
        "cluster": {"nodes": 2}, "models": [{"name": "m", "replicas": 1, "size": 2}]}))
    leader, worker = (member_pod(group, rank, 8, None, supervised=False) for rank in (0, 1))
    for pod in (leader, worker):
        assert [c["name"] for c in pod["spec"]["containers"]] == ["engine"]
        assert "readinessGates" not in pod["spec"]
        assert all("livenessProbe" not in c for c in pod["spec"]["containers"])
    assert leader["spec"]["containers"][0]["readinessProbe"] == {
        "tcpSocket": {"port": 8000}, "initialDelaySeconds": 15, "periodSeconds": 10}
    assert "readinessProbe" not in worker["spec"]["containers"][0]
    ours = member_pod(group, 0, 8, None)
    assert [c["name"] for c in ours["spec"]["containers"]] == ["engine", "gpu-supervisor"]
    assert ours["spec"]["readinessGates"] == [{"conditionType": READINESS_GATE}]
