"""Findings → NPD-style NodeConditions of our own types.

Condition types are ours (GPU-prefixed, PascalCase, problem polarity: True means the
problem is present), each with a healthy reason used when it is False. They are published
False at start-up, so "no problem" is an observed fact rather than a missing condition, and
we never write types other components own (NPD resyncs its own and would fight us).

A condition is True while any finding of its fault classes at warning severity or above is
active; its reason is the most severe finding's reason and its message names the GPUs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from supervisor.findings import FaultClass, Finding, Severity


@dataclass(frozen=True, slots=True)
class ConditionType:
    type: str
    healthy_reason: str
    healthy_message: str
    classes: frozenset[FaultClass]


CONDITION_TYPES: tuple[ConditionType, ...] = (
    ConditionType("GPUDriverProblem", "GPUDriverReady", "NVML is initialised and answers",
                  frozenset({FaultClass.DRIVER_ERROR})),
    ConditionType("GPUMissing", "AllGPUsVisible", "every expected GPU is visible to NVML",
                  frozenset({FaultClass.GPU_MISSING})),
    ConditionType("GPULost", "AllGPUsPresent", "every GPU answers NVML",
                  frozenset({FaultClass.GPU_LOST})),
    ConditionType("GPUUnresponsive", "GPUsResponsive", "every NVML probe meets its deadline",
                  frozenset({FaultClass.GPU_UNRESPONSIVE})),
    ConditionType("GPUXidError", "GPUHasNoXidError", "no actionable XID error",
                  frozenset({FaultClass.XID})),
    ConditionType("GPUMemoryError", "GPUMemoryHealthy",
                  "no uncorrectable ECC, row-remap or page-retirement problem",
                  frozenset({FaultClass.ECC_UNCORRECTABLE, FaultClass.ECC_CORRECTABLE_STORM,
                             FaultClass.RETIRED_PAGES, FaultClass.ROW_REMAP})),
    ConditionType("GPUThermalSlowdown", "GPUClocksNormal", "no thermal or power slowdown",
                  frozenset({FaultClass.THERMAL, FaultClass.CLOCK_THROTTLE})),
    ConditionType("GPUNVLinkProblem", "GPUNVLinkHealthy", "every NVLink is up and clean",
                  frozenset({FaultClass.NVLINK_DOWN, FaultClass.NVLINK_ERRORS})),
    ConditionType("GPUPCIeProblem", "GPUPCIeHealthy",
                  "every PCIe link runs at its rated width without a replay storm",
                  frozenset({FaultClass.PCIE_DEGRADED, FaultClass.PCIE_REPLAYS})),
)

OUR_TYPES = frozenset(c.type for c in CONDITION_TYPES)


@dataclass(frozen=True, slots=True)
class NodeCondition:
    type: str
    status: bool
    reason: str
    message: str


def evaluate(findings: list[Finding]) -> dict[str, NodeCondition]:
    """The desired state of every one of our condition types."""
    result: dict[str, NodeCondition] = {}
    for ctype in CONDITION_TYPES:
        relevant = [f for f in findings
                    if f.fault_class in ctype.classes and f.severity.rank >= Severity.WARNING.rank]
        if not relevant:
            result[ctype.type] = NodeCondition(ctype.type, False, ctype.healthy_reason,
                                               ctype.healthy_message)
            continue
        relevant.sort(key=lambda f: (-f.severity.rank, f.subject.index or 0, f.key.detail))
        worst = relevant[0]
        gpus = sorted({f.subject.index for f in relevant if f.subject.index is not None})
        message = worst.message
        if len(gpus) > 1:
            message = f"GPUs {', '.join(map(str, gpus))}: {message}"
        elif gpus and not re.match(rf"GPU {gpus[0]}\b", message):
            # GPU detectors name their GPU already ("GPU 3 (GPU-…): …"); say it once.
            message = f"GPU {gpus[0]}: {message}"
        if len(relevant) > 1:
            message += f" (+{len(relevant) - 1} more)"
        # Messages are shown in `kubectl describe node`; keep them to one readable line.
        result[ctype.type] = NodeCondition(ctype.type, True, worst.reason, message[:1000])
    return result
