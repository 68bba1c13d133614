"""Peer reachability on simulated time: the accrual detector, the gossip of rows, SWIM's
indirect probes and the classification of every kind of cut, through an in-memory network
that can drop chosen directions, kill members and lose packets at random. (The same code
runs over real UDP between network namespaces in tests/integration/test_partitions.py.)"""

from __future__ import annotations

import random

import pytest

from probes.peers import BadMessage, decode, encode
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
        # Stopped (starved, throttled, SIGSTOPped) until then: its datagrams wait in its
        # socket, as the kernel keeps them for a process that is not running.
        self.paused_until: dict[int, float] = {}
        self.queued: dict[int, list[bytes]] = {}
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
        if self.t < self.paused_until.get(dst, 0.0):
            self.queued.setdefault(dst, []).append(data)
            return
        self._deliver(dst, data)

    def _deliver(self, dst: int, data: bytes) -> None:
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
                if r in self.dead or self.t < self.paused_until.get(r, 0.0):
                    continue
                for data in self.queued.pop(r, []):
                    self._deliver(r, data)
                if self.t >= self._next_hb[r]:
                    # A late loop sends one heartbeat, not the ones it missed.
                    self._next_hb[r] = max(self._next_hb[r] + self.settings.heartbeat_seconds,
                                           self.t)
                    for dst, data in member.heartbeat(self.t):
                        self.send(r, dst, data)
                if not judge:
                    continue
                member.detector.awake(self.t, judge_every)
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

    def test_two_member_group_cut_says_either_side_may_be_the_cut_one(self) -> None:
        """The worker's node cut off: the worker's sidecar must not say the leader is
        unreachable 'from the whole group' — it is the whole group of one, and either node
        may be the cut one."""
        net = Net(2)
        net.run(3)
        net.cut_both(0, 1)
        net.run(4)
        for me, peer in ((0, 1), (1, 0)):
            (finding,) = net.books[me].active()
            assert finding.message.startswith(f"members {me} and {peer} have not heard each "
                                              "other for ")
            assert "no third member to tell which" in finding.message
            assert "whole group" not in finding.message


class TestStarvation:
    """A member that is not running (CPU starved, throttled by its limit, stopped) cannot
    hear or be heard: that is not a partition, and nobody may judge it one."""

    def test_a_member_stopped_for_a_second_and_a_half_is_no_finding_anywhere(
            self, net: Net) -> None:
        """Member 2 stopped for 1.5 s, twenty times, 5 s apart: no finding on any member;
        each time, its next heartbeat says it was paused."""
        for _ in range(20):
            net.paused_until[2] = net.t + 1.5
            net.run(5)
        assert not net.first_seen
        assert net.members[2].detector.pauses == 20
        assert net.members[0].detector.peers[2].pauses == 20

    def test_a_member_that_woke_late_does_not_judge_its_peers_for_it(
            self, net: Net) -> None:
        """Member 0 stopped for 3 s while nobody else is: on waking it counts none of the
        3 s as its peers' silence (no suspicion, no finding of its own — the others, who
        did not hear it for 3 s, are another matter), and its local health drops (its
        score goes up), then recovers once it runs on time."""
        net.paused_until[0] = net.t + 3.0
        net.run(3.05)
        detector = net.members[0].detector
        assert detector.pauses == 1 and detector.local_health == 1
        assert all(detector.phi(r, net.t) < 1 for r in (1, 2, 3))
        net.run(2)
        assert not [key for key in net.first_seen if key[0] == 0]
        net.run(net.settings.local_health_decay_seconds + 1)
        assert detector.local_health == 0

    def test_a_member_that_keeps_stalling_gets_more_time_from_the_others(
            self, net: Net) -> None:
        """Member 1 stalls often (a container at its CPU limit): its announced health
        score climbs, and a 4 s stall — past what a healthy member is given — is still no
        finding. A member that is really gone is still found, only later."""
        for _ in range(4):
            net.paused_until[1] = net.t + 1.0
            net.run(1.5)
        assert net.members[1].detector.local_health == 4
        assert net.members[0].detector.peers[1].health == 4
        net.paused_until[1] = net.t + 4.0
        net.run(6)
        assert not net.first_seen
        gone = net.t
        net.dead |= {1}
        net.dead_host |= {1}
        net.run(15)
        assert net.findings(0) == {"pod-1": ("PeerUnreachable", "peer_unreachable")}
        assert net.first_seen[(0, "g/0/member/pod-1")] - gone > 3.0

    def test_a_suspicion_nobody_else_shares_waits_for_confirmation(self) -> None:
        """Member 3 silent to everyone: the others confirm one another and report it as
        soon as a healthy member would. Before anyone's row confirms, the wait is up to
        three times the configured one."""
        net = Net(4)
        net.run(3)
        detector = net.members[0].detector
        net.dead |= {3}
        net.dead_host |= {3}
        net.run(0.85)  # phi past the threshold; the others' rows still hear 3
        peer = detector.peers[3]
        assert detector._suspected(peer, net.t)
        base = net.settings.confirm_seconds
        assert detector.confirm_seconds(peer) == base  # someone still hears it
        detector.rows.clear()  # no row from anyone since the suspicion began
        assert detector.confirm_seconds(peer) == pytest.approx(3 * base)
        net.run(2)
        assert detector.confirm_seconds(peer) == pytest.approx(base)  # all confirm
        assert net.findings(0) == {"pod-3": ("PeerUnreachable", "peer_unreachable")}


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


class TestHealthOnTheWire:
    def test_a_heartbeat_carries_the_senders_health_and_the_receiver_keeps_it(
            self, net: Net) -> None:
        """After a pause, member 1's heartbeats say so (score, pauses, last pause) and
        member 0 keeps its score; a heartbeat from a version without the fields is a
        healthy sender's."""
        net.paused_until[1] = net.t + 1.0
        net.run(1.5)
        (_, data), *_ = net.members[1].heartbeat(net.t)
        message = decode(data, "g/0")
        assert message["lh"] == 1 and message["pn"] == 1 and message["pz"] >= 0.9
        assert net.members[0].detector.peers[1].health == 1
        old = encode({"t": "hb", "g": "g/0", "r": 1, "b": "boot-1", "s": 10**6, "h": 15})
        net.members[0].receive(old, net.t)
        assert net.members[0].detector.peers[1].health == 0

    @pytest.mark.parametrize("field", [{"lh": -1}, {"lh": "3"}, {"pn": 1.5}, {"pz": "x"}])
    def test_a_malformed_health_announcement_is_dropped_and_counted(
            self, net: Net, field: dict[str, object]) -> None:
        member = net.members[0]
        bad = encode({"t": "hb", "g": "g/0", "r": 1, "b": "boot-1", "s": 10**6, "h": 15,
                      **field})
        with pytest.raises(BadMessage, match="health announcement"):
            decode(bad, "g/0")
        before = member.counts["bad"]
        member.receive(bad, net.t)
        assert member.counts["bad"] == before + 1
