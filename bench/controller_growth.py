"""How the controller's cost grows with the fleet: ``controller_scale``'s set-up (GPU-sized
Node objects, LWS groups of 8, a pod-bound report token per node, TLS, the agents' default
10 s heartbeat, faults one at a time, then a storm on 5 % of the nodes) at 1,024, 4,096
and 16,384 nodes, each on a fresh test cluster.

Per size: ``cpu_us_per_report`` (the controller's CPU time over the measured period — reports,
watches, the burst's actions, everything — divided by the reports it accepted meanwhile),
``rss_mib`` and ``rss_kib_per_node`` (resident memory at the end over the node count),
``decision_ms_p99`` (outside: report sent → gate False seen on a watch, faults one at a
time) and ``decision_internal_ms_p99`` (inside: report received → first write answered,
over every fault, the storm's too),
``burst_decision_ms_p99`` (the same for a storm of 5 % of the nodes) and
``reports_per_second``; from the second size on, ``rss_kib_per_added_node``: the memory each
node added beyond the previous size.

On the last line's object, also the worst over the sizes: ``cpu_us_per_report``,
``rss_kib_per_node``, and ``nodes_per_core`` — how many nodes one controller core absorbs at
the default heartbeat from the worst measured CPU per report
(1 s / cpu_us_per_report * heartbeat). And the split of the controller's CPU into a fixed
part and a part per report, fitted (least squares) over the sizes' CPU per second against
their reports per second: ``fixed_cpu_ms_per_s`` (Lease, timers, watches: what it spends
with no reports at all) and ``cpu_us_per_added_report`` (what each further report costs).
"""

from __future__ import annotations

import asyncio
import itertools
import tempfile
from pathlib import Path
from typing import Any

from bench.controller_scale import HEARTBEAT, _scenario
from simulator.controlplane.cluster import KubeTestCluster, build_binary
from supervisor.tls import lean_tls_buffers

SIZES = (1024, 4096, 16384)
QUICK_SIZES = (256, 512)


def _one(nodes: int) -> dict[str, Any]:
    binary = build_binary()
    with tempfile.TemporaryDirectory(prefix="bench-growth-") as tmp:
        cluster = KubeTestCluster.start(Path(tmp) / "kube", binary)
        try:
            figures = asyncio.run(_scenario(cluster, Path(tmp), nodes, 8,
                                            warmup=HEARTBEAT, settle=10.0))
        finally:
            cluster.stop()
    return {"nodes": figures["nodes"], "cpu_us_per_report": figures["cpu_us_per_report"],
            "rss_mib": figures["rss_mib"],
            "rss_kib_per_node": round(figures["rss_mib"] * 1024 / max(1, figures["nodes"]),
                                      1),
            "decision_ms_p99": figures["decision_ms_p99"],
            # report received → first write answered, inside the controller, over every
            # fault (the storm's too): beside the outside figures, where a tail comes from
            "decision_internal_ms_p99": figures["decision_internal_ms_p99"],
            "burst_decision_ms_p99": figures["burst_decision_ms_p99"],
            "reports_per_second": figures["reports_per_second"],
            "reports_dropped": figures["reports_dropped"]}


def cost_split(sizes: list[dict[str, Any]]) -> dict[str, float]:
    """CPU per second = fixed + per report x reports per second, fitted over the sizes."""
    points = [(s["reports_per_second"], s["cpu_us_per_report"] * s["reports_per_second"] / 1e3)
              for s in sizes]  # (reports/s, CPU ms/s)
    if len(points) < 2:
        return {}
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    if not spread:
        return {}
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / spread  # ms per report
    return {"fixed_cpu_ms_per_s": round(mean_y - slope * mean_x, 1),
            "cpu_us_per_added_report": round(slope * 1e3, 1)}


def run(quick: bool = False) -> dict[str, Any]:
    lean_tls_buffers()  # the load generator holds a TLS stream per agent, as the controller
    per_size: dict[str, Any] = {}
    for nodes in QUICK_SIZES if quick else SIZES:
        per_size[str(nodes)] = _one(nodes)
        print(f"controller_growth {nodes} nodes: {per_size[str(nodes)]}", flush=True)
    # What each node added beyond the previous size: the per-node cost without the fixed
    # part (interpreter, libraries), which total/nodes spreads thinner as the fleet grows.
    sizes = list(per_size.values())
    for smaller, larger in itertools.pairwise(sizes):
        larger["rss_kib_per_added_node"] = round(
            (larger["rss_mib"] - smaller["rss_mib"]) * 1024
            / max(1, larger["nodes"] - smaller["nodes"]), 1)
    cpu = max(s["cpu_us_per_report"] for s in sizes)
    return {"sizes": per_size, "cpu_us_per_report": cpu, **cost_split(sizes),
            "rss_kib_per_node": max(s["rss_kib_per_node"] for s in sizes),
            "rss_kib_per_added_node": max((s.get("rss_kib_per_added_node", 0.0)
                                           for s in sizes), default=0.0),
            "nodes_per_core": int(1e6 / cpu * HEARTBEAT) if cpu else None}
