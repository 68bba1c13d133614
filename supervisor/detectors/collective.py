"""What an all-reduce check's numbers mean: hung, slow, or fine — and who is to blame.

``probes.collective`` runs *plans* (sub-groups of ranks, message sizes, a deadline) and
returns raw outcomes: each rank's timings, who arrived, who timed out while alive. This
module turns them into findings and decides the next plan while localizing.

Hang. Any rank without a result missed the deadline. Ranks that never arrived at the plan
never took part; ranks that timed out left an *alive* marker — they were waiting for
someone; the ranks with neither a result nor a marker are the ones that hung (a stopped
or crashed process). ``collective_hang`` names them, with their nodes.

Slow. The group's time for a size is its slowest member's; bus bandwidth as nccl-tests
computes it: algbw = bytes / time, busbw = algbw * 2(n-1)/n. The largest size is compared
with the baseline — configured (``baseline_busbw_gbps``) or learned as the median of the
group's own healthy full checks (after ``learn_checks`` of them) — and below
``slow_fraction`` of it the check is slow.

Localization, in O(log n) rounds. The candidates start as every rank; each round splits
them in halves (a half of one topped up with a known-good member, as an all-reduce needs
two) and both halves all-reduce at once: the half that is ``1/slow_fraction`` times slower
than the other holds the culprit and the rest are known good. Eight ranks take three
rounds, sixteen four. A round where no half stands out means the slowness is everyone's (a shared
switch, the whole fabric): the finding names the group, not a member.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from supervisor.config import CollectiveSettings
from supervisor.findings import FaultClass, FindingKey, Severity, Subject, Verdict

HISTORY = 20  # healthy full checks remembered per size for the learned baseline


def busbw_gbps(size: int, seconds: float, ranks: int) -> float:
    """nccl-tests' bus bandwidth of an all-reduce, in GB/s."""
    if seconds <= 0 or ranks < 2:
        return 0.0
    return size / seconds * 2 * (ranks - 1) / ranks / 1e9


@dataclass
class Assessment:
    kind: str  # "ok" | "hang" | "slow" | "learning"
    busbw: dict[int, float] = field(default_factory=dict)
    baseline: float | None = None
    hung: list[int] = field(default_factory=list)
    never_arrived: list[int] = field(default_factory=list)
    timed_out: list[int] = field(default_factory=list)
    nodes: dict[int, str] = field(default_factory=dict)


@dataclass
class Localization:
    candidates: list[int]
    good: list[int] = field(default_factory=list)
    rounds: int = 0
    found: list[int] | None = None  # the slow member(s); [] = nobody stands out
    why: str = ""


def _or_inf(value: float | None) -> float:
    return float("inf") if value is None else value


def _group_times(outcome: dict[str, Any]) -> list[float | None]:
    """Per group of the plan: its time at the largest size (slowest member), or None if
    any member has no result."""
    results = outcome["results"]
    out: list[float | None] = []
    for group in outcome["groups"]:
        times = [results.get(str(r)) for r in group]
        out.append(None if any(t is None or not t.get("ok") for t in times)
                   else max(float(t["times"][-1]) for t in times if t is not None))
    return out


class CollectiveJudge:
    def __init__(self, group: str, size: int, settings: CollectiveSettings,
                 member_subject: Callable[[int], Subject]) -> None:
        self.group = group
        self.size = size
        self.settings = settings
        self._member = member_subject
        self.history: dict[int, deque[float]] = {}
        self.subject = Subject("group", group)
        self.hang_key = FindingKey(FaultClass.COLLECTIVE_HANG, group)
        self.slow_key = FindingKey(FaultClass.COLLECTIVE_SLOW, group)

    def baseline(self, size: int) -> float | None:
        largest = max(self.settings.sizes_bytes)
        if self.settings.baseline_busbw_gbps > 0 and size == largest:
            return self.settings.baseline_busbw_gbps
        seen = self.history.get(size)
        if seen is None or len(seen) < self.settings.learn_checks:
            return None
        return statistics.median(seen)

    def assess(self, outcome: dict[str, Any]) -> Assessment:
        """A plan with one group of every rank: hung, slow, ok, or still learning."""
        members = sorted({r for g in outcome["groups"] for r in g})
        results = {int(r): v for r, v in outcome["results"].items()}
        alive = {int(r) for r in outcome["alive"]}
        arrived = set(outcome["arrived"])
        nodes = {int(r): n for r, n in outcome.get("nodes", {}).items()}
        missing = [r for r in members if not (results.get(r) or {}).get("ok")]
        if missing:
            return Assessment(
                kind="hang", nodes=nodes,
                hung=[r for r in missing if r not in alive and r in arrived],
                never_arrived=[r for r in members if r not in arrived],
                timed_out=[r for r in missing if r in alive])
        n = len(members)
        busbw = {}
        for i, size in enumerate(outcome["sizes"]):
            slowest = max(float(results[r]["times"][i]) for r in members)
            busbw[int(size)] = busbw_gbps(int(size), slowest, n)
        largest = max(busbw)
        base = self.baseline(largest)
        if base is None:
            kind = "learning"
        elif busbw[largest] < self.settings.slow_fraction * base:
            kind = "slow"
        else:
            kind = "ok"
        return Assessment(kind=kind, busbw=busbw, baseline=base, nodes=nodes)

    def learn(self, assessment: Assessment) -> None:
        """Healthy full checks feed the learned baseline."""
        if assessment.kind not in ("ok", "learning"):
            return
        for size, value in assessment.busbw.items():
            self.history.setdefault(size, deque(maxlen=HISTORY)).append(value)

    # --- localization ----------------------------------------------------------------------

    def start_localization(self) -> Localization:
        return Localization(candidates=list(range(self.size)))

    def next_plan(self, loc: Localization) -> dict[str, Any] | None:
        """The next round's plan; None when done (``loc.found`` says what was found).

        The candidates are split in two halves; a half of one is topped up with a
        known-good member (an all-reduce needs two), so the two groups run side by side
        and the slower one holds the culprit."""
        if loc.found is not None:
            return None
        c = loc.candidates
        halves = [c[:len(c) // 2], c[len(c) // 2:]]
        spare = iter(loc.good)
        groups = []
        for half in halves:
            group = list(half)
            while len(group) < 2:
                partner = next(spare, None)
                if partner is None:
                    loc.found = list(c) if len(c) < self.size else []
                    loc.why = "too few known-good members to pair with"
                    return None
                group.append(partner)
            groups.append(group)
        return {"groups": groups, "sizes": [max(self.settings.sizes_bytes)],
                "deadline": self.settings.deadline_seconds}

    def after_round(self, loc: Localization, outcome: dict[str, Any]) -> None:
        loc.rounds += 1
        groups: list[list[int]] = outcome["groups"]
        times = _group_times(outcome)
        # A group that did not finish at all is the slowest there can be.
        ranked = sorted(range(len(groups)), key=lambda i: _or_inf(times[i]))
        fastest, slowest = ranked[0], ranked[-1]
        t_fast, t_slow = times[fastest], times[slowest]
        distinct = t_slow is None or (t_fast is not None and t_fast > 0
                                      and t_slow * self.settings.slow_fraction > t_fast)
        if not distinct:
            loc.found = []
            loc.why = "no part of the group is slower than the rest"
            return
        suspects = [r for r in groups[slowest] if r in loc.candidates]
        loc.good += [r for i, g in enumerate(groups) if i != slowest for r in g
                     if r not in loc.good]
        loc.candidates = suspects
        if len(suspects) == 1:
            loc.found = suspects

    # --- findings --------------------------------------------------------------------------

    def _name(self, ranks: Sequence[int], nodes: dict[int, str]) -> str:
        parts = []
        for r in ranks:
            subject = self._member(r)
            node = nodes.get(r)
            parts.append(f"rank {r} ({subject.id}{f' on {node}' if node else ''})")
        return ", ".join(parts) if parts else "none"

    def hang_verdict(self, a: Assessment, deadline: float) -> Verdict:
        parts = []
        if a.never_arrived:
            parts.append(f"{self._name(a.never_arrived, a.nodes)} never arrived at the "
                         "rendezvous")
        if a.hung:
            parts.append(f"{self._name(a.hung, a.nodes)} arrived but never finished "
                         "(stopped or crashed)")
        what = "; ".join(parts) or (f"every rank timed out waiting for the others "
                                    f"({self._name(a.timed_out, a.nodes)}): a link between "
                                    "them")
        return Verdict(
            key=self.hang_key, active=True, subject=self.subject, severity=Severity.CRITICAL,
            reason="CollectiveHang",
            message=f"all-reduce across {self.size} ranks missed its {deadline:g}s deadline: "
                    f"{what}",
            evidence={"hung_ranks": a.hung, "never_arrived": a.never_arrived,
                      "timed_out": a.timed_out, "deadline_seconds": deadline,
                      "nodes": {str(r): n for r, n in a.nodes.items()}},
            action="restart_group")

    def slow_verdict(self, a: Assessment, loc: Localization) -> Verdict:
        largest = max(a.busbw)
        measured = a.busbw[largest]
        base = a.baseline or 0.0
        found = loc.found or []
        evidence: dict[str, Any] = {
            "size_bytes": largest, "busbw_gbps": round(measured, 4),
            "baseline_gbps": round(base, 4), "rounds": loc.rounds,
            "slow_ranks": found, "nodes": {str(r): n for r, n in a.nodes.items()}}
        where = (f"localized in {loc.rounds} round(s) to {self._name(found, a.nodes)}"
                 if found else f"not localized to a member ({loc.why or 'the whole group'})")
        if len(found) == 1:
            member = self._member(found[0])
            subject = Subject(member.kind, member.id, node=a.nodes.get(found[0]))
        else:
            subject = self.subject
        return Verdict(
            key=self.slow_key, active=True, subject=subject, severity=Severity.WARNING,
            reason="CollectiveSlow",
            message=f"all-reduce bus bandwidth {measured:.3g} GB/s at {largest} bytes is "
                    f"{measured / base:.0%} of the baseline {base:.3g} GB/s; {where}"
                    if base else f"all-reduce slow; {where}",
            evidence=evidence, action="quarantine")
