"""Reachability among the members of one group: who hears whom, and what kind of cut it is.

Each member sends every peer a UDP heartbeat every ``heartbeat_seconds``, carrying its
*row* — the bitmask of members it heard recently — and the freshest rows it knows of the
others, so every member holds the whole group's reachability matrix, even rows of members
it cannot hear itself.

Suspicion is an *accrual* failure detector (Hayashibara et al.'s phi): from the observed
intervals between a peer's heartbeats (mean, deviation floored at ``min_std_seconds``,
plus ``acceptable_pause_seconds``), phi is how unlikely the current silence is, as -log10
of its probability; at ``phi_threshold`` (8: one in a hundred million) the peer is
suspected. A suspected peer is probed indirectly, SWIM-style: ``indirect_probes`` other
members are asked to ping it for us and relay its answer. The suspicion becomes a finding
only once it has lasted ``confirm_seconds`` — a lost heartbeat or two is silence of half a
second, far below that — and then it is classified from what the rest of the group says:

- ``peer_down``: the peer's host answered our heartbeats with "port unreachable" — its
  process is gone;
- ``link_cut`` (both ways): someone else hears the peer (or it answered an indirect probe),
  and its own row says it does not hear us either;
- ``link_cut_one_way``: someone else hears the peer, and its row says it *does* hear us —
  only its packets to us are lost;
- ``peer_unreachable``: nobody hears the peer and no indirect probe reached it — its node is
  down or it is cut off from everyone;
- ``isolated``: this member suspects every peer and hears of none of them through anyone —
  it is the one cut off (needs at least two peers to tell apart from one peer down).

A member never heard since this one started is *joining*, not cut: the pods of a group
start minutes apart (scheduling, image pulls), and a partition finding then would restart
a group that is still forming — and, its pods again starting apart, the next one too. It
keeps the pod not ready (the group has not formed) and becomes a finding only if it has not
joined ``join_seconds`` after the start.

A classification waits until the rows it relies on are newer than the suspicion, so a
both-ways cut is never called one-way on the strength of a row from before the cut.

A member judges others only for the time it could have heard them (after memberlist's
Lifeguard). Silence is evidence about a peer only if *this* process was running to hear
it: a sidecar starved of CPU (a CPU limit's throttling, a noisy neighbour, a long GC) or
stopped wakes to find every peer silent and the peers' datagrams still queued in its
socket. So the judging loop reports how late it woke (``awake``); a wake more than half a
heartbeat late is a *pause* of this member:

- the paused span is not counted as anybody's silence (each peer's last heartbeat moves
  forward by it) and running suspicions start again;
- this member's *local health* score goes up by one (at most ``local_health_max``) and
  back down by one for every ``local_health_decay_seconds`` without a pause; its own
  confirmations take ``1 + score`` times as long, so a member that keeps being late judges
  slower;
- it says so in its next heartbeats (the score, how many pauses, how long the last was):
  a peer that was starved is not cut, and the others give a member whose announced score
  is up the same longer confirmation — its next stall is more likely a stall too.

And a suspicion that nobody else shares is weaker than one everybody shares: a peer no
member hears is called unreachable after ``confirm_seconds`` only when every other
member's fresh row agrees; with fewer independent confirmations it waits longer, up to
three times as long with none (Lifeguard's dynamic suspicion timeout). Time is passed in
(monotonic seconds): the detector is tested without sleeping or sockets.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from supervisor.config import SidecarSettings
from supervisor.findings import FaultClass, FindingKey, Severity, Subject, Verdict

PHI_MAX = 100.0


class PhiAccrual:
    """Phi of one peer's silence, from the intervals between its heartbeats (the last
    ``window`` of them; sums kept as they go, so phi costs the same at any window)."""

    __slots__ = ("_gap", "_intervals", "_min_std", "_pause", "_skip", "_sq", "_sum", "last")

    def __init__(self, first_interval: float, min_std: float, pause: float,
                 window: int = 100) -> None:
        # An interval this long is an outage, not a sample of the heartbeat's rhythm:
        # counting it would widen the distribution and slow the next detection for the
        # whole window after every cut.
        self._gap = 4 * first_interval + pause
        # Seeded with the expected interval so phi is meaningful from the second beat.
        self._intervals: deque[float] = deque(maxlen=window)
        self._sum = 0.0
        self._sq = 0.0
        self._min_std = min_std
        self._pause = pause
        self.last: float | None = None
        self._skip = False
        for _ in range(2):
            self._add(first_interval)

    def _add(self, interval: float) -> None:
        if len(self._intervals) == self._intervals.maxlen:
            old = self._intervals[0]
            self._sum -= old
            self._sq -= old * old
        self._intervals.append(interval)
        self._sum += interval
        self._sq += interval * interval

    def heartbeat(self, now: float) -> None:
        if self.last is not None and now - self.last <= self._gap and not self._skip:
            self._add(now - self.last)
        self._skip = False
        self.last = now

    def discount(self, seconds: float, until: float) -> None:
        """We were not running for ``seconds`` ending at ``until``: that silence is not
        the peer's. The next interval is not a sample of its rhythm either."""
        if self.last is not None:
            self.last = min(until, self.last + seconds)
            self._skip = True

    def phi(self, now: float) -> float:
        if self.last is None:
            return 0.0
        n = len(self._intervals)
        mean = self._sum / n
        std = max(math.sqrt(max(0.0, self._sq / n - mean * mean)), self._min_std)
        z = (now - self.last - mean - self._pause) / std
        p_later = 0.5 * math.erfc(z / math.sqrt(2))
        return PHI_MAX if p_later <= 0 else min(PHI_MAX, -math.log10(p_later))


@dataclass
class _Peer:
    rank: int
    phi: PhiAccrual
    suspect_since: float | None = None
    probed_at: float | None = None
    refused_at: float | None = None
    acked_at: float | None = None
    health: int = 0  # its own local health score, as its last heartbeat announced it
    pauses: int = 0  # pauses it announced so far


@dataclass
class _Row:
    seq: int
    mask: int
    learned: float  # our monotonic time when we first saw this seq


@dataclass
class Classification:
    kind: str
    peer: int
    evidence: dict[str, object] = field(default_factory=dict)


class PeerDetector:
    """The reachability of one member (``rank``) to the rest of its group."""

    def __init__(self, group: str, rank: int, size: int, settings: SidecarSettings,
                 member_subject: Callable[[int], Subject], started: float) -> None:
        self.group = group
        self.rank = rank
        self.size = size
        self.settings = settings
        self._subject = member_subject
        self.started = started
        self.peers = {r: _Peer(r, PhiAccrual(settings.heartbeat_seconds,
                                             settings.min_std_seconds,
                                             settings.acceptable_pause_seconds))
                      for r in range(size) if r != rank}
        self.rows: dict[int, _Row] = {}
        self.seq = 0
        self._active: set[FindingKey] = set()
        self.row_window = 3 * settings.heartbeat_seconds + settings.acceptable_pause_seconds
        # This member's own health (see the module docstring).
        self.local_health = 0
        self.pauses = 0
        self.paused_seconds = 0.0
        self.last_pause = 0.0
        self._awake_at: float | None = None
        self._health_changed = started

    # --- what arrives ----------------------------------------------------------------------

    def heard(self, rank: int, now: float) -> None:
        peer = self.peers.get(rank)
        if peer is None:
            return
        peer.phi.heartbeat(now)
        peer.suspect_since = None
        peer.probed_at = None

    def learn_row(self, rank: int, seq: int, mask: int, now: float) -> None:
        if rank == self.rank or not 0 <= rank < self.size:
            return
        known = self.rows.get(rank)
        if known is None or seq > known.seq:
            self.rows[rank] = _Row(seq, mask, now)

    def announced(self, rank: int, health: int, pauses: int) -> None:
        """A peer's heartbeat told us its own health: how starved it has been lately."""
        peer = self.peers.get(rank)
        if peer is not None:
            peer.health = max(0, min(health, self.settings.local_health_max))
            peer.pauses = pauses

    def awake(self, now: float, interval: float) -> float:
        """The judging loop woke at ``now``, meaning to wake ``interval`` after its last
        wake. Returns how long this member was paused (0: it woke on time)."""
        last, self._awake_at = self._awake_at, now
        s = self.settings
        if now - self._health_changed >= s.local_health_decay_seconds:
            self.local_health = max(0, self.local_health - 1)
            self._health_changed = now
        if last is None:
            return 0.0
        late = now - last - interval
        if late <= s.heartbeat_seconds / 2:
            return 0.0
        self.pauses += 1
        self.paused_seconds += late
        self.last_pause = late
        self.local_health = min(s.local_health_max, self.local_health + 1)
        self._health_changed = now
        for peer in self.peers.values():
            peer.phi.discount(late, now)
            peer.suspect_since = None
            peer.probed_at = None
        return late

    def forget_rows_of(self, rank: int) -> None:
        """A member restarted (new boot): its sequence started again."""
        self.rows.pop(rank, None)

    def indirect_ack(self, rank: int, now: float) -> None:
        peer = self.peers.get(rank)
        if peer is not None:
            peer.acked_at = now

    def refused(self, rank: int, now: float) -> None:
        peer = self.peers.get(rank)
        if peer is not None:
            peer.refused_at = now

    # --- what we send ----------------------------------------------------------------------

    def hears(self, peer: _Peer, now: float) -> bool:
        last = peer.phi.last
        return last is not None and now - last <= self.row_window

    def my_row(self, now: float) -> int:
        mask = 1 << self.rank
        for peer in self.peers.values():
            if self.hears(peer, now):
                mask |= 1 << peer.rank
        return mask

    def health_announcement(self) -> dict[str, float | int]:
        """What our heartbeats say about this member's own health."""
        return {"lh": self.local_health, "pn": self.pauses, "pz": round(self.last_pause, 3)}

    def next_heartbeat(self, now: float) -> tuple[int, int, list[list[int]]]:
        """(seq, my row, the rows of others to gossip as [rank, seq, mask])."""
        self.seq += 1
        return self.seq, self.my_row(now), [[r, row.seq, row.mask]
                                            for r, row in sorted(self.rows.items())]

    def to_probe(self, now: float) -> list[int]:
        """Suspected peers due an indirect probe (at the start of a suspicion, then again
        every ``confirm_seconds`` while it lasts)."""
        due = []
        for peer in self.peers.values():
            if self._suspected(peer, now) and (
                    peer.probed_at is None
                    or now - peer.probed_at >= max(self.settings.confirm_seconds, 0.1)):
                peer.probed_at = now
                due.append(peer.rank)
        return due

    # --- judging ---------------------------------------------------------------------------

    def joining(self, now: float) -> list[int]:
        """Members never heard since our start, while they still have time to join."""
        if now - self.started >= self.settings.join_seconds:
            return []
        return [p.rank for p in self.peers.values() if p.phi.last is None]

    def _suspected(self, peer: _Peer, now: float) -> bool:
        if peer.phi.last is None:
            silent = now - self.started >= self.settings.join_seconds
        else:
            silent = peer.phi.phi(now) >= self.settings.phi_threshold
        if not silent:
            peer.suspect_since = None
            return False
        if peer.suspect_since is None:
            peer.suspect_since = now
        return True

    def phi(self, rank: int, now: float) -> float:
        return self.peers[rank].phi.phi(now)

    def confirm_seconds(self, peer: _Peer, all_suspected: bool = False) -> float:
        """How long a suspicion of ``peer`` must last to be a finding: the configured
        time, times ``1 +`` the worse of our and its announced health score, times up to
        three while other members do not (yet) confirm that they do not hear it either."""
        base = self.settings.confirm_seconds * (1 + max(self.local_health, peer.health))
        others = [r for r in range(self.size) if r not in (self.rank, peer.rank)]
        # Suspecting everyone, we hear no rows to confirm with: that is isolation, about
        # ourselves, and waits for no one.
        if not others or all_suspected or peer.suspect_since is None:
            return base
        since = peer.suspect_since
        # Heard by someone is not a confirmation of silence; it is a link cut, classified
        # from the rows themselves.
        confirming = sum(1 for r in others
                         if (row := self._fresh_row(r, since)) is not None
                         and not row.mask >> peer.rank & 1)
        if any((row := self._fresh_row(r, since)) is not None and row.mask >> peer.rank & 1
               for r in others):
            return base
        share = math.log(confirming + 1) / math.log(len(others) + 1)
        return base * (1 + 2 * (1 - share))

    def _fresh_row(self, rank: int, since: float) -> _Row | None:
        row = self.rows.get(rank)
        return row if row is not None and row.learned >= since else None

    def classify(self, peer: _Peer, now: float, all_suspected: bool) -> Classification | None:
        """What cut explains our suspicion of ``peer``; None while the evidence is not in
        yet (rows newer than the suspicion)."""
        since = peer.suspect_since
        assert since is not None
        window = since - self.settings.heartbeat_seconds
        evidence: dict[str, object] = {"observer": self.rank,
                                       "silent_seconds": round(self._silence(peer, now), 3)}
        if peer.refused_at is not None and peer.refused_at >= window:
            return Classification("peer_down", peer.rank, evidence)
        heard_by = [r for r in range(self.size) if r not in (self.rank, peer.rank)
                    and (row := self._fresh_row(r, since)) is not None
                    and row.mask >> peer.rank & 1]
        acked = peer.acked_at is not None and peer.acked_at >= since
        if heard_by or acked:
            evidence.update(heard_by=heard_by, indirect_ack=acked)
            own = self._fresh_row(peer.rank, since)
            if own is None:
                # Its row has not reached us since the suspicion began. It will, through
                # whoever hears it; until then, say nothing rather than guess a direction.
                if now - since < self.settings.confirm_seconds + 1.0:
                    return None
                return Classification("link_cut", peer.rank, evidence)
            if own.mask >> self.rank & 1:
                return Classification("link_cut_one_way", peer.rank, evidence)
            return Classification("link_cut", peer.rank, evidence)
        if all_suspected and len(self.peers) >= 2:
            return Classification("isolated", self.rank, evidence)
        return Classification("peer_unreachable", peer.rank, evidence)

    def _silence(self, peer: _Peer, now: float) -> float:
        last = peer.phi.last
        return now - (last if last is not None else self.started)

    def evaluate(self, now: float) -> list[Verdict]:
        """Partition findings of this member now; clears for those that ended."""
        suspected = [p for p in self.peers.values() if self._suspected(p, now)]
        all_suspected = len(suspected) == len(self.peers)
        confirmed = [p for p in suspected if p.suspect_since is not None
                     and now - p.suspect_since >= self.confirm_seconds(p, all_suspected)]
        verdicts: dict[FindingKey, Verdict] = {}
        pending = False
        for peer in confirmed:
            found = self.classify(peer, now, all_suspected)
            if found is None:
                pending = True
                continue
            verdict = self._verdict(found, peer, now)
            if found.kind == "isolated":
                verdicts = {verdict.key: verdict}
                break
            verdicts[verdict.key] = verdict
        out = list(verdicts.values())
        if pending:  # evidence still on its way: keep what stands, clear nothing yet
            self._active |= set(verdicts)
            return out
        out.extend(Verdict.clear(key) for key in self._active - set(verdicts))
        self._active = set(verdicts)
        return out

    def _verdict(self, found: Classification, peer: _Peer, now: float) -> Verdict:
        me, p = self.rank, peer.rank
        silence = self._silence(peer, now)
        phi = round(peer.phi.phi(now), 1)
        evidence = {**found.evidence, "kind": found.kind, "phi": phi}
        if found.kind in ("link_cut", "link_cut_one_way"):
            a, b = sorted((me, p))
            subject = Subject(kind="link", id=f"{self.group}/link/{a}-{b}")
            if found.kind == "link_cut":
                reason, what = "LinkCut", f"the link between members {me} and {p} is cut " \
                                          "both ways"
            else:
                reason, what = "LinkCutOneWay", f"the link from member {p} to member {me} " \
                                                "is cut (one way: it still hears us)"
            evidence.update(from_rank=p, to_rank=me)
            message = (f"no heartbeat from member {p} for {silence:.1f}s (phi {phi}) while "
                       f"the rest of the group still reaches it: {what}")
        elif found.kind == "isolated":
            subject = self._subject(me)
            reason = "MemberIsolated"
            message = (f"member {me} hears none of its {len(self.peers)} peers and hears of "
                       f"none through anyone for {silence:.1f}s: this member is cut off")
        else:
            subject = self._subject(p)
            evidence.update(peer_rank=p)
            if found.kind == "peer_down":
                reason = "PeerDown"
                message = (f"member {p} is down: its host answers 'port unreachable' and no "
                           f"heartbeat came for {silence:.1f}s")
            else:
                reason = "PeerUnreachable"
                # Two members: each side sees the same silence, and no third member can
                # say which of the two nodes is cut off — blaming the peer would be a guess.
                if len(self.peers) == 1:
                    message = (f"members {me} and {p} have not heard each other for "
                               f"{silence:.1f}s: one of their nodes is down or cut off (a "
                               "group of two has no third member to tell which)")
                else:
                    message = (f"member {p} is unreachable from the whole group for "
                               f"{silence:.1f}s: its node is down or it is cut off")
        if peer.phi.last is None:
            evidence["never_heard"] = True
            message += (f" (never heard since this member started: it did not join the group "
                        f"within {self.settings.join_seconds:g}s)")
        key = FindingKey(FaultClass.PARTITION, subject.id) if subject.kind == "link" else \
            FindingKey(FaultClass.PARTITION, f"{self.group}/member/{subject.id}")
        return Verdict(key=key, active=True, subject=subject, severity=Severity.CRITICAL,
                       reason=reason, message=message, evidence=evidence,
                       action="restart_group")

    # --- for people ------------------------------------------------------------------------

    def matrix(self, now: float) -> list[list[bool | None]]:
        """``m[a][b]``: does member a hear member b (None: no recent row of a)."""
        out: list[list[bool | None]] = []
        mine = self.my_row(now)
        for a in range(self.size):
            if a == self.rank:
                mask: int | None = mine
            else:
                row = self.rows.get(a)
                fresh = row is not None and now - row.learned <= 4 * self.row_window
                mask = row.mask if fresh and row is not None else None
            out.append([None if mask is None else bool(mask >> b & 1)
                        for b in range(self.size)])
        return out
