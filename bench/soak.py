"""A noisy cluster that needs nothing done: every action the supervisor takes is one too many.

``python -m bench soak`` (``--quick``: 3 minutes; ``BENCH_SOAK_MINUTES`` to change the
default 30) runs the simulated cluster of ``gpu-supervisor simulate`` — the shipped settings
and the shipped policy, acting — under noise a healthy fleet produces:

- single-sample thermal blips: a GPU reads 95 °C for one to two seconds;
- XID 13 and XID 45 bursts (an application's illegal memory access, a preempted context)
  of 1 to 20 events, each on a GPU whose turn it is in a shuffled round of every GPU: an
  application crashing here and there — not one GPU failing again and again, which the
  agent escalates by design (an XID in 3 separate incidents on one GPU within 10 minutes);
- transient spikes: an engine three times slower for a few seconds;
- 1 % of every heartbeat between the group's members dropped at random, all along
  (iptables ``statistic`` on the loopback addresses the sidecars use; needs root).

It counts ``unnecessary_actions``: replicas taken out of their Service, pods deleted, nodes
quarantined — seen on the API server, as ``gpu-supervisor simulate`` sees them — and prints
``minutes`` actually run and ``noise_events`` injected.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from simulator.fleet import CUT_TAG
from simulator.processes import EngineProcess
from simulator.run import Simulation
from simulator.scenario import parse
from simulator.world import GROUP_LABEL
from supervisor.controller.actions import QUARANTINE_TAINT

MINUTES = float(os.environ.get("BENCH_SOAK_MINUTES", "30"))
LOSS = 0.01


def _scenario() -> Any:
    return parse({
        "name": "bench-soak", "description": "noise that needs nothing done",
        "cluster": {"nodes": 6, "gpus_per_node": 8},
        "models": [{"name": "llama-70b", "replicas": 2, "size": 2}],
        "faults": [], "expect": [], "duration": "1s"}, "bench soak")


class Actions:
    """Every action seen on the API server: a leader endpoint going not ready, a pod of a
    group deleted, a node tainted by us."""

    def __init__(self, sim: Simulation) -> None:
        self._sim = sim
        self.seen: list[str] = []
        self._uids = self._pod_uids()

    def _pod_uids(self) -> set[str]:
        return {p["metadata"]["uid"] for p in self._sim.view.pods.values()
                if p["metadata"].get("labels", {}).get(GROUP_LABEL)}

    def check(self) -> None:
        view = self._sim.view
        for group in self._sim.groups:
            if not view.serving(group) and f"{group.name} out of traffic" not in self.seen:
                self.seen.append(f"{group.name} out of traffic")
        gone = self._uids - self._pod_uids()
        if gone:
            self.seen.append(f"{len(gone)} pod(s) deleted")
            self._uids = self._pod_uids()
        for node, taints in view.taints.items():
            if QUARANTINE_TAINT in taints and f"{node} quarantined" not in self.seen:
                self.seen.append(f"{node} quarantined")


def _loss_rules(sim: Simulation, add: bool) -> None:
    assert sim.runtime is not None
    rule = ["INPUT", "-i", "lo", "-p", "udp", "--dport", "18088", "-m", "statistic",
            "--mode", "random", "--probability", str(LOSS), "-m", "comment", "--comment",
            CUT_TAG, "-j", "DROP"]
    subprocess.run(["iptables", "-w", "-I" if add else "-D", *rule], check=add,
                   capture_output=True)


async def _noise(sim: Simulation, minutes: float, rng: random.Random) -> dict[str, int]:
    assert sim.runtime is not None
    runtime = sim.runtime
    counts = {"thermal_blips": 0, "xid_bursts": 0, "engine_spikes": 0}
    actions = Actions(sim)
    gpus = [(node, gpu) for node in sorted(runtime.agents)
            for gpu in range(sim.scenario.gpus_per_node)]
    xid_round: list[tuple[str, int]] = []
    end = time.monotonic() + minutes * 60
    while time.monotonic() < end:
        await sim.watch_until(lambda: False, rng.uniform(2.0, 6.0))
        actions.check()
        what = rng.choice(("thermal", "xid", "spike"))
        if what == "thermal":
            node = rng.choice(sorted(runtime.agents))
            gpu = rng.randrange(sim.scenario.gpus_per_node)
            control = runtime.agents[node].control
            await asyncio.to_thread(control.set, gpu, temp=95)
            await sim.watch_until(lambda: False, rng.uniform(1.0, 2.0))
            await asyncio.to_thread(control.unset, f"gpu.{gpu}.temp")
            counts["thermal_blips"] += 1
        elif what == "xid":
            if not xid_round:
                xid_round = rng.sample(gpus, len(gpus))
            node, gpu = xid_round.pop()
            control = runtime.agents[node].control
            await asyncio.to_thread(control.inject_xid, gpu, rng.choice((13, 45)),
                                    rng.randint(1, 20))
            counts["xid_bursts"] += 1
        else:
            # Only a leader pod's engine has an API to slow down (workers have none).
            engine = rng.choice([p.engine for p in runtime.pods.values()
                                 if isinstance(p.engine, EngineProcess)])
            await asyncio.to_thread(engine.control, slow=3)
            await sim.watch_until(lambda: False, rng.uniform(2.0, 4.0))
            await asyncio.to_thread(engine.control, slow=1)
            counts["engine_spikes"] += 1
        actions.check()
    await sim.watch_until(lambda: False, 30.0)  # the last noise's aftermath
    actions.check()
    counts["unnecessary_actions"] = len(actions.seen)
    if actions.seen:
        print(f"soak: unnecessary actions: {actions.seen}", file=sys.stderr)
    return counts


def run(quick: bool = False) -> dict[str, Any]:
    minutes = 3.0 if quick else MINUTES
    if os.geteuid() != 0 or shutil.which("iptables") is None:
        raise PermissionError("bench soak drops 1 % of the heartbeats with iptables: run it "
                              "as root with iptables installed")
    workdir = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    rng = random.Random(int(os.environ.get("BENCH_SEED", "7")))
    try:
        sim = Simulation(_scenario(), workdir, sys.stderr)

        async def go() -> tuple[dict[str, int], float]:
            async with sim.started():
                _loss_rules(sim, add=True)
                try:
                    t0 = time.monotonic()
                    counts = await _noise(sim, minutes, rng)
                    return counts, (time.monotonic() - t0) / 60
                finally:
                    _loss_rules(sim, add=False)

        counts, ran = asyncio.run(go())
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    noise = counts.pop("thermal_blips") + counts.pop("xid_bursts") + counts.pop("engine_spikes")
    return {"minutes": round(ran, 1), "noise_events": noise,
            "heartbeat_loss": LOSS, **counts}
