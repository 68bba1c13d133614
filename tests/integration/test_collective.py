"""All-reduce checks between real sidecar processes and their torch workers (gloo): on
loopback, and across hosts in network namespaces with one host's link slowed by a tc token
bucket. The torch comes from the cached vLLM venv (tests/vllm/install.sh), which is what
``collective.python`` is for."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.netns import Hosts
from simulator.processes import SidecarProcess, free_port, vllm_python

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module", name="torch_python")
def _torch_python() -> str:
    return vllm_python()


def member(rank: int, peers: list[str], listen: str, torch_python: str, store_port: int,
           **collective: Any) -> dict[str, Any]:
    return {"sidecar": {"pod_name": f"llama-0-{rank}", "pod_namespace": "serving",
                        "group_name": "llama", "group_index": "0", "group_size": len(peers),
                        "rank": rank, "peers": peers, "peer_listen": listen},
            "engine": {"enabled": False},
            "collective": {"enabled": True, "python": torch_python, "port": store_port,
                           "deadline_seconds": 2.0, "period_seconds": 1.0,
                           **collective}}


def loopback_group(tmp_path: Path, torch_python: str, n: int, start: int | None = None,
                   **settings: Any) -> list[SidecarProcess]:
    ports = [free_port() for _ in range(n)]
    peers = [f"127.0.0.1:{p}" for p in ports]
    store = free_port()
    cars = [SidecarProcess(tmp_path, f"m{r}", member(r, peers, peers[r], torch_python, store,
                                                     **settings))
            for r in range(n)]
    for car in cars[:start if start is not None else n]:
        car.start()
    return cars


def collective(car: SidecarProcess) -> dict[str, Any]:
    result: dict[str, Any] = car.status()["collective"]
    return result


def stop_all(cars: list[SidecarProcess]) -> None:
    for car in cars:
        if car.proc is not None:
            car.stop()


def test_preflight_gates_readiness_then_a_stopped_rank_is_named(
        tmp_path: Path, torch_python: str) -> None:
    """Four ranks: /readyz waits for the preflight check; rank 2's worker stopped with
    SIGSTOP: collective_hang within the deadline of the next check, naming rank 2; the
    leader leaves traffic; SIGCONT: the next (periodic, small) check passes and the finding
    clears."""
    cars = loopback_group(tmp_path, torch_python, 4, full_every=1000)
    try:
        leader = cars[0]
        leader.wait_for(lambda: collective(leader)["preflight_passed"], timeout=120,
                        what="preflight")
        for car in cars:
            car.wait_for(lambda car=car: car.get("/readyz")[0] == 200, timeout=30,
                         what="ready after preflight")
        worker = cars[2].collective_worker()
        os.kill(worker, signal.SIGSTOP)
        try:
            finding = leader.wait_for(lambda: leader.findings("collective_hang"), timeout=30,
                                      what="collective_hang")[0]
            assert finding["evidence"]["never_arrived"] + finding["evidence"]["hung_ranks"] \
                == [2]
            assert "rank 2" in finding["message"]
            assert leader.get("/readyz")[0] == 503
        finally:
            os.kill(worker, signal.SIGCONT)
        leader.wait_for(lambda: not leader.findings("collective_hang"), timeout=30,
                        what="cleared")
    finally:
        stop_all(cars)


def test_a_rank_that_never_arrives_is_named(tmp_path: Path, torch_python: str) -> None:
    """Rank 3's sidecar never starts: once the others' workers are up (importing torch
    takes seconds), every periodic check names rank 3, and only it, as never arrived."""
    cars = loopback_group(tmp_path, torch_python, 4, start=3, preflight=False)
    try:
        leader = cars[0]

        def names_only_rank_3() -> list[dict[str, Any]]:
            found = leader.findings("collective_hang")
            return [f for f in found if f["evidence"]["never_arrived"] == [3]]
        finding = leader.wait_for(names_only_rank_3, timeout=120, what="rank 3 named")[0]
        assert finding["evidence"]["hung_ranks"] == []
        assert "never arrived at the rendezvous" in finding["message"]
    finally:
        stop_all(cars)


@pytest.fixture(scope="module", name="hosts")
def _hosts() -> Iterator[Hosts]:
    hosts = Hosts(8).up()
    yield hosts
    hosts.down()


def netns_group(tmp_path: Path, torch_python: str, hosts: Hosts, **settings: Any
                ) -> list[SidecarProcess]:
    store = 8089
    cars = [SidecarProcess(tmp_path, f"h{r}", member(
        r, hosts.ips, f"{hosts.ips[r]}:{hosts.peer_port}", torch_python, store,
        interface="eth0", **settings), netns=hosts.names[r], listen=f"{hosts.ips[r]}:0")
        for r in range(hosts.n)]
    for car in cars:
        car.start()
    cars[0].wait_for(lambda: collective(cars[0])["preflight_passed"], timeout=180,
                     what="preflight")
    return cars


@pytest.mark.netns
def test_slow_member_is_localized_across_hosts(tmp_path: Path, torch_python: str,
                                               hosts: Hosts) -> None:
    """Eight ranks on eight hosts learn their bandwidth; host 5's link is then held to
    20 Mbit/s by a token bucket: collective_slow, localized in 3 rounds to rank 5 and its
    node. Healed, the finding stays through the first healthy full check and clears at the
    second (``clear_after_checks``: a straggler passing one check keeps its finding)."""
    cars = netns_group(tmp_path, torch_python, hosts, learn_checks=2, full_every=2,
                       sizes_bytes=[65536, 4194304])
    try:
        leader = cars[0]
        leader.wait_for(lambda: collective(leader)["baseline_gbps"]["4194304"], timeout=120,
                        what="learned baseline")
        hosts.slow(5)
        finding = leader.wait_for(lambda: leader.findings("collective_slow"), timeout=120,
                                  what="collective_slow")[0]
        assert finding["evidence"]["slow_ranks"] == [5]
        assert finding["evidence"]["rounds"] == 3
        assert finding["subject"]["id"] == "serving/llama/0/member-5"
        assert "localized in 3 round(s) to rank 5" in finding["message"]
        healthy_before = collective(leader)["checks"].get("full_ok", 0)
        hosts.heal()

        def cleared() -> dict[str, Any] | None:
            status = leader.status()
            healthy = status["collective"]["checks"].get("full_ok", 0) - healthy_before
            slow = [f for f in status["findings"] if f["fault_class"] == "collective_slow"]
            if healthy < 2:
                assert slow, f"cleared after {healthy} healthy full check(s)"
                return None
            assert not slow or healthy == 2, "still slow after 3 healthy full checks"
            return None if slow else status
        leader.wait_for(cleared, timeout=120, what="collective_slow cleared", poll=0.1)
    finally:
        hosts.heal()
        stop_all(cars)


@pytest.mark.netns
def test_a_rank_that_crashes_mid_collective_is_named(tmp_path: Path, torch_python: str,
                                                     hosts: Hosts) -> None:
    """Rank 2's link slowed so its all-reduces take seconds, and its worker killed while
    one is under way: the check names rank 2 as the one that never finished."""
    cars = netns_group(tmp_path, torch_python, hosts, full_every=1,
                       sizes_bytes=[65536, 4194304], deadline_seconds=10.0)
    try:
        hosts.slow(2, "8mbit")
        leader = cars[0]

        def in_collective() -> bool:
            running = collective(leader)["running"]
            return bool(running and time.time() - running["started_at"] > 0.5)
        leader.wait_for(in_collective, timeout=60, what="a check under way", poll=0.02)
        os.kill(cars[2].collective_worker(), signal.SIGKILL)
        finding = leader.wait_for(lambda: leader.findings("collective_hang"), timeout=60,
                                  what="collective_hang")[0]
        assert finding["evidence"]["hung_ranks"] == [2]
        assert "rank 2" in finding["message"] and "never finished" in finding["message"]
    finally:
        hosts.heal()
        stop_all(cars)
