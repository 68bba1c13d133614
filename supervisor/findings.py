"""Findings: the one thing every layer above the probes speaks.

A *finding* says: this fault class, at this severity, on this subject, because of this
evidence, first seen then, last seen now. Detectors do not create findings directly; each
evaluation yields ``Verdict``s ("key K is active with this evidence" or "key K is clear"),
and the ``FindingBook`` turns them into findings, deduplicates them (a repeat refreshes
``last_seen`` and ``count``; it is never a second finding) and tells its listeners about
transitions only — raised, changed severity or reason, cleared.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any


class Severity(enum.StrEnum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        return _SEVERITY_RANK[self]


_SEVERITY_RANK = {Severity.INFO: 0, Severity.WARNING: 1, Severity.CRITICAL: 2}


class FaultClass(enum.StrEnum):
    """The fault classes (the README's table), as stable identifiers used in metrics and
    reports."""

    GPU_LOST = "gpu_lost"
    GPU_UNRESPONSIVE = "gpu_unresponsive"
    XID = "xid"
    ECC_UNCORRECTABLE = "ecc_uncorrectable"
    ECC_CORRECTABLE_STORM = "ecc_correctable_storm"
    RETIRED_PAGES = "retired_pages"
    ROW_REMAP = "row_remap"
    THERMAL = "thermal"
    CLOCK_THROTTLE = "clock_throttle"
    NVLINK_DOWN = "nvlink_down"
    NVLINK_ERRORS = "nvlink_errors"
    PCIE_DEGRADED = "pcie_degraded"
    PCIE_REPLAYS = "pcie_replays"
    DRIVER_ERROR = "driver_error"  # NVML cannot be initialised or cannot count the GPUs
    GPU_MISSING = "gpu_missing"  # fewer GPUs usable than the node should have
    # Found by the sidecar in an inference pod:
    ENGINE_CRASH = "engine_crash"  # nothing listens on the engine's port any more
    ENGINE_UNHEALTHY = "engine_unhealthy"  # the engine's health check fails
    ENGINE_HANG = "engine_hang"  # requests running, no progress; or the canary hangs
    PARTITION = "partition"  # members of the group cannot reach each other
    COLLECTIVE_HANG = "collective_hang"  # an all-reduce check missed its deadline
    COLLECTIVE_SLOW = "collective_slow"  # its bus bandwidth fell below the baseline


NODE_FAULT_CLASSES = frozenset({FaultClass.DRIVER_ERROR, FaultClass.GPU_MISSING})
"""Found about the node as a whole (no GPU to hang them on)."""

POD_FAULT_CLASSES = frozenset({FaultClass.ENGINE_CRASH, FaultClass.ENGINE_UNHEALTHY,
                               FaultClass.ENGINE_HANG, FaultClass.PARTITION,
                               FaultClass.COLLECTIVE_HANG, FaultClass.COLLECTIVE_SLOW})
"""Found by a sidecar about its pod, its engine or its group."""

GPU_FAULT_CLASSES = tuple(fc for fc in FaultClass
                          if fc not in NODE_FAULT_CLASSES | POD_FAULT_CLASSES)
"""Found about one GPU."""


@dataclass(frozen=True, slots=True)
class Subject:
    """What a finding is about. ``kind`` is gpu, node, pod, group or link."""

    kind: str
    id: str  # stable identity: a GPU UUID, a node name, namespace/pod, ...
    node: str | None = None
    index: int | None = None  # GPU index on its node, for people and DCGM joins

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "id": self.id}
        if self.node is not None:
            out["node"] = self.node
        if self.index is not None:
            out["index"] = self.index
        return out


@dataclass(frozen=True, slots=True)
class FindingKey:
    fault_class: FaultClass
    subject_id: str
    detail: str = ""  # tells findings of one class apart on one subject (e.g. the XID code)


@dataclass(frozen=True, slots=True)
class Verdict:
    """A detector's current opinion about one key."""

    key: FindingKey
    active: bool
    subject: Subject | None = None
    severity: Severity = Severity.WARNING
    reason: str = ""  # one CamelCase word, as Kubernetes condition reasons
    message: str = ""
    evidence: dict[str, Any] = field(default_factory=dict)
    action: str = ""  # recommended remedy, e.g. from NVIDIA's XID catalog
    repeat: int = 0  # how many new occurrences this verdict reports (event-driven detectors)

    @classmethod
    def clear(cls, key: FindingKey) -> Verdict:
        return cls(key=key, active=False)


@dataclass(frozen=True, slots=True)
class Finding:
    key: FindingKey
    subject: Subject
    severity: Severity
    reason: str
    message: str
    evidence: dict[str, Any]
    first_seen: float  # wall clock
    last_seen: float
    count: int = 1
    action: str = ""
    cleared_at: float | None = None  # wall clock; set on the copies in recently_cleared

    @property
    def fault_class(self) -> FaultClass:
        return self.key.fault_class

    def as_dict(self) -> dict[str, Any]:
        return {
            "fault_class": str(self.key.fault_class),
            "detail": self.key.detail,
            "severity": str(self.severity),
            "subject": self.subject.as_dict(),
            "reason": self.reason,
            "message": self.message,
            "evidence": self.evidence,
            "action": self.action,
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
            "count": self.count,
        } | ({} if self.cleared_at is None else {"cleared_at": self.cleared_at})


class Transition(enum.StrEnum):
    RAISED = "raised"
    CHANGED = "changed"
    CLEARED = "cleared"


Listener = Callable[[Transition, Finding], None]


def log_level(transition: Transition, finding: Finding) -> str:
    """The level a transition is logged at, the same in every role: raised or changed at the
    finding's severity (critical → error, so log pipelines that page on errors see it),
    cleared at info."""
    if transition is Transition.CLEARED:
        return "info"
    return {Severity.CRITICAL: "error", Severity.WARNING: "warning"}.get(finding.severity,
                                                                         "info")


class FindingBook:
    """The active findings of one daemon, keyed so that repeats never multiply."""

    def __init__(self, recent_limit: int = 50) -> None:
        self._active: dict[FindingKey, Finding] = {}
        self._listeners: list[Listener] = []
        self.recently_cleared: deque[Finding] = deque(maxlen=recent_limit)
        self.raised_total: dict[tuple[FaultClass, Severity], int] = {}
        self.version = 0  # bumped on every transition; cheap change detection for reporters

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def active(self) -> list[Finding]:
        return list(self._active.values())

    def get(self, key: FindingKey) -> Finding | None:
        return self._active.get(key)

    def apply(self, verdicts: Iterable[Verdict], now_wall: float) -> None:
        for verdict in verdicts:
            self._apply_one(verdict, now_wall)

    def _apply_one(self, verdict: Verdict, now: float) -> None:
        current = self._active.get(verdict.key)
        if not verdict.active:
            if current is not None:
                del self._active[verdict.key]
                self.recently_cleared.append(replace(current, cleared_at=now))
                self._emit(Transition.CLEARED, current)
            return
        if verdict.subject is None:
            raise ValueError(f"active verdict for {verdict.key} has no subject")
        if current is None:
            finding = Finding(
                key=verdict.key, subject=verdict.subject, severity=verdict.severity,
                reason=verdict.reason, message=verdict.message, evidence=verdict.evidence,
                first_seen=now, last_seen=now, count=max(verdict.repeat, 1),
                action=verdict.action,
            )
            self._active[verdict.key] = finding
            bucket = (verdict.key.fault_class, verdict.severity)
            self.raised_total[bucket] = self.raised_total.get(bucket, 0) + 1
            self._emit(Transition.RAISED, finding)
            return
        updated = replace(
            current, severity=verdict.severity, reason=verdict.reason, message=verdict.message,
            evidence=verdict.evidence, last_seen=now, count=current.count + verdict.repeat,
            action=verdict.action,
        )
        self._active[verdict.key] = updated
        if (updated.severity, updated.reason) != (current.severity, current.reason):
            self._emit(Transition.CHANGED, updated)

    def _emit(self, transition: Transition, finding: Finding) -> None:
        self.version += 1
        for listener in self._listeners:
            listener(transition, finding)
