"""How long the test suite's real control plane takes to start once its binary is cached.

Figures: ``cluster_start_seconds`` (median over runs: etcd + kube-apiserver from process
start to ``/readyz`` ok), ``cluster_start_seconds_max``, ``crds_established_seconds``
(installing our LWS and HTTPRoute CRDs until Established), and ``binary_build_seconds``
(0 when the cached binary was reused; a cold build is minutes).
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from simulator.controlplane.cluster import KubeTestCluster, build_binary


def run(quick: bool = False) -> dict[str, Any]:
    started = time.monotonic()
    binary = build_binary()
    build_seconds = time.monotonic() - started
    starts, crds = [], []
    for _ in range(1 if quick else 3):
        with tempfile.TemporaryDirectory(prefix="bench-kube-") as tmp:
            t0 = time.monotonic()
            cluster = KubeTestCluster.start(Path(tmp), binary)
            try:
                starts.append(time.monotonic() - t0)
                t1 = time.monotonic()
                asyncio.run(cluster.install_crds())
                crds.append(time.monotonic() - t1)
            finally:
                cluster.stop()
    return {
        "cluster_start_seconds": round(statistics.median(starts), 2),
        "cluster_start_seconds_max": round(max(starts), 2),
        "crds_established_seconds": round(statistics.median(crds), 2),
        "binary_build_seconds": round(build_seconds, 1),
        "runs": len(starts),
    }
