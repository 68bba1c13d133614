"""Agent footprint on 8 stand-in GPUs at a 1 s probe interval.

Figures:
- ``cpu_percent_of_core``: CPU time the agent process used (user+system, from
  /proc/PID/stat) over a quiet window, as a percentage of one core;
- ``rss_mib``: resident memory at the end of the run (/proc/PID/status VmRSS);
- ``probe_round_ms_median``: the agent's own measure of a probe round — tick until all
  8 GPUs answered — median over the run;
- ``xid_to_finding_ms_p99`` (and p50, max): an XID line appended to the stand-in's event
  file → the finding visible in ``/status``, over distinct (GPU, XID) pairs so every
  sample is a new finding, not a dedup hit.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness import AgentProcess

CODES = [8, 11, 13, 31, 32, 48, 62, 64, 68, 74, 79, 94, 95, 109, 119]


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime, stime


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def run(quick: bool = False) -> dict[str, Any]:
    window = 10.0 if quick else 60.0
    samples = 24 if quick else 100
    settings = {"nvml": {"probe_interval_seconds": 1.0, "call_timeout_seconds": 5.0},
                "detectors": {}}
    with tempfile.TemporaryDirectory(prefix="bench-agent-") as tmp:
        agent = AgentProcess(Path(tmp), gpus=8, settings=settings)
        # Bench with the shipped detector defaults, not the test suite's fast ones.
        agent.settings["detectors"] = {}
        agent.start()
        try:
            assert agent.proc is not None
            pid = agent.proc.pid
            time.sleep(3.0)  # let start-up work (imports, first rounds) finish
            cpu0, t0 = _cpu_seconds(pid), time.monotonic()
            time.sleep(window)
            cpu1, t1 = _cpu_seconds(pid), time.monotonic()
            status = agent.status()
            latencies = []
            pairs = [(gpu, code) for code in CODES for gpu in range(8)][:samples]
            for gpu, code in pairs:
                started = time.perf_counter()
                agent.control.inject_xid(gpu, code)
                while not any(f["detail"] == str(code) for f in agent.findings("xid", gpu)):
                    if time.perf_counter() - started > 10:
                        raise TimeoutError(f"XID {code} on GPU {gpu} never became a finding")
                    time.sleep(0.002)
                latencies.append((time.perf_counter() - started) * 1000)
            rss = _rss_mib(pid)
        finally:
            agent.stop()
    probe = status["probe"]
    return {
        "gpus": 8,
        "probe_interval_seconds": 1.0,
        "window_seconds": round(t1 - t0, 1),
        "cpu_percent_of_core": round((cpu1 - cpu0) / (t1 - t0) * 100, 3),
        "rss_mib": round(rss, 1),
        "probe_round_ms_median": probe["round_ms_median"],
        "probe_rounds": probe["rounds_completed"],
        "xid_samples": len(latencies),
        "xid_to_finding_ms_p50": round(statistics.median(latencies), 2),
        "xid_to_finding_ms_p99": round(_percentile(latencies, 0.99), 2),
        "xid_to_finding_ms_max": round(max(latencies), 2),
    }
