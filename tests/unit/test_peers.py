"""Peer reachability on simulated time: the accrual detector, the gossip of rows, SWIM's
indirect probes and the classification of every kind of cut, through an in-memory network
that can drop chosen directions, kill members and lose packets at random. (The same code
runs over real UDP between network namespaces in tests/integration/test_partitions.py.)"""

from __future__ import annotations

import random

import pytest

from supervisor.config import SidecarSettings
from supervisor.detectors.peers import PeerDetector, PhiAccrual
from supervisor.findings import Finding, FindingBook, Subject
from supervisor.sidecar.membership import Membership


class Net:
    """n members on one simulated clock; delivery is instant unless dropped."""

    def __init__(self, n: int, loss: float = 0.0, seed: int = 1) -> None:
        self.settings = SidecarSettings()
        self.t = 100.0
        self.rng = random.Random(seed)
        self.loss = loss
        self.blocked: set[tuple[int, int]] = set()  # (from, to) dropped
        self.dead: set[int] = set()
        self.dead_host: set[int] = set()  # no ICMP either
        self.members = [
            Membership("g/0", r, f"boot-{r}", PeerDetector(
                "g/0", r, n, self.settings, lambda rank: Subject("pod", f"pod-{rank}"),
                self.t), fanout=3, rng=random.Random(seed + r))
            for r in range(n)]
        self.books = [FindingBook() for _ in range(n)]
        self.first_seen: dict[tuple[int, str], float] = {}
        for r, book in enumerate(self.books):
            book.subscribe(lambda tr, f, r=r: self._note(r, f))
        self._next_hb = [self.t + 0.01 * r for r in range(n)]

    def _note(self, rank: int, finding: Finding) -> None:
        self.first_seen.setdefault((rank, finding.key.subject_id), self.t)

    def send(self, src: int, dst: int, data: bytes) -> None:
        if dst in self.dead:
            if dst not in self.dead_host:  # its host answers: port unreachable
                self.members[src].detector.refused(dst, self.t)
            return
        if (src, dst) in self.blocked or self.rng.random() < self.loss:
            return
        for reply_to, reply in self.members[dst].receive(data, self.t):
            self.send(dst, reply_to, reply)

    def run(self, seconds: float, dt: float = 0.01, judge_every: float = 0.05) -> None:
        end = self.t + seconds
        next_judge = self.t
        while self.t < end:
            self.t += dt
            judge = self.t >= next_judge
            if judge:
                next_judge += judge_every
            for r, member in enumerate(self.members):
                if r in self.dead:
                    continue
                if self.t >= self._next_hb[r]:
                    self._next_hb[r] += self.settings.heartbeat_seconds
                    for dst, data in member.heartbeat(self.t):
                        self.send(r, dst, data)
                if not judge:
                    continue
                for dst, data in member.probe_requests(self.t):
                    self.send(r, dst, data)
                self.books[r].apply(member.detector.evaluate(self.t), self.t)

    def findings(self, rank: int) -> dict[str, tuple[str, str]]:
        """subject id → (reason, kind) of rank's active partition findings."""
        return {f.subject.id: (f.reason, str(f.evidence["kind"]))
                for f in self.books[rank].active()}

    def cut_both(self, a: int, b: int) -> None:
        self.blocked |= {(a, b), (b, a)}

    def isolate(self, a: int) -> None:
        for b in range(len(self.members)):
            if b != a:
                self.cut_both(a, b)


@pytest.fixture
def net() -> Net:
    n = Net(4)
    n.run(3)
    assert all(not n.findings(r) for r in range(4))
    return n


class TestClassification:
    def test_a_link_cut_both_ways_is_named_by_both_ends_only(self, net: Net) -> None:
        """Members 1 and 2 cannot reach each other; 0 and 3 reach both: 1 and 2 each report
        the link 1-2 cut both ways within 3 s; 0 and 3 report nothing."""
        cut_at = net.t
        net.cut_both(1, 2)
        net.run(4)
        assert net.findings(1) == {"g/0/link/1-2": ("LinkCut", "link_cut")}
        assert net.findings(2) == {"g/0/link/1-2": ("LinkCut", "link_cut")}
        assert net.findings(0) == net.findings(3) == {}
        assert net.first_seen[(1, "g/0/link/1-2")] - cut_at <= 3.0

    def test_a_one_way_cut_is_named_with_its_direction(self, net: Net) -> None:
        """Packets 1 → 2 are dropped, 2 → 1 flow: 2 reports the link cut one way, from 1
        to 2; 1 hears 2 and reports nothing."""
        net.blocked.add((1, 2))
        net.run(4)
        (reason, kind) = net.findings(2)["g/0/link/1-2"]
        assert (reason, kind) == ("LinkCutOneWay", "link_cut_one_way")
        finding = next(iter(net.books[2].active()))
        assert (finding.evidence["from_rank"], finding.evidence["to_rank"]) == (1, 2)
        assert net.findings(1) == {}

    def test_an_isolated_member_knows_it_and_the_others_see_it_unreachable(
            self, net: Net) -> None:
        """Member 3 cut from everyone: it reports itself isolated; every other member
        reports 3 unreachable (not a link cut: nobody hears it)."""
        net.isolate(3)
        net.run(4)
        assert net.findings(3) == {"pod-3": ("MemberIsolated", "isolated")}
        for r in (0, 1, 2):
            assert net.findings(r) == {"pod-3": ("PeerUnreachable", "peer_unreachable")}

    def test_a_killed_peer_is_down_when_its_host_still_answers(self, net: Net) -> None:
        """Member 0's process is gone, its host answers 'port unreachable': peer down."""
        net.dead.add(0)
        net.run(4)
        for r in (1, 2, 3):
            assert net.findings(r) == {"pod-0": ("PeerDown", "peer_down")}

    def test_findings_clear_when_the_link_heals(self, net: Net) -> None:
        """A healed cut clears the finding on both ends."""
        net.cut_both(0, 1)
        net.run(4)
        assert net.findings(0)
        net.blocked.clear()
        net.run(3)
        assert all(not net.findings(r) for r in range(4))

    def test_two_member_group_cannot_tell_isolation_from_a_dead_node(self) -> None:
        """With one peer there is no third party: the peer is 'unreachable', never
        'isolated'."""
        net = Net(2)
        net.run(3)
        net.dead.add(1)
        net.dead_host.add(1)
        net.run(4)
        assert net.findings(0) == {"pod-1": ("PeerUnreachable", "peer_unreachable")}


class TestGroupForming:
    def test_a_member_starting_late_is_joining_not_a_partition(self) -> None:
        """Member 3's pod starts a minute after the others (its host answers 'port
        unreachable' meanwhile, as a node whose pod is still pulling its image does): it is
        joining — the others are not ready for it but raise nothing — and once it runs the
        group forms with no finding anywhere."""
        net = Net(4)
        net.dead.add(3)
        net.run(60, dt=0.05, judge_every=0.1)
        assert not net.first_seen
        assert [net.members[r].detector.joining(net.t) for r in range(3)] == [[3]] * 3
        net.dead.discard(3)
        net.run(3)
        assert not net.first_seen
        assert all(m.detector.joining(net.t) == [] for m in net.members)

    def test_a_member_that_never_joins_is_a_finding_after_join_seconds(self) -> None:
        """A member never heard at all is a partition finding (down, never joined) once
        join_seconds have passed since the start — and not before."""
        net = Net(4)
        net.dead.add(3)
        join = net.settings.join_seconds
        net.run(join - 2, dt=0.05, judge_every=0.1)
        assert not net.first_seen
        net.run(4, dt=0.05, judge_every=0.1)
        for r in range(3):
            assert net.findings(r) == {"pod-3": ("PeerDown", "peer_down")}
            (finding,) = net.books[r].active()
            assert finding.evidence["never_heard"] is True
            assert "did not join the group" in finding.message
            assert net.members[r].detector.joining(net.t) == []


class TestNoise:
    def test_one_percent_random_loss_raises_nothing_in_ten_minutes(self) -> None:
        """Eight members, 1 % of every datagram lost at random, ten simulated minutes:
        not one finding (a lost heartbeat is 0.5 s of silence; a finding needs ~1.5 s)."""
        net = Net(8, loss=0.01, seed=7)
        net.run(600, dt=0.05, judge_every=0.1)
        assert all(not net.findings(r) for r in range(8))
        assert not net.first_seen


class TestPhi:
    def test_phi_grows_with_silence_beyond_the_usual_interval(self) -> None:
        """Regular 0.25 s heartbeats: phi is ~0 right after one, past the threshold of 8
        about half a second later than expected."""
        phi = PhiAccrual(0.25, min_std=0.05, pause=0.25)
        for i in range(20):
            phi.heartbeat(i * 0.25)
        last = 19 * 0.25
        assert phi.phi(last + 0.1) < 1
        assert phi.phi(last + 0.5) < 8 <= phi.phi(last + 0.8)
