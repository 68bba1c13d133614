"""The vocabulary policy and the controller share: what is wrong, what the cluster looks like,
what to do about it, and what was held back.

These are plain frozen values so that the controller can build them from its health model
and the action layer can carry them out without either side knowing the other's internals:
``supervisor`` imports this module, this package never imports ``supervisor``. Strings are
used where the other side owns the set of values (fault classes, subject kinds) so that a new
detector does not have to change the policy layer first; the policy *file* is where unknown
fault-class names are caught (see ``schema.load_policy``).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

SEVERITIES: tuple[str, ...] = ("info", "warning", "critical")
"""Severities from least to most serious; a rule's ``min_severity`` compares by this order."""

SEVERITY_RANK: Mapping[str, int] = {name: rank for rank, name in enumerate(SEVERITIES)}

FAULT_CLASSES: frozenset[str] = frozenset({
    # Found on one node by the agent (supervisor.findings.FaultClass).
    "gpu_lost", "gpu_unresponsive", "xid", "ecc_uncorrectable", "ecc_correctable_storm",
    "retired_pages", "row_remap", "thermal", "clock_throttle", "nvlink_down", "nvlink_errors",
    "pcie_degraded", "pcie_replays", "driver_error", "gpu_missing",
    # Found across a group by the sidecars, or by the controller itself.
    "collective_hang", "fail_slow", "partition", "node_down", "engine_crash", "engine_hang",
    "engine_unhealthy", "collective_slow",
    # Found by the controller: a group's application-class XIDs followed it across nodes.
    "workload_crash_loop",
})
"""Every fault class the detectors raise (the README lists them). A policy naming another
one is rejected (a typo would otherwise make a rule that silently never matches); callers
with more classes pass their own set to ``load_policy``."""


class Action(enum.StrEnum):
    """What the action layer can do. Rules name four of them (``LADDER_ACTIONS``); recover,
    unquarantine, suspect, unsuspect, degrade and restore are the engine's own moves."""

    FAIL_OVER = "fail_over"  # take a group out of traffic (readiness gate False on its pods)
    RECOVER = "recover"  # put a failed-over group back in traffic (incident closed)
    RESTART_GROUP = "restart_group"  # recreate every pod of the group
    QUARANTINE = "quarantine"  # cordon + taint a node
    UNQUARANTINE = "unquarantine"  # lift a quarantine (incident closed, rule says so)
    NOTIFY = "notify"  # only an Event, a log line and a metric
    DEGRADE = "degrade"  # scale up the fallback model and shift traffic to it
    RESTORE = "restore"  # shift back to the primary and scale the fallback down
    # A quarantine step's soft form, for a node the cause *may* sit on (``Signal.suspect``):
    # new work prefers other nodes (a PreferNoSchedule taint), nothing is cordoned.
    SUSPECT = "suspect"
    UNSUSPECT = "unsuspect"  # lift it (its incident closed)


LADDER_ACTIONS: tuple[Action, ...] = (
    Action.FAIL_OVER, Action.RESTART_GROUP, Action.QUARANTINE, Action.NOTIFY,
)
"""Actions a rule's escalation ladder may name; the others are the engine's own moves."""


@dataclass(frozen=True, slots=True)
class Signal:
    """One active finding as policy sees it: already mapped to the groups it hits."""

    fault_class: str  # one of FAULT_CLASSES, normally
    severity: str  # "info" | "warning" | "critical"
    subject_kind: str  # "gpu" | "node" | "pod" | "group" | "link"
    subject_id: str
    node: str | None  # node the subject is on (None for group- or link-level findings)
    groups: tuple[str, ...]  # keys of the pipeline groups affected; may be empty
    node_local: bool  # the cause sits on one node: quarantine it before restarting elsewhere
    since: float  # monotonic time the finding was first seen
    # The cause may sit on ``node``, unproven (an application-class XID seen under one
    # workload only): a quarantine step only steers new work away from the node (SUSPECT),
    # so a restart elsewhere tells the workload's fault from the GPU's.
    suspect: bool = False

    def __post_init__(self) -> None:
        # A misspelt severity would make every rule ignore the finding without a trace.
        if self.severity not in SEVERITY_RANK:
            raise ValueError(f"Signal.severity must be one of {list(SEVERITIES)}, "
                             f"got {self.severity!r}")


@dataclass(frozen=True, slots=True)
class GroupView:
    """One pipeline group as the controller sees it right now."""

    key: str  # e.g. "serving/llama/0"
    model: str  # the model it serves
    healthy: bool  # serving fine right now: no active finding, all pods ready
    nodes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class View:
    """The cluster for one evaluation. Healthy capacity per model is derived by the engine
    (healthy and not disrupted by us), so the controller need not know what we did."""

    groups: Mapping[str, GroupView]


@dataclass(frozen=True, slots=True)
class Decision:
    """One thing to do, and why. ``(incident, step, action, target)`` identifies it; the same
    incident id comes back on every evaluation and after a controller restart."""

    incident: str  # e.g. "gpu-lost/group/serving/llama/0", or "degrade/llama-70b"
    rule: str  # the rule's name ("degrade" for degrade/restore)
    step: int  # index in the rule's ladder; -1 for recover/unquarantine/degrade/restore
    action: Action
    target: str  # group key, node name (quarantine, unquarantine) or model (degrade, restore)
    reason: str  # one sentence for people: why
    dry_run: bool  # only log it; confirm() all the same
    node_local: bool = False  # the cause is on one node: keep the group off it
    # When the incident opened (wall clock, ms, as snapshots store it): the incident id
    # comes back whenever the same rule fires for the same group again, this tells the
    # incidents apart — a later one's restart is a new restart, not the old one replayed.
    opened: float = 0.0


@dataclass(frozen=True, slots=True)
class Refusal:
    """A decision the engine held back, and the safety rule that held it."""

    decision: Decision
    why: str  # "cooldown" | "budget" | "floor" | "breaker"
    detail: str


@dataclass(frozen=True, slots=True)
class Evaluation:
    """What one ``PolicyEngine.evaluate`` call decided and what it held back."""

    decisions: list[Decision]
    refusals: list[Refusal]
