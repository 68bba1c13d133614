"""End to end on the simulated cluster: from a fault to traffic off the sick replica.

``python -m bench e2e`` (``--quick``: 3 trials per kind instead of 20) starts the simulated
cluster of ``gpu-supervisor simulate`` once — real control plane, twelve kwok nodes, four
groups of one model, the chart's daemons as real processes with the shipped settings, the
shipped policy acting (its cooldown set to 0 so that one group can be failed twenty times in
a row) — and injects each fault kind again and again, each into a serving group. A
recreated group serves only once its engine has loaded the model (the simulator's default
for a 70B model, ``MODEL_LOAD_SECONDS``, 120 s), so up to three trials run at once, each in
a group of its own, one group always serving while others reload. Every time is measured
from outside, on the API server: *traffic off* is the moment the replica's leader stops
being a ready endpoint of its model's EndpointSlice.

Printed per kind (seconds): ``<kind>_traffic_off_s_p50``/``_p99``, ``<kind>_detect_s_p99``
(the daemon's first finding), ``<kind>_recovered_s_p50``/``_p99`` (back in the
EndpointSlice: with new pods, that includes the model load), and of the requests the load
generator (20 a second over the serving groups) sent to the replica before its traffic was
off: ``<kind>_requests_to_sick_p99`` (all of them), ``<kind>_requests_lost_p99`` (failed or
hung: what the fault cost) and ``<kind>_requests_answered_by_sick_p99`` (answered all the
same). Kinds: ``xid_fatal`` (XID 79),
``engine_crash`` (the leader's engine exits), ``nccl_hang`` (a worker pod's engine process
stopped with SIGSTOP while requests run: the leader's engine waits for that rank at every
step, as it would for a rank hung in a collective — seen only by the leader's sidecar, the
worker having no endpoint), and ``partition`` (a worker's node cut off from the rest of its
group with iptables: heartbeats and the engine's own traffic).

Baselines (``baseline_<kind>_traffic_off_s``) are the documented timers of the stock stack
(vLLM, Kubernetes probes, LWS) for the same fault; none of them can be measured here within
minutes (see the README for each timer's source).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from simulator.run import Simulation
from simulator.scenario import MODEL_LOAD_SECONDS, Fault, Target, parse
from simulator.timeline import FaultRecord
from simulator.world import GroupRef

TRIALS = 20
KINDS = {  # figure name → (fault kind, rank hit)
    "xid_fatal": ("xid", 1),
    "engine_crash": ("engine_crash", 0),
    "nccl_hang": ("engine_hang", 1),
    "partition": ("partition", 1),
}
BASELINES = {  # seconds until today's stack takes the replica out of traffic
    # Nothing reads XIDs; the other ranks wait in their collective until vLLM's
    # VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS (300 s) ends the engine.
    "xid_fatal": 300.0,
    # vLLM's API server exits 5 s after its engine dies (watchdog_loop), then the container.
    "engine_crash": 5.0,
    # /health stays 200 while hung: the first timer is VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS.
    "nccl_hang": 300.0,
    # The node lifecycle controller marks the node NotReady after node-monitor-grace-period
    # (50 s) — only if the whole node is cut; a link between two nodes: never.
    "partition": 50.0,
}
# Four groups of two pods on twelve nodes: up to three trials at once, each with its node
# quarantined until its group is back, still leaves a node to recreate a group on.
GROUPS, NODES = 4, 12
# A recreated group serves once it has loaded its model: the simulator's default for a 70B
# model (simulator.scenario.MODEL_LOAD_SECONDS), plus time to be recreated and ready.
RECOVERY_TIMEOUT_S = MODEL_LOAD_SECONDS + 180.0


def _scenario() -> Any:
    return parse({
        "name": "bench-e2e", "description": "each fault kind again and again",
        "cluster": {"nodes": NODES, "gpus_per_node": 8},
        "models": [{"name": "llama-70b", "replicas": GROUPS, "size": 2}],
        "policy": {"cooldown": "0s", "circuit_breaker": {"max_actions": 100000,
                                                         "window": "10m"}},
        "faults": [], "expect": [], "duration": "1s"}, "bench e2e")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))
    return round(ordered[index], 3)


def _reached(record: FaultRecord, step: str) -> Callable[[], bool]:
    return lambda: step in record.times


async def _free_group(sim: Simulation, busy: set[str]) -> GroupRef:
    """A serving group no trial holds, marked held before anything else can take it."""
    def free() -> GroupRef | None:
        return next((g for g in sim.groups if g.name not in busy and sim.view.serving(g)),
                    None)

    if not await sim.watch_until(lambda: free() is not None, RECOVERY_TIMEOUT_S):
        raise TimeoutError(f"no group free and serving within {RECOVERY_TIMEOUT_S:.0f} s "
                           f"(held: {', '.join(sorted(busy))})")
    group = free()
    assert group is not None
    busy.add(group.name)
    return group


async def _trials(sim: Simulation, trials: int) -> dict[str, list[FaultRecord]]:
    """``trials`` of each kind, kinds taken in turn, up to ``GROUPS - 1`` at once (each in a
    group of its own while it serves), so that one group always takes traffic while the
    others reload their model."""
    assert sim.runtime is not None
    done: dict[str, list[FaultRecord]] = {name: [] for name in KINDS}
    busy: set[str] = set()
    slots = asyncio.Semaphore(GROUPS - 1)

    async def trial(name: str, i: int) -> None:
        kind, rank = KINDS[name]
        async with slots:
            group = await _free_group(sim, busy)
            try:
                fault = Fault(f"{name}-{i}", 0.0, kind,
                              Target(group.model.name, group.index, rank),
                              {"gpu": i % 8, "code": 79})
                record = await sim.inject(fault)
                if kind == "partition":
                    # The cut link is repaired once the replica is out of traffic: the
                    # group, if recreated, may land on the same two nodes.
                    await sim.watch_until(_reached(record, "traffic_off"),
                                          RECOVERY_TIMEOUT_S)
                    await sim.heal(record)
                if not await sim.watch_until(_reached(record, "recovered"),
                                             RECOVERY_TIMEOUT_S):
                    raise TimeoutError(f"{name} trial {i}: not recovered within "
                                       f"{RECOVERY_TIMEOUT_S:.0f} s: {record.as_json()}")
                await sim.heal(record)
                done[name].append(record)
            finally:
                busy.discard(group.name)

    async with asyncio.TaskGroup() as tasks:
        for i in range(trials):
            for name in KINDS:
                tasks.create_task(trial(name, i))
    return done


def run(quick: bool = False) -> dict[str, Any]:
    trials = 3 if quick else TRIALS
    workdir = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    try:
        sim = Simulation(_scenario(), workdir, sys.stderr)

        async def go() -> dict[str, list[FaultRecord]]:
            async with sim.started():
                return await _trials(sim, trials)

        records = asyncio.run(go())
    finally:
        if not os.environ.get("BENCH_KEEP_WORKDIR"):
            shutil.rmtree(workdir, ignore_errors=True)
    figures: dict[str, Any] = {"trials_per_kind": trials, "load_seconds": MODEL_LOAD_SECONDS,
                               "groups": GROUPS}
    for name, found in records.items():
        for step, label in (("traffic_off", "traffic_off_s"), ("detected", "detect_s"),
                            ("recovered", "recovered_s")):
            values = [v for r in found if (v := r.at(step)) is not None]
            if step in ("traffic_off", "recovered"):
                figures[f"{name}_{label}_p50"] = _percentile(values, 50)
            figures[f"{name}_{label}_p99"] = _percentile(values, 99)
        splits = [r.sick_split() for r in found]
        figures[f"{name}_requests_to_sick_p99"] = _percentile(
            [float(r.sick_requests) for r in found], 99)
        # What the fault cost, apart from what the sick replica still answered.
        figures[f"{name}_requests_lost_p99"] = _percentile(
            [float(c["failed"] + c["hung"]) for c in splits], 99)
        figures[f"{name}_requests_answered_by_sick_p99"] = _percentile(
            [float(c["answered"]) for c in splits], 99)
        figures[f"baseline_{name}_traffic_off_s"] = BASELINES[name]
    figures["baseline_source"] = "documented timers of vLLM, Kubernetes and LWS (README)"
    return figures
