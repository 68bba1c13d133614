"""How fast the sidecar sees what stops a replica, and that it sees nothing else.

Real processes throughout: sidecars (shipped defaults), the stand-in engine, a real vLLM
(CPU build, tiny random-weight model), hosts in network namespaces cut with iptables.

- ``engine_hang_detect_s_p99``: from the moment the engine stops under load to the
  sidecar's ``engine_hang`` finding, with the shipped defaults, per layout — the stand-in
  alone and as a leader with a worker, vLLM's engine core, a pipeline-parallel and a
  tensor-parallel vLLM's second rank (``python -m bench engine_hang``, which this runs);
  the headline figure is the worst layout.
- ``partition_detect_s_p99``: from the iptables rule (or the kill) to each expected
  member's partition finding, over every trial of every cut kind (default 0.25 s
  heartbeats). Four sidecars, one per host.
- ``partition_misclassified``: trials where any member's findings — the first reason seen
  and the settled set — differ from what the cut implies (both ways: both ends name the
  link; one way: the receiving end names it with its direction; isolated: the member says
  so and the others call it unreachable; killed: the others call it down), over
  ``partition_trials`` trials, each kind with a random choice of members.
- ``false_findings``: findings raised by four sidecars over ``loss_minutes`` with 1 % of
  all heartbeats dropped at random.
- ``false_findings_cpu_starved``: partition findings raised by four sidecars over
  ``starved_minutes`` while three of them are starved as production starves a sidecar:
  member 1 in a cgroup with a CPU limit of 50m, asked for its metrics and status back to
  back so the kernel throttles it all along; member 2 stopped (SIGSTOP) for 1.5 s every
  6 s; member 3 sharing each of its cores with two busy-looping processes.
  ``starved_throttled_s`` (time the kernel held member 1 back) and ``starved_pauses`` (the
  pauses member 2 noticed in itself) show the starvation was real.

``python -m bench detection`` takes about 55 minutes (``--quick``: about 12).
"""

from __future__ import annotations

import contextlib
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench import engine_hang
from bench.netns import Hosts
from simulator.processes import (
    SidecarProcess,
    metric_value,
)
from simulator.starve import cpu_hog, cpu_quota, stop_for, throttled_seconds


class Group:
    """Four sidecars, one per network-namespace host (engine probing off)."""

    def __init__(self, workdir: Path, hosts: Hosts) -> None:
        self.workdir = workdir
        self.hosts = hosts
        self.cars: list[SidecarProcess] = [self._car(r) for r in range(hosts.n)]

    def _car(self, rank: int) -> SidecarProcess:
        h = self.hosts
        return SidecarProcess(self.workdir, f"m{rank}-{time.monotonic_ns()}", {
            "sidecar": {"pod_name": f"llama-0-{rank}", "pod_namespace": "serving",
                        "group_name": "llama", "group_index": "0", "group_size": h.n,
                        "rank": rank, "peers": h.ips,
                        "peer_listen": f"{h.ips[rank]}:{h.peer_port}"},
            "engine": {"enabled": False}}, netns=h.names[rank], listen=f"{h.ips[rank]}:0")

    def start(self) -> Group:
        for car in self.cars:
            car.start()
        self.wait_quiet()
        return self

    def restart(self, rank: int) -> None:
        self.cars[rank].stop()
        self.cars[rank] = self._car(rank).start()

    def findings(self) -> list[dict[str, tuple[str, float]]]:
        """Per member: partition subject → (reason, first_seen)."""
        out = []
        for car in self.cars:
            try:
                out.append({f["subject"]["id"]: (f["reason"], float(f["first_seen"]))
                            for f in car.findings("partition")})
            except (OSError, AssertionError, ValueError):
                out.append({})  # a killed member
        return out

    def wait_quiet(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while any(self.findings()) or not all(
                all(all(row) for row in car.status()["group"]["reachability"])
                for car in self.cars):
            if time.monotonic() > deadline:
                raise TimeoutError(f"group not quiet: {self.findings()}")
            time.sleep(0.2)

    def stop(self) -> None:
        for car in self.cars:
            car.stop()


def _expected(kind: str, a: int, b: int, n: int) -> list[dict[str, str]]:
    link = f"serving/llama/0/link/{min(a, b)}-{max(a, b)}"
    member = f"serving/llama/0/member-{a}"
    want: list[dict[str, str]] = [{} for _ in range(n)]
    if kind == "both":
        want[a] = want[b] = {link: "LinkCut"}
    elif kind == "one_way":
        want[b] = {link: "LinkCutOneWay"}
    elif kind == "isolated":
        want[a] = {f"serving/llama-0-{a}": "MemberIsolated"}
        for r in range(n):
            if r != a:
                want[r] = {member: "PeerUnreachable"}
    else:  # killed
        for r in range(n):
            if r != a:
                want[r] = {member: "PeerDown"}
    return want


def partition_trial(group: Group, kind: str, rng: random.Random
                    ) -> tuple[list[float], bool]:
    """One cut: detection samples (seconds) and whether every member classified it
    right, first time and settled."""
    hosts, n = group.hosts, group.hosts.n
    a, b = rng.sample(range(n), 2)
    want = _expected(kind, a, b, n)
    first: list[dict[str, str]] = [{} for _ in range(n)]
    started = time.time()
    if kind == "both":
        hosts.cut(a, b)
    elif kind == "one_way":
        hosts.cut(a, b, one_way=True)
    elif kind == "isolated":
        hosts.isolate(a)
    else:
        car = group.cars[a]
        assert car.proc is not None
        car.proc.kill()
    samples: list[float] = []
    deadline = time.monotonic() + 15
    ok = True
    while True:
        seen = group.findings()
        for r in range(n):
            for subject, (reason, _) in seen[r].items():
                first[r].setdefault(subject, reason)
        if all(set(seen[r]) >= set(want[r]) for r in range(n)):
            for r in range(n):
                samples += [seen[r][s][1] - started for s in want[r]]
            break
        if time.monotonic() > deadline:
            ok = False
            break
        time.sleep(0.05)
    time.sleep(1.0)  # let it settle: a late or flipping classification counts too
    settled = [{s: reason for s, (reason, _) in m.items()} for m in group.findings()]
    if kind == "killed":
        settled[a] = want[a]  # a dead member says nothing
    ok = ok and settled == want and all(
        first[r].get(s) == reason for r in range(n) for s, reason in want[r].items()) and \
        all(set(first[r]) <= set(want[r]) for r in range(n))
    hosts.heal()
    if kind == "killed":
        group.restart(a)
    group.wait_quiet()
    return samples, ok


def partitions(workdir: Path, per_kind: int) -> tuple[list[float], int, int]:
    hosts = Hosts(4).up()
    group = Group(workdir / "partitions", hosts)
    rng = random.Random(11)
    samples: list[float] = []
    wrong = trials = 0
    try:
        group.start()
        for _ in range(per_kind):
            for kind in ("both", "one_way", "isolated", "killed"):
                got, ok = partition_trial(group, kind, rng)
                samples += got
                trials += 1
                wrong += 0 if ok else 1
    finally:
        with contextlib.suppress(Exception):
            group.stop()
        hosts.down()
    return samples, wrong, trials


def noise(workdir: Path, minutes: float) -> int:
    hosts = Hosts(4).up()
    group = Group(workdir / "noise", hosts)
    try:
        group.start()
        hosts.loss(0.01)
        time.sleep(minutes * 60)
        raised = 0.0
        for car in group.cars:
            text = car.get("/metrics")[1]
            for reason in ("warning", "critical"):
                raised += metric_value(text, "gpusupervisor_findings_raised_total",
                                       fault_class="partition", severity=reason) or 0.0
        return int(raised)
    finally:
        group.stop()
        hosts.down()


def starved(workdir: Path, minutes: float) -> dict[str, float]:
    hosts = Hosts(4).up()
    group = Group(workdir / "starved", hosts)
    try:
        group.start()
        cars = group.cars
        end = time.monotonic() + minutes * 60
        pids = [car.proc.pid for car in cars if car.proc is not None]
        stop = threading.Event()

        def stopper() -> None:
            while not stop.wait(4.5):
                stop_for(pids[2], 1.5)

        def scraper() -> None:
            while not stop.is_set():
                with contextlib.suppress(OSError, AssertionError):
                    cars[1].metrics()
                    cars[1].status()

        with cpu_quota(pids[1], 50) as cgroup, \
                cpu_hog(pids[3], seconds=minutes * 60 + 30):
            threads = [threading.Thread(target=t, daemon=True) for t in (stopper, scraper)]
            for t in threads:
                t.start()
            time.sleep(max(0.0, end - time.monotonic()))
            stop.set()
            for t in threads:
                t.join()
            throttled = throttled_seconds(cgroup)
        raised = 0.0
        for car in cars:
            raised += sum(metric_value(car.get("/metrics")[1],
                                       "gpusupervisor_findings_raised_total",
                                       fault_class="partition", severity=level) or 0.0
                          for level in ("warning", "critical"))
        pauses = cars[2].status()["group"]["local_health"]["pauses"]
        return {"false_findings_cpu_starved": int(raised),
                "starved_throttled_s": round(throttled, 1), "starved_pauses": pauses}
    finally:
        group.stop()
        hosts.down()


def run(quick: bool = False) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-detection-") as tmp:
        work = Path(tmp)
        hangs = engine_hang.layouts(work, 3 if quick else engine_hang.TRIALS)
        samples, wrong, trials = partitions(work, 2 if quick else 10)
        minutes = 1.0 if quick else 10.0
        false = noise(work, minutes)
        starvation = starved(work, minutes)
    return {
        **starvation,
        "starved_minutes": minutes,
        **engine_hang.figures(hangs),
        "partition_detect_s_p99": engine_hang.p99(samples),
        "partition_detect_s_median": round(statistics.median(samples), 3),
        "partition_misclassified": wrong,
        "partition_trials": trials,
        "false_findings": false,
        "loss_minutes": minutes,
        "loss_percent": 1.0,
    }
