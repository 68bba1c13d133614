"""What a run reports: requests that add up, groups that must keep serving, a timeline in
time order, scenarios listed with their one line — without a cluster."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import socket
import subprocess
import sys
import types
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from simulator import cli
from simulator.fleet import Starving
from simulator.processes import SidecarProcess
from simulator.run import Printer, Simulation, longest_silence
from simulator.scenario import MODEL_LOAD_SECONDS, load, parse, shipped_names
from simulator.timeline import ClusterView, FaultRecord, update
from simulator.traffic import Traffic
from simulator.world import GROUP_LABEL, groups_of
from supervisor.errors import ConfigError

SCENARIO: dict[str, Any] = {
    "name": "two", "cluster": {"nodes": 6},
    "models": [{"name": "m", "replicas": 2, "size": 2}],
    "faults": [{"name": "crash", "at": "5s", "kind": "engine_crash", "target": "m/1/0"}],
    "expect": [{"fault": "crash", "keeps_serving": ["m-0"]}],
}


def test_the_longest_silence_counts_from_injection_to_the_end() -> None:
    assert longest_silence([11.0, 12.0, 19.0], 10.0, 20.0) == (7.0, 12.0)
    assert longest_silence([], 10.0, 20.0) == (10.0, 10.0)
    # Answers before the injection or after the end are outside the window.
    assert longest_silence([5.0, 13.0, 25.0], 10.0, 20.0) == (7.0, 13.0)


def simulation(tmp_path: Path) -> Simulation:
    sim = Simulation(parse(SCENARIO), tmp_path, io.StringIO())
    record = FaultRecord(sim.scenario.faults[0], sim.groups[1])
    record.mark("injected", 100.0)
    sim.records.append(record)
    sim.traffic = Traffic(sim.view, sim.groups, {}, lambda: sim.records)
    sim.ended = 130.0
    return sim


def test_a_group_that_must_keep_serving_fails_the_run_after_5_s_without_an_answer(
        tmp_path: Path) -> None:
    sim = simulation(tmp_path)
    assert sim.traffic is not None
    sim.traffic.answers["m-0"] = [100.5 + i * 0.5 for i in range(20)] + [
        116.0 + i * 0.5 for i in range(29)]  # nothing from 110.0 to 116.0
    assert sim.judge() == ["crash: m-0 answered no request for 6.0 s from +10.0 s after "
                           "injection (expected to keep serving: never 5 s without an "
                           "answer)"]
    sim.traffic.answers["m-0"] = [100.5 + i * 0.5 for i in range(60)]
    assert sim.judge() == []


def test_keeps_serving_names_groups_of_the_scenario() -> None:
    assert parse(SCENARIO).expect[0].keeps_serving == ("m-0",)
    with pytest.raises(ConfigError) as info:
        parse({**SCENARIO, "expect": [{"fault": "crash", "keeps_serving": ["m-2"]}]})
    assert info.value.field == "expect[0].keeps_serving"
    assert "m-0, m-1" in info.value.rule


def serving_view(ip: str) -> ClusterView:
    view = ClusterView()
    for group in ("m-0", "m-1"):
        for rank in range(2):
            name = group if rank == 0 else f"{group}-{rank}"
            leader = ip if group == "m-1" and rank == 0 else f"10.0.0.{len(view.pods) + 1}"
            view.on_pod("ADDED", {
                "metadata": {"name": name, "uid": name, "labels": {GROUP_LABEL: group}},
                "spec": {"nodeName": f"gpu-{len(view.pods)}"},
                "status": {"podIP": leader, "conditions": [{"type": "Ready",
                                                           "status": "True"}]}})
    view.on_slice("ADDED", {
        "metadata": {"name": "m-x", "labels": {"kubernetes.io/service-name": "m"}},
        "endpoints": [{"addresses": [ip], "conditions": {"ready": True}}]})
    return view


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again: nothing listens there


async def test_requests_add_up_and_those_to_the_sick_replica_are_split() -> None:
    """A request with no endpoint to go to is sent and failed; one to the crashed replica
    (nothing listening) counts against its fault, failed."""
    scenario = parse(SCENARIO)
    groups = groups_of(scenario)
    record = FaultRecord(scenario.faults[0], groups[1], leader_ip="10.0.9.9")
    record.mark("injected")
    records = [record]
    traffic = Traffic(ClusterView(), groups, {}, lambda: records)
    async with aiohttp.ClientSession() as session:
        async with asyncio.TaskGroup() as tasks:
            traffic._send_one(session, tasks)
        traffic._view = serving_view("10.0.9.9")
        traffic._engines["10.0.9.9"] = f"http://127.0.0.1:{closed_port()}"
        async with asyncio.TaskGroup() as tasks:
            traffic._send_one(session, tasks)
    totals = traffic.totals()
    assert (totals["sent"], totals["answered"], totals["failed"], totals["in_flight"],
            totals["no_endpoint"]) == (2, 0, 2, 0, 1)
    assert totals["sent"] == totals["answered"] + totals["failed"] + totals["in_flight"]
    assert record.sick_split() == {"sent": 1, "answered": 0, "failed": 1, "hung": 0,
                                   "in_flight": 0}


def test_timeline_lines_come_out_in_the_order_things_happened() -> None:
    out = io.StringIO()
    printer = Printer(out)
    start = printer.start
    printer.event(start + 2.0, "traffic off")
    printer.event(start + 1.0, "detected")  # noticed later, happened earlier
    printer.event(start + 2.0, "quarantined")
    printer.flush_all()
    assert [line.split(maxsplit=1)[1] for line in out.getvalue().splitlines()] == [
        "detected", "traffic off", "quarantined"]


def test_a_scenario_must_say_how_many_nodes_it_has() -> None:
    without = {k: v for k, v in SCENARIO.items() if k != "cluster"}
    with pytest.raises(ConfigError) as info:
        parse(without)
    assert info.value.field == "cluster"
    with pytest.raises(ConfigError) as info:
        parse({**SCENARIO, "cluster": {"gpus_per_node": 8}})
    assert info.value.field == "cluster.nodes"
    assert parse(SCENARIO).gpus_per_node == 8  # the documented default


def test_a_summary_is_one_line_given_or_the_descriptions_first_sentence() -> None:
    told = parse({**SCENARIO, "description": "First this. Then that."})
    assert told.summary == "First this"
    assert parse({**SCENARIO, "summary": "in short"}).summary == "in short"
    with pytest.raises(ConfigError) as info:
        parse({**SCENARIO, "summary": "one\ntwo"})
    assert info.value.field == "summary"


def test_every_shipped_scenario_has_a_one_line_summary() -> None:
    for name in shipped_names():
        summary = load(name).summary
        assert summary, name
        assert "\n" not in summary, name


def test_list_prints_each_scenario_beside_its_summary(capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    assert cli.main(argparse.Namespace(list=True)) == 0
    lines = capsys.readouterr().out.split("\nfault kinds:")[0].splitlines()
    for name in shipped_names():
        (line,) = [x for x in lines if x.split()[:1] == [name]]
        assert line.split(maxsplit=1)[1] == load(name).summary


def test_a_finding_raised_after_the_fault_was_undone_is_not_its_detection(
        tmp_path: Path) -> None:
    """bench e2e repairs a cut link once traffic is off and cuts it again in the next trial:
    the cut pod's sidecar may raise its finding only then, and that finding is the next
    trial's — not this one's, ten seconds late."""
    sim = simulation(tmp_path)
    sim.runtime = types.SimpleNamespace()  # only asserted present
    (record,) = sim.records
    log = tmp_path / "sidecar.log"
    record.daemon = types.SimpleNamespace(log_path=log, role="sidecar")

    def raised(at: float, message: str) -> str:
        return json.dumps({"event": "finding raised", "fault_class": "engine_crash",
                           "message": message,
                           "timestamp": datetime.fromtimestamp(at, UTC).isoformat()})

    log.write_text(raised(112.0, "the next trial's") + "\n")
    record.undone_at = 103.0
    assert sim._finding(record) is None
    log.write_text(raised(102.0, "this one's") + "\n" + raised(112.0, "the next trial's")
                   + "\n")
    record.log_offset = 0
    assert sim._finding(record) == (102.0, "engine_crash by sidecar: this one's")


def test_a_starvation_that_never_held_says_so(tmp_path: Path) -> None:
    """A sidecar gone before its quota could be applied (here: a process already reaped)
    was never held back, and the result says so instead of a throttled time — the run
    then fails on it rather than passing on a starvation that did not happen."""
    car = SidecarProcess(tmp_path, "gone", {})
    car.proc = subprocess.Popen([sys.executable, "-c", "pass"])
    car.proc.wait()
    car.url = "http://127.0.0.1:9"  # nothing listens: no metrics either
    starving = Starving(car, millicores=50, seconds=1.0)
    starving.start()
    starving.end()
    assert starving.throttled is None
    assert starving.result().startswith("the sidecar was never held back: ")


def test_a_model_loads_for_the_cited_default_unless_the_scenario_or_the_flag_says() -> None:
    assert parse(SCENARIO).models[0].load_seconds == MODEL_LOAD_SECONDS == 120.0
    given = parse({**SCENARIO, "models": [{"name": "m", "load_seconds": "45s"}]})
    assert given.models[0].load_seconds == 45.0
    assert given.loading(3.0).models[0].load_seconds == 3.0
    with pytest.raises(ConfigError) as info:
        parse({**SCENARIO, "models": [{"name": "m", "load_seconds": "soon"}]})
    assert info.value.field == "models[0].load_seconds"


def test_steps_after_a_recreation_are_judged_with_the_model_load_on_top(
        tmp_path: Path) -> None:
    scenario = parse({**SCENARIO, "models": [{"name": "m", "load_seconds": "100s"}],
                      "expect": [{"fault": "crash", "traffic_off_within": "5s",
                                  "recovered_within": "20s",
                                  "capacity_restored_within": "20s"}]})
    sim = Simulation(scenario, tmp_path, io.StringIO())
    record = FaultRecord(scenario.faults[0], sim.groups[1])
    sim.records.append(record)
    record.mark("injected", 100.0)
    record.mark("traffic_off", 106.0)
    record.mark("recovered", 115.0)
    record.mark("capacity_restored", 115.0)
    # Kept its pods: nothing loaded, the limits are as written (traffic off is late).
    assert sim.judge() == ["crash: traffic off after 6.00 s (expected within 5 s)"]
    record.times["traffic_off"] = 104.0
    record.mark("restarted", 105.0)
    record.times["recovered"] = record.times["capacity_restored"] = 215.0
    assert sim.judge() == []  # 115 s ≤ 20 s + 100 s of load
    record.times["capacity_restored"] = 225.0
    assert sim.judge() == ["crash: capacity restored after 125.00 s (expected within 20 s "
                           "+ 100 s of model load)"]


def test_capacity_is_restored_once_every_group_of_the_model_serves() -> None:
    scenario = parse(SCENARIO)
    groups = groups_of(scenario)
    view = serving_view("10.0.9.9")
    view.groups = groups
    record = FaultRecord(scenario.faults[0], groups[1], leader_ip="10.0.9.9")
    record.mark("injected")
    record.mark("traffic_off")
    # m-1 serves again; m-0's leader is not a ready endpoint: recovered, capacity not yet.
    assert update(record, view) == ["recovered"]
    view.on_slice("ADDED", {
        "metadata": {"name": "m-y", "labels": {"kubernetes.io/service-name": "m"}},
        "endpoints": [{"addresses": ["10.0.0.1"], "conditions": {"ready": True}}]})
    assert update(record, view) == ["capacity_restored"]
