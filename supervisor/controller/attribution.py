"""Whose fault an application-class XID is: the workload's, or the GPU's.

NVIDIA's catalog answers XIDs 13, 31, 43, 45 and their kind with "restart the
application". The agent escalates one that keeps recurring on one GPU to critical — but a
deterministic bug in the application (a CrashLoopBackOff) recurs just the same. Acting on
the GPU's behalf would quarantine the node, the group would restart elsewhere, crash
there, get that node quarantined too, and walk across the cluster until the circuit
breaker opened. The agent sees one GPU; the controller sees both sides — where each group
ran when its XIDs came — so it decides here:

- the same XIDs **follow one group to another node** (within ``window``): the workload is
  at fault. Its XID findings, on every node it crashed on, are not evidence against those
  nodes; a ``workload_crash_loop`` finding about the group (and its model) is raised in
  their place: out of traffic, an alert, no quarantine and no restart;
- they **stay with one GPU under two different workloads**: the GPU is at fault, and the
  finding acts as any GPU fault does (node-local: quarantine);
- neither yet (one group, one GPU): unproven. The node is only a *suspect* — new work
  prefers other nodes, nothing is cordoned — so the group's restart lands elsewhere and
  the next XIDs, or their absence, tell which it was. Until then the finding speaks only
  about the groups it was seen under: a group placed on the node afterwards is not acted
  on for XIDs that came before it.

An XID counts as seen under a group when a new one arrives (the finding is new, or its
``last_seen`` moved) while the group has a pod on the node; with several groups on the
node each is recorded, and "two different workloads" then means two sightings whose
groups do not overlap. Every replica keeps this from the reports it ingests, so a new
leader has it too.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from supervisor.detectors.xid import application_class

WORKLOAD_CRASH_LOOP = "workload_crash_loop"


@dataclass(frozen=True, slots=True)
class Sighting:
    at: float  # monotonic
    node: str
    gpu: str  # the GPU's UUID (the finding's subject)
    code: int
    groups: frozenset[str]


@dataclass(slots=True)
class Verdict:
    whose: str  # "gpu" | "workload" | "unsure"
    groups: tuple[str, ...] = ()  # for "workload": the groups at fault


@dataclass(slots=True)
class CrashLoop:
    """A group whose application-class XIDs followed it across nodes."""

    group: str
    nodes: set[str] = field(default_factory=set)
    codes: set[int] = field(default_factory=set)
    since: float = 0.0  # monotonic: its first sighting in the window


def xid_code(fault_class: str, detail: str) -> int | None:
    """The XID of an application-class XID finding, else None."""
    if fault_class != "xid" or not detail.isdigit():
        return None
    code = int(detail)
    return code if application_class(code) else None


class XidAttribution:
    """The sightings of the last ``window`` seconds and the verdicts drawn from them."""

    def __init__(self, window: float) -> None:
        self.window = window
        self._seen: deque[Sighting] = deque()

    def observe(self, sighting: Sighting) -> None:
        self._seen.append(sighting)
        self._prune(sighting.at)

    def _prune(self, now: float) -> None:
        while self._seen and now - self._seen[0].at > self.window:
            self._seen.popleft()

    def verdict(self, gpu: str, now: float) -> Verdict:
        """Whose fault the application-class XIDs of ``gpu`` are (module docstring)."""
        self._prune(now)
        if self._the_gpus(gpu):
            return Verdict("gpu")
        followed = sorted({g for s in self._seen if s.gpu == gpu for g in s.groups
                           if self._nodes_of(g) - {s.node}})
        if followed:
            return Verdict("workload", tuple(followed))
        return Verdict("unsure")

    def groups_seen(self, gpu: str) -> set[str]:
        """The groups application-class XIDs of ``gpu`` were seen under (in the window)."""
        return {g for s in self._seen if s.gpu == gpu for g in s.groups}

    def _the_gpus(self, gpu: str) -> bool:
        """Seen on ``gpu`` under two workloads that do not overlap."""
        here = [s.groups for s in self._seen if s.gpu == gpu and s.groups]
        return any(not a & b for i, a in enumerate(here) for b in here[i + 1:])

    def _nodes_of(self, group: str) -> set[str]:
        return {s.node for s in self._seen if group in s.groups}

    def crash_loops(self, now: float) -> dict[str, CrashLoop]:
        """Every group whose application-class XIDs were seen on two or more nodes within
        the window (and not proven the GPU's on any of them)."""
        self._prune(now)
        loops: dict[str, CrashLoop] = {}
        for s in self._seen:
            for group in s.groups:
                loop = loops.setdefault(group, CrashLoop(group, since=s.at))
                loop.nodes.add(s.node)
                loop.codes.add(s.code)
        return {g: loop for g, loop in loops.items() if len(loop.nodes) > 1}
