"""A sidecar starved of CPU is not a partition: real sidecar processes, each on its own host
(a network namespace), one of them stopped, held to a 50m CPU limit by a cgroup, or sharing
its core with busy processes — no member raises a partition finding. A real cut is still
found afterwards (its latency is ``python -m bench detection``'s figure, ten minutes of
this is its ``false_findings_cpu_starved``)."""

from __future__ import annotations

import time

import pytest

from bench.netns import Hosts
from simulator.processes import SidecarProcess
from simulator.starve import cpu_hog, cpu_quota, stop_for, throttled_seconds
from tests.integration.test_partitions import (  # noqa: F401 (the same four sidecars)
    _group,
    _hosts,
)

pytestmark = pytest.mark.netns


def raised_anywhere(cars: list[SidecarProcess]) -> list[str]:
    """Every partition finding raised by any member since it started, active or cleared."""
    out = []
    for car in cars:
        status = car.status()
        out += [f"{car.name}: {f['message']}" for f in status["findings"]
                + status["recently_cleared"] if f["fault_class"] == "partition"]
    return out


def pid(car: SidecarProcess) -> int:
    assert car.proc is not None and car.proc.poll() is None, car.log()[-2000:]
    return car.proc.pid


def test_a_sidecar_stopped_again_and_again_is_never_a_partition(
        hosts: Hosts, group: list[SidecarProcess]) -> None:
    """Member 2 stopped (SIGSTOP) for 1.5 s, twelve times, 3 s apart: no member raises a
    partition finding; member 2 counted its twelve pauses and the others heard of them in
    its heartbeats. Then member 2 really cut off is found by everyone."""
    for _ in range(12):
        stop_for(pid(group[2]), 1.5)
        time.sleep(3.0)
    assert raised_anywhere(group) == []
    health = group[2].status()["group"]["local_health"]
    assert health["pauses"] >= 12, health
    assert health["paused_seconds"] >= 12 * 1.4, health
    heard = group[0].status()["group"]["messages"]
    assert heard.get("peer_pauses_announced", 0) >= 12, heard
    hosts.isolate(2)
    for car in (group[0], group[1], group[3]):
        car.wait_for(lambda car=car: car.findings("partition"), timeout=30,
                     what="member 2 found cut off")


def test_a_sidecar_at_a_50m_cpu_limit_is_never_a_partition(
        group: list[SidecarProcess]) -> None:
    """Member 1 in a cgroup of its own with a CPU limit of 50m (5 ms per 100 ms period)
    for a minute, its metrics and status asked for back to back (a scraper gone wild), so
    that it spends its quota early in every period and the kernel holds it back for the
    rest: no finding anywhere."""
    with cpu_quota(pid(group[1]), 50) as cgroup:
        end = time.monotonic() + 60
        while time.monotonic() < end:
            group[1].metrics()
            group[1].status()
        throttled = throttled_seconds(cgroup)
    assert raised_anywhere(group) == []
    # The limit bit: the kernel held the sidecar back (else this proved nothing).
    assert throttled > 1.0, throttled


def test_a_sidecar_sharing_its_cores_with_busy_processes_is_never_a_partition(
        group: list[SidecarProcess]) -> None:
    """Two busy-looping processes on every core member 3 runs on, for a minute: no
    finding anywhere."""
    with cpu_hog(pid(group[3]), seconds=70):
        time.sleep(60)
    assert raised_anywhere(group) == []
