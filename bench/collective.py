"""All-reduce checks across eight hosts: how fast a hung rank is named, whether one slow
member among eight is found and how many rounds it takes, and what the checks cost.

Eight real sidecars, one per host (network namespace), each with its torch worker (gloo;
torch from the cached vLLM venv); rendezvous at rank 0.

- ``hung_rank_detect_s_over_deadline``: a random member's worker is stopped with SIGSTOP;
  from the start of the check that meets it, the time to the ``collective_hang`` finding
  naming it, minus the configured deadline (the worst over the trials);
- ``slow_member_rounds`` / ``slow_member_correct``: a different member's link held to 20
  Mbit/s by a tc token bucket in each trial (at least ten trials, every rank at least
  once); the most localization rounds used, and 1 if every trial named exactly the slow
  member;
- ``duty_cycle_percent``: the share of time spent in checks at the shipped defaults (a
  64 KiB check every 60 s, every tenth a full one: 64 KiB, 1 MiB, 16 MiB), from the
  measured cost of each kind of check.
"""

from __future__ import annotations

import os
import random
import signal
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.netns import Hosts
from simulator.processes import SidecarProcess, vllm_python
from supervisor.config import CollectiveSettings

DEADLINE = 5.0


def _group(work: Path, hosts: Hosts, python: str, **collective: Any) -> list[SidecarProcess]:
    cars = []
    for r in range(hosts.n):
        cars.append(SidecarProcess(work, f"h{r}-{time.monotonic_ns()}", {
            "sidecar": {"pod_name": f"llama-0-{r}", "pod_namespace": "serving",
                        "group_name": "llama", "group_index": "0", "group_size": hosts.n,
                        "rank": r, "peers": hosts.ips,
                        "peer_listen": f"{hosts.ips[r]}:{hosts.peer_port}"},
            "engine": {"enabled": False},
            "collective": {"enabled": True, "python": python, "deadline_seconds": DEADLINE,
                           "interface": "eth0", **collective}},
            netns=hosts.names[r], listen=f"{hosts.ips[r]}:0").start())
    cars[0].wait_for(lambda: cars[0].status()["collective"]["preflight_passed"],
                     timeout=300, what="preflight")
    return cars


def _stop(cars: list[SidecarProcess]) -> None:
    for car in cars:
        car.stop()


def hangs(work: Path, hosts: Hosts, python: str, trials: int) -> list[float]:
    cars = _group(work / "hangs", hosts, python, period_seconds=2.0, full_every=1000)
    leader = cars[0]
    rng = random.Random(3)
    over: list[float] = []
    try:
        for _ in range(trials):
            rank = rng.randrange(1, hosts.n)
            worker = cars[rank].collective_worker()
            os.kill(worker, signal.SIGSTOP)
            try:
                finding = leader.wait_for(lambda: leader.findings("collective_hang"),
                                          timeout=60, what="collective_hang", poll=0.02)[0]
                last = leader.status()["collective"]["last"]
            finally:
                os.kill(worker, signal.SIGCONT)
            named = finding["evidence"]["hung_ranks"] + finding["evidence"]["never_arrived"]
            assert named == [rank], f"named {named}, stopped {rank}"
            over.append(float(finding["first_seen"]) - float(last["started_at"]) - DEADLINE)
            leader.wait_for(lambda: not leader.findings("collective_hang"), timeout=60,
                            what="cleared")
    finally:
        _stop(cars)
    return over


def slow_members(work: Path, hosts: Hosts, python: str, trials: int
                 ) -> tuple[list[int], int]:
    cars = _group(work / "slow", hosts, python, period_seconds=1.0, full_every=1,
                  learn_checks=3, sizes_bytes=[65536, 4194304])
    leader = cars[0]
    order = list(range(hosts.n)) * (trials // hosts.n + 1)
    random.Random(5).shuffle(order)
    rounds: list[int] = []
    correct = 0
    try:
        leader.wait_for(lambda: leader.status()["collective"]["baseline_gbps"]["4194304"],
                        timeout=120, what="learned baseline")
        for member in order[:trials]:
            hosts.slow(member)
            try:
                finding = leader.wait_for(lambda: leader.findings("collective_slow"),
                                          timeout=120, what="collective_slow")[0]
            finally:
                hosts.heal()
            rounds.append(int(finding["evidence"]["rounds"]))
            correct += finding["evidence"]["slow_ranks"] == [member]
            leader.wait_for(lambda: not leader.findings("collective_slow"), timeout=120,
                            what="cleared")
    finally:
        _stop(cars)
    return rounds, correct


def mean_cost(work: Path, hosts: Hosts, python: str, seconds: float, full: bool) -> float:
    """Mean seconds one check takes with the shipped sizes: periodic (64 KiB) or full."""
    cars = _group(work / f"cost-{full}", hosts, python, period_seconds=0.5,
                  full_every=1 if full else 1_000_000)
    leader = cars[0]
    try:
        before = leader.status()["collective"]
        time.sleep(seconds)
        after = leader.status()["collective"]
    finally:
        _stop(cars)
    kind = "full_" if full else "periodic_"
    done: int = sum(v for k, v in after["checks"].items() if k.startswith(kind)) - \
        sum(v for k, v in before["checks"].items() if k.startswith(kind))
    busy = float(after["busy_seconds"]) - float(before["busy_seconds"])
    return busy / max(1, done)


def run(quick: bool = False) -> dict[str, Any]:
    python = vllm_python()
    defaults = CollectiveSettings()
    with tempfile.TemporaryDirectory(prefix="bench-collective-") as tmp:
        work = Path(tmp)
        hosts = Hosts(8).up()
        try:
            over = hangs(work, hosts, python, 3 if quick else 10)
            rounds, correct = slow_members(work, hosts, python, 3 if quick else 10)
            periodic = mean_cost(work, hosts, python, 15.0 if quick else 40.0, full=False)
            full = mean_cost(work, hosts, python, 15.0 if quick else 40.0, full=True)
        finally:
            hosts.down()
    # At the defaults, every full_every-th check is full, the rest periodic.
    per_check = ((defaults.full_every - 1) * periodic + full) / defaults.full_every
    duty = per_check / defaults.period_seconds * 100
    return {
        "hung_rank_detect_s_over_deadline": round(max(over), 3),
        "hung_rank_detect_s_over_deadline_median": round(statistics.median(over), 3),
        "hung_rank_trials": len(over),
        "deadline_seconds": DEADLINE,
        "slow_member_rounds": max(rounds),
        "slow_member_correct": 1 if correct == len(rounds) else 0,
        "slow_member_trials": len(rounds),
        "slow_member_named_right": correct,
        "check_seconds_periodic": round(periodic, 4),
        "check_seconds_full": round(full, 4),
        "duty_cycle_percent": round(duty, 4),
        "period_seconds": defaults.period_seconds,
        "ranks": 8,
    }
