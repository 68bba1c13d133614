"""Policies decide what to do about findings: rules, budgets, escalation, the actions to take.

This is the lowest layer that reasons about the cluster, and it is pure: no I/O, no clocks
of its own, no client libraries, and it never imports ``supervisor`` or ``probes``
(import-linter enforces it). ``supervisor`` turns findings into ``Signal``s, hands them over
with a ``View`` of the groups, carries out the ``Decision``s it gets back and reports each
outcome. Keeping the decisions here, as data, is what makes them testable with a fake clock
and reviewable without a cluster.

- ``policies.model``   the shared vocabulary: Signal, View, Decision, Refusal, Action
- ``policies.schema``  the YAML policy: validation with errors that name the field
- ``policies.engine``  incidents, escalation ladders, cooldowns, budgets, circuit breaker,
                       degrade/restore, snapshot/restore for a new leader
- ``default.yaml``     the shipped policy (``default_policy()``)
"""

from policies.engine import PolicyEngine
from policies.model import (
    Action,
    Decision,
    Evaluation,
    GroupView,
    Refusal,
    Signal,
    View,
)
from policies.schema import (
    Policy,
    PolicyError,
    default_policy,
    load_policy,
    load_policy_file,
)

__all__ = [
    "Action",
    "Decision",
    "Evaluation",
    "GroupView",
    "Policy",
    "PolicyEngine",
    "PolicyError",
    "Refusal",
    "Signal",
    "View",
    "default_policy",
    "load_policy",
    "load_policy_file",
]
