"""The group protocol one sidecar runs with its peers: heartbeats that gossip the
reachability rows, and SWIM's indirect probes (ping-req → ping → ack, relayed back).

Transport-free: ``heartbeat``, ``probe_requests`` and ``receive`` return the datagrams to
send as ``(rank, bytes)``; the sidecar hands them to ``probes.peers.PeerSockets``, a test
to an in-memory network. The judging is ``supervisor.detectors.peers.PeerDetector``'s.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from probes.peers import BadMessage, decode, encode
from supervisor.detectors.peers import PeerDetector

Outgoing = list[tuple[int, bytes]]
PROBE_EXPIRY_SECONDS = 5.0  # a relay or probe not answered within this is forgotten


@dataclass(frozen=True, slots=True)
class _Relay:
    origin: int
    target: int
    at: float


class Membership:
    def __init__(self, group: str, rank: int, boot: str, detector: PeerDetector,
                 fanout: int, rng: random.Random | None = None,
                 on_check_request: Callable[[], None] | None = None) -> None:
        self.group = group
        self.rank = rank
        self.boot = boot
        self.detector = detector
        self.fanout = fanout
        self._rng = rng or random.Random()
        self._boots: dict[int, str] = {}
        self._pauses: dict[int, int] = {}  # pauses each peer announced so far
        self._relays: dict[int, _Relay] = {}  # nonce → a probe we run for someone (helper)
        self._mine: dict[int, tuple[int, float]] = {}  # nonce → (target, sent) we asked for
        self.counts: Counter[str] = Counter()
        self._on_check_request = on_check_request

    @property
    def peers(self) -> list[int]:
        return sorted(self.detector.peers)

    def heartbeat(self, now: float) -> Outgoing:
        seq, mask, rows = self.detector.next_heartbeat(now)
        data = encode({"t": "hb", "g": self.group, "r": self.rank, "b": self.boot, "s": seq,
                       "h": mask, "rows": rows, **self.detector.health_announcement()})
        self.counts["hb_sent"] += len(self.peers)
        return [(peer, data) for peer in self.peers]

    def check_request(self) -> Outgoing:
        """Ask the group's leader (rank 0) for a collective check now."""
        if self.rank == 0:
            return []
        self.counts["creq_sent"] += 1
        return [(0, encode({"t": "creq", "g": self.group, "r": self.rank,
                            "n": self._rng.getrandbits(31)}))]

    def probe_requests(self, now: float) -> Outgoing:
        """Ask ``fanout`` other members to probe each newly (or still) suspected peer."""
        out: Outgoing = []
        self._expire(now)
        for target in self.detector.to_probe(now):
            helpers = [p for p in self.peers if p != target]
            for helper in self._rng.sample(helpers, min(self.fanout, len(helpers))):
                nonce = self._rng.getrandbits(31)
                self._mine[nonce] = (target, now)
                out.append((helper, encode({"t": "preq", "g": self.group, "r": self.rank,
                                            "x": target, "n": nonce})))
                self.counts["preq_sent"] += 1
        return out

    def receive(self, data: bytes, now: float) -> Outgoing:
        try:
            msg = decode(data, self.group)
        except BadMessage:
            self.counts["bad"] += 1
            return []
        sender = msg["r"]
        if sender == self.rank or sender not in self.detector.peers:
            self.counts["bad"] += 1
            return []
        kind = msg["t"]
        self.counts[f"{kind}_received"] += 1
        if kind == "hb":
            if self._boots.get(sender) not in (None, msg["b"]):
                self.detector.forget_rows_of(sender)  # it restarted: sequences began again
            self._boots[sender] = msg["b"]
            self.detector.heard(sender, now)
            # A sender that does not announce its health (an older version) is healthy.
            self.detector.announced(sender, msg.get("lh", 0), msg.get("pn", 0))
            if msg.get("pn", 0) > self._pauses.get(sender, 0):
                self.counts["peer_pauses_announced"] += 1
            self._pauses[sender] = msg.get("pn", 0)
            self.detector.learn_row(sender, msg["s"], msg["h"], now)
            for rank, seq, mask in msg.get("rows", []):
                self.detector.learn_row(rank, seq, mask, now)
            return []
        nonce = msg["n"]
        if kind == "creq":
            if self._on_check_request is not None:
                self._on_check_request()
            return []
        if kind == "preq":
            target = msg.get("x")
            if not isinstance(target, int) or target not in self.detector.peers:
                return []
            self._relays[nonce] = _Relay(origin=sender, target=target, at=now)
            return [(target, encode({"t": "ping", "g": self.group, "r": self.rank,
                                     "o": sender, "n": nonce}))]
        if kind == "ping":  # we are the target: answer the helper
            return [(sender, encode({"t": "ack", "g": self.group, "r": self.rank,
                                     "o": msg.get("o"), "x": self.rank, "n": nonce}))]
        # ack: either for a probe we run for someone, or the answer to our own request
        relay = self._relays.pop(nonce, None)
        if relay is not None and sender == relay.target:
            return [(relay.origin, encode({"t": "ack", "g": self.group, "r": self.rank,
                                           "o": relay.origin, "x": relay.target,
                                           "n": nonce}))]
        mine = self._mine.pop(nonce, None)
        if mine is not None and msg.get("x") == mine[0]:
            self.detector.indirect_ack(mine[0], now)
            self.counts["indirect_acks"] += 1
        return []

    def _expire(self, now: float) -> None:
        for nonce in [n for n, r in self._relays.items() if now - r.at > PROBE_EXPIRY_SECONDS]:
            del self._relays[nonce]
        for nonce in [n for n, (_, at) in self._mine.items()
                      if now - at > PROBE_EXPIRY_SECONDS]:
            del self._mine[nonce]
