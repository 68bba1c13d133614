"""Ways to take the CPU away from a process, as production does to a sidecar: a CPU limit's
quota (the kernel throttles the container once it spent its share of each period), a
busy neighbour on the same cores, and a stop (a long GC pause, a frozen cgroup, SIGSTOP).

Used by the simulator's ``sidecar_starved`` fault, the starvation tests
(tests/integration/test_starvation.py) and ``python -m bench detection``
(``false_findings_cpu_starved``). Root only (cgroups).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PERIOD_US = 100_000  # the kernel's default CFS period, as Kubernetes leaves it


def _v2_cpu_root() -> Path | None:
    """The unified hierarchy's root, if it offers the cpu controller."""
    for root in (CGROUP_ROOT, CGROUP_ROOT / "unified"):
        controllers = root / "cgroup.controllers"
        if controllers.exists() and "cpu" in controllers.read_text().split():
            return root
    return None


@contextlib.contextmanager
def cpu_quota(pid: int, millicores: int) -> Iterator[Path]:
    """Run ``pid`` under a CPU limit of ``millicores`` (Kubernetes' ``resources.limits.cpu``:
    ``50m`` is 5 ms of CPU per 100 ms period) in a cgroup of its own, on cgroup v2
    (``cpu.max``) where the cpu controller is there, else v1 (``cpu.cfs_quota_us``). On
    leaving, the process goes back to the root group and the group is removed."""
    quota = PERIOD_US * millicores // 1000
    name = f"gpu-supervisor-starve-{uuid.uuid4().hex[:8]}"
    v2 = _v2_cpu_root()
    if v2 is not None:
        group, home = v2 / name, v2
        group.mkdir()
        (group / "cpu.max").write_text(f"{quota} {PERIOD_US}")
    else:
        home = CGROUP_ROOT / "cpu"
        if not (home / "cpu.cfs_quota_us").exists():
            raise RuntimeError("no cgroup cpu controller (v1 or v2) to limit a process with")
        group = home / name
        group.mkdir()
        (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
        (group / "cpu.cfs_quota_us").write_text(str(quota))
    (group / "cgroup.procs").write_text(str(pid))
    try:
        yield group
    finally:
        with contextlib.suppress(OSError):
            (home / "cgroup.procs").write_text(str(pid))
        with contextlib.suppress(OSError):
            group.rmdir()


def throttled_seconds(group: Path) -> float:
    """How long the kernel held the group back so far (``cpu.stat``)."""
    stat = dict(line.split() for line in (group / "cpu.stat").read_text().splitlines()
                if len(line.split()) == 2)
    if "throttled_usec" in stat:  # v2
        return int(stat["throttled_usec"]) / 1e6
    return int(stat.get("throttled_time", 0)) / 1e9  # v1: nanoseconds


_HOG = "import time\nend = time.monotonic() + float(__import__('sys').argv[1])\n" \
       "while time.monotonic() < end:\n    pass\n"


@contextlib.contextmanager
def cpu_hog(pid: int, seconds: float, per_core: int = 2) -> Iterator[list[int]]:
    """``per_core`` busy-looping processes on every core ``pid`` may run on (they end by
    themselves after ``seconds`` too, so a crashed caller leaves nothing spinning)."""
    cores = sorted(os.sched_getaffinity(pid))
    hogs = []
    try:
        for core in cores:
            for _ in range(per_core):
                proc = subprocess.Popen([sys.executable, "-c", _HOG, str(seconds)])
                os.sched_setaffinity(proc.pid, {core})
                hogs.append(proc)
        yield [h.pid for h in hogs]
    finally:
        for proc in hogs:
            proc.kill()
            proc.wait()


def stop_for(pid: int, seconds: float) -> None:
    """Stop ``pid`` for ``seconds``, then let it run again (whatever happens meanwhile)."""
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        os.kill(pid, signal.SIGCONT)
