"""Partitions between real sidecar processes, each on its own host (a network namespace),
cut with iptables: every kind of cut is classified correctly by every member, and random
loss raises nothing."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.netns import Hosts
from simulator.processes import SidecarProcess

pytestmark = pytest.mark.netns

N = 4


def group_settings(hosts: Hosts, rank: int) -> dict[str, object]:
    return {"sidecar": {"pod_name": f"llama-0-{rank}", "pod_namespace": "serving",
                        "group_name": "llama", "group_index": "0", "group_size": hosts.n,
                        "rank": rank, "peers": hosts.ips,
                        "peer_listen": f"{hosts.ips[rank]}:{hosts.peer_port}"},
            "engine": {"enabled": False}}


@pytest.fixture(scope="module", name="hosts")
def _hosts() -> Iterator[Hosts]:
    hosts = Hosts(N).up()
    yield hosts
    hosts.down()


@pytest.fixture(name="group")
def _group(hosts: Hosts, tmp_path: Path) -> Iterator[list[SidecarProcess]]:
    cars = [SidecarProcess(tmp_path, f"m{r}", group_settings(hosts, r), netns=hosts.names[r],
                           listen=f"{hosts.ips[r]}:0").start() for r in range(hosts.n)]
    try:
        for car in cars:
            car.wait_for(lambda car=car: all(all(row) for row in
                                              car.status()["group"]["reachability"]),
                         what="everyone hears everyone")
        yield cars
    finally:
        hosts.heal()
        for car in cars:
            car.stop()


def partition(car: SidecarProcess) -> dict[str, tuple[str, str]]:
    return {f["subject"]["id"]: (f["reason"], f["evidence"]["kind"])
            for f in car.findings("partition")}


def settle(cars: list[SidecarProcess], seconds: float = 4.0) -> None:
    """Wait out detection (≈2 s) and classification with room to spare."""
    time.sleep(seconds)
    for car in cars:
        assert car.proc is not None and car.proc.poll() is None, car.log()[-2000:]


def test_link_cut_both_ways(hosts: Hosts, group: list[SidecarProcess]) -> None:
    """1 and 2 cannot reach each other: both name the link, cut both ways; 0 and 3, which
    reach both, say nothing; the two ends leave traffic (/readyz 503)."""
    hosts.cut(1, 2)
    settle(group)
    link = "serving/llama/0/link/1-2"
    assert partition(group[1]) == {link: ("LinkCut", "link_cut")}
    assert partition(group[2]) == {link: ("LinkCut", "link_cut")}
    assert partition(group[0]) == partition(group[3]) == {}
    assert group[1].get("/readyz")[0] == 503
    matrix = group[0].status()["group"]["reachability"]
    assert (matrix[1][2], matrix[2][1], matrix[0][1]) == (False, False, True)
    hosts.heal()
    group[1].wait_for(lambda: not partition(group[1]), what="healed")
    assert group[1].get("/readyz")[0] == 200


def test_link_cut_one_way(hosts: Hosts, group: list[SidecarProcess]) -> None:
    """Datagrams 1 → 2 are dropped, 2 → 1 flow: 2 names the link cut one way, from 1 to 2;
    1 still hears 2 and says nothing."""
    hosts.cut(1, 2, one_way=True)
    settle(group)
    (finding,) = group[2].findings("partition")
    assert (finding["reason"], finding["evidence"]["from_rank"],
            finding["evidence"]["to_rank"]) == ("LinkCutOneWay", 1, 2)
    assert partition(group[1]) == partition(group[0]) == partition(group[3]) == {}


def test_member_isolated(hosts: Hosts, group: list[SidecarProcess]) -> None:
    """3 cut from everyone: it knows it is the one cut off; the others see it unreachable
    (nobody hears it, no indirect probe reaches it)."""
    hosts.isolate(3)
    settle(group)
    assert partition(group[3]) == {"serving/llama-0-3": ("MemberIsolated", "isolated")}
    for car in group[:3]:  # peers given as IPs are named by rank
        assert partition(car) == {"serving/llama/0/member-3": ("PeerUnreachable",
                                                               "peer_unreachable")}


def test_peer_process_killed(hosts: Hosts, group: list[SidecarProcess]) -> None:
    """0's sidecar is killed, its host stays up and answers 'port unreachable': the others
    report it down."""
    assert group[0].proc is not None
    group[0].proc.kill()
    settle(group[1:])
    for car in group[1:]:
        assert partition(car) == {"serving/llama/0/member-0": ("PeerDown", "peer_down")}


def test_one_percent_random_loss_raises_nothing(hosts: Hosts,
                                                group: list[SidecarProcess]) -> None:
    """1 % of the heartbeats dropped at random on every host for 30 s: no finding
    anywhere (the ten-minute version is ``python -m bench detection``)."""
    hosts.loss(0.01)
    time.sleep(30)
    for car in group:
        assert car.findings() == []
        cleared = car.status()["recently_cleared"]
        assert cleared == [], json.dumps(cleared, indent=1)
