"""The controller's health model: GPU → node → pod → pipeline group → model.

Fed from three sources and nothing else:

- node reports (``accept_report``): each agent's active findings, replaced wholesale by
  every report, so a cleared finding disappears with the next report;
- pod reports (``accept_pod_report``): each sidecar's findings about its engine and its
  group, kept by the reporting pod's UID and mapped to that pod's group (the ingest has
  bound the report to the pod and taken its node from the Pod object); a sidecar silent
  for ``silence_seconds`` no longer counts (its pod may be gone, or cut off — then its
  peers' reports carry the partition);

A report the ingest could not prove was made after this controller started (it lacks our
epoch: ``confirmed`` False) is *held*: it tells us its sender is alive and nothing else —
it neither raises nor clears a finding.
- the Node watch: Ready condition and cordon state;
- the Pod watch: group membership from labels, readiness of each member;
- the LeaderWorkerSet watch: how many pods make a complete group, and the model label.

Groups are discovered from labels. A LeaderWorkerSet group is every pod with the same
``leaderworkerset.sigs.k8s.io/name`` and ``group-index`` in one namespace; its leader has
``worker-index`` 0. Other multi-pod replicas (KubeRay multi-host worker groups, anything
else) are described in settings as a *generic group kind*: a label selector plus the label
whose value names the group. A group's model is the pod label ``gpu-supervisor.io/model``,
falling back to the LWS (or kind) name.

From that the model derives what policy needs: ``signals()`` — active findings mapped to
the groups they hit — and ``view()`` — every group with its model and whether it is
healthy right now. Application-class XIDs are first attributed (``attribution``): to the
GPU (node-local, as any GPU fault), to the workload (replaced by a
``workload_crash_loop`` signal about the group), or to neither yet (the node a suspect).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from policies.model import GroupView, Signal, View
from supervisor.controller.attribution import (
    WORKLOAD_CRASH_LOOP,
    CrashLoop,
    Sighting,
    XidAttribution,
    xid_code,
)
from supervisor.controller.ingest import NodeReport, PodReport, ReportedFinding
from supervisor.runtime.clock import Clock

LWS_NAME = "leaderworkerset.sigs.k8s.io/name"
LWS_GROUP = "leaderworkerset.sigs.k8s.io/group-index"
LWS_WORKER = "leaderworkerset.sigs.k8s.io/worker-index"
MODEL_LABEL = "gpu-supervisor.io/model"
READINESS_GATE = "gpu-supervisor.io/serving"
SIGHTING_SECONDS = 15.0  # an XID last seen longer before its report is not a new sighting

# Fault classes whose cause sits on the node that reported them; the rest (partitions,
# collective hangs) are properties of a group or a link.
NODE_LOCAL = frozenset({
    "gpu_lost", "gpu_unresponsive", "xid", "ecc_uncorrectable", "ecc_correctable_storm",
    "retired_pages", "row_remap", "thermal", "clock_throttle", "nvlink_down",
    "nvlink_errors", "pcie_degraded", "pcie_replays", "node_down", "driver_error",
    "gpu_missing", "collective_slow",
})


@dataclass(frozen=True, slots=True)
class GroupKind:
    """A generic group kind: pods matching ``selector`` grouped by ``group_label``."""

    name: str
    selector: str
    group_label: str
    model: str = ""


@dataclass
class PodInfo:
    namespace: str
    name: str
    uid: str
    node: str | None
    group: str
    kind: str  # "lws" or a generic kind name
    worker_index: int | None
    model: str
    capable: bool  # containers ready: able to serve if traffic were sent
    terminating: bool
    gate: str | None  # our readiness-gate condition: "True", "False", or None (not set yet)
    resource_version: str = ""  # as last seen by the watch: the precondition of our writes


@dataclass
class GroupInfo:
    key: str
    kind: str
    namespace: str
    owner: str
    model: str
    pods: dict[str, PodInfo] = field(default_factory=dict)

    def leader(self) -> PodInfo | None:
        leaders = [p for p in self.pods.values() if p.worker_index == 0]
        return leaders[0] if leaders else None

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(sorted({p.node for p in self.pods.values() if p.node}))


@dataclass
class PodReportState:
    report: PodReport
    received: float  # monotonic
    became_bad_at: float | None = None


@dataclass
class NodeInfo:
    name: str
    uid: str = ""
    ready: bool | None = None
    unschedulable: bool = False
    quarantined: bool = False
    last_report: float | None = None  # monotonic receive time
    report: NodeReport | None = None
    became_bad_at: float | None = None  # receive time of the report that first had findings
    not_ready_since: float | None = None


def _condition(obj: dict[str, Any], ctype: str) -> str | None:
    for cond in obj.get("status", {}).get("conditions") or []:
        if cond.get("type") == ctype:
            return str(cond.get("status"))
    return None


class HealthModel:
    def __init__(self, clock: Clock, *, silence_seconds: float,
                 kinds: Iterable[GroupKind] = (), quarantine_taint: str = "",
                 attribution_window: float = 3600.0) -> None:
        self._clock = clock
        self.attribution = XidAttribution(attribution_window)
        self.crash_loops: dict[str, CrashLoop] = {}  # as of the last signals()
        self.silence_seconds = silence_seconds
        self.kinds = list(kinds)
        self.quarantine_taint = quarantine_taint
        self.nodes: dict[str, NodeInfo] = {}
        self.groups: dict[str, GroupInfo] = {}
        self._pod_group: dict[str, str] = {}  # uid → group key
        # Sidecar reports by the reporting pod's UID; those with findings also in
        # _pod_attention. A new pod of the same name is another sender with its own entry.
        self.pod_reports: dict[str, PodReportState] = {}
        self._pod_attention: set[str] = set()
        self._groups_by_node: dict[str, set[str]] = {}
        # LeaderWorkerSet objects: (namespace, name) → (group size, model label)
        self.lws: dict[tuple[str, str], tuple[int, str]] = {}
        # Pods still without our readiness-gate condition (uid → group key): the
        # controller admits them, and looks only here rather than at every pod.
        self.ungated: dict[str, str] = {}
        self.changed = asyncio.Event()
        # Nodes that may produce a signal (findings reported, or not Ready): signals() and
        # view() look only at these, not at every node of a 4,096-node fleet.
        self._attention: set[str] = set()

    # --- pods ------------------------------------------------------------------------------

    def _classify_pod(self, obj: dict[str, Any]) -> tuple[str, str, str, int | None, str] | None:
        meta = obj.get("metadata", {})
        labels: dict[str, str] = meta.get("labels") or {}
        ns = meta.get("namespace", "")
        if LWS_NAME in labels and LWS_GROUP in labels:
            owner = labels[LWS_NAME]
            worker = labels.get(LWS_WORKER)
            key = f"{ns}/{owner}/{labels[LWS_GROUP]}"
            model = labels.get(MODEL_LABEL, owner)
            return key, "lws", owner, int(worker) if worker and worker.isdigit() else None, model
        for kind in self.kinds:
            value = labels.get(kind.group_label)
            if value is not None and _matches(labels, kind.selector):
                key = f"{ns}/{kind.name}/{value}"
                return key, kind.name, kind.name, None, labels.get(MODEL_LABEL,
                                                                  kind.model or kind.name)
        return None

    def upsert_pod(self, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata", {})
        uid = meta.get("uid", "")
        classified = self._classify_pod(obj)
        if classified is None:
            self.delete_pod(obj)
            return
        key, kind, owner, worker, model = classified
        node = obj.get("spec", {}).get("nodeName")
        pod = PodInfo(namespace=meta.get("namespace", ""), name=meta.get("name", ""), uid=uid,
                      node=node, group=key, kind=kind, worker_index=worker, model=model,
                      capable=_condition(obj, "ContainersReady") == "True",
                      terminating=bool(meta.get("deletionTimestamp")),
                      gate=_condition(obj, READINESS_GATE),
                      resource_version=str(meta.get("resourceVersion", "")))
        old_key = self._pod_group.get(uid)
        if old_key is not None and old_key != key:
            self.delete_pod(obj)
        elif old_key is not None:
            old = self.groups[old_key].pods.get(uid)
            if old is not None and (old.node, old.capable, old.terminating, old.model) == \
                    (pod.node, pod.capable, pod.terminating, pod.model):
                # Only our own gate (or fields we ignore) moved: nothing to re-decide.
                self.groups[old_key].pods[uid] = pod
                self._track_gate(pod)
                return
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = GroupInfo(key=key, kind=kind, namespace=pod.namespace,
                                                 owner=owner, model=model)
        group.pods[uid] = pod
        self._track_gate(pod)
        self._pod_group[uid] = key
        if node:
            self._groups_by_node.setdefault(node, set()).add(key)
        self.changed.set()

    def _track_gate(self, pod: PodInfo) -> None:
        if pod.gate is None and not pod.terminating:
            self.ungated[pod.uid] = pod.group
        else:
            self.ungated.pop(pod.uid, None)

    def delete_pod(self, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata", {})
        uid = meta.get("uid", "")
        self.pod_reports.pop(uid, None)  # its sidecar's findings go with it
        self._pod_attention.discard(uid)
        self.ungated.pop(uid, None)
        key = self._pod_group.pop(uid, None)
        if key is None:
            return
        group = self.groups.get(key)
        if group is not None:
            pod = group.pods.pop(uid, None)
            if not group.pods:
                del self.groups[key]
            if pod is not None and pod.node:
                still = any(p.node == pod.node for p in group.pods.values())
                if not still:
                    self._groups_by_node.get(pod.node, set()).discard(key)
        self.changed.set()

    # --- LeaderWorkerSets ------------------------------------------------------------------

    def upsert_lws(self, obj: dict[str, Any]) -> None:
        """An LWS tells what a complete group is (``size`` pods) and may name the model."""
        meta = obj.get("metadata", {})
        template = obj.get("spec", {}).get("leaderWorkerTemplate", {})
        size = int(template.get("size") or 1)
        model = (meta.get("labels") or {}).get(MODEL_LABEL, "")
        key = (meta.get("namespace", ""), meta.get("name", ""))
        if self.lws.get(key) != (size, model):
            self.lws[key] = (size, model)
            self.changed.set()

    def delete_lws(self, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata", {})
        self.lws.pop((meta.get("namespace", ""), meta.get("name", "")), None)
        self.changed.set()

    def expected_size(self, group: GroupInfo) -> int | None:
        if group.kind != "lws":
            return None
        known = self.lws.get((group.namespace, group.owner))
        return known[0] if known else None

    def model_of(self, group: GroupInfo) -> str:
        if group.kind == "lws":
            known = self.lws.get((group.namespace, group.owner))
            if known and known[1]:
                return known[1]
        return group.model

    def groups_on(self, node: str) -> tuple[str, ...]:
        return tuple(sorted(self._groups_by_node.get(node, ())))

    # --- nodes -----------------------------------------------------------------------------

    def _node(self, name: str) -> NodeInfo:
        info = self.nodes.get(name)
        if info is None:
            info = self.nodes[name] = NodeInfo(name)
        return info

    def upsert_node(self, obj: dict[str, Any]) -> None:
        info = self._node(obj["metadata"]["name"])
        info.uid = obj["metadata"].get("uid", "")
        ready = _condition(obj, "Ready")
        was = info.ready
        before = (info.ready, info.unschedulable, info.quarantined)
        info.ready = None if ready is None else ready == "True"
        if info.ready is False and was is not False:
            info.not_ready_since = self._clock.monotonic()
        elif info.ready is not False:
            info.not_ready_since = None
        spec = obj.get("spec", {})
        info.unschedulable = bool(spec.get("unschedulable"))
        info.quarantined = any(t.get("key") == self.quarantine_taint
                               for t in spec.get("taints") or [])
        if (info.ready, info.unschedulable, info.quarantined) != before:
            self.changed.set()
        if info.ready is False:
            self._attention.add(info.name)

    def delete_node(self, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        info = self.nodes.get(meta["name"])
        # A Node deleted and registered again under its name is a new object: the delete of
        # the old one (a relist learns of it after the new one) must not drop it.
        if info is not None and (not info.uid or not meta.get("uid")
                                 or info.uid == meta["uid"]):
            del self.nodes[meta["name"]]
            self.changed.set()

    def accept_report(self, report: NodeReport, received: float) -> None:
        info = self._node(report.node)
        was_silent = info.last_report is None or received - info.last_report > \
            self.silence_seconds
        info.last_report = received
        if not report.confirmed:  # held: alive, and nothing more (module docstring)
            return
        actionable = any(f.severity != "info" for f in report.findings)
        if actionable and info.became_bad_at is None:
            info.became_bad_at = received
        elif not actionable:
            info.became_bad_at = None
        before = _finding_keys(info.report)
        self._sightings(info.report, report, received)
        info.report = report
        if report.findings:
            self._attention.add(report.node)
        # Most reports are heartbeats repeating what we know; only a change in what a node
        # reports (or a node coming back) needs a policy evaluation now. Timers (for:,
        # after:) are served by the decision loop's periodic pass.
        if was_silent or _finding_keys(report) != before:
            self.changed.set()

    def _sightings(self, old: NodeReport | None, new: NodeReport, received: float) -> None:
        """Each new application-class XID — a new finding, or one whose ``last_seen``
        moved — with the groups on the node at the time (``attribution``). Only XIDs that
        just happened: the agent reports one within a second, so one last seen long before
        its report (what a restarted controller first hears of) happened under groups we
        cannot know any more, and is no evidence about the ones there now."""
        seen = {(f.subject_id, f.detail): f.last_seen for f in old.findings} if old else {}
        for f in new.findings:
            code = xid_code(f.fault_class, f.detail)
            if code is None or new.sent_at - f.last_seen > SIGHTING_SECONDS:
                continue
            last = seen.get((f.subject_id, f.detail))
            if last is None or f.last_seen > last:
                self.attribution.observe(Sighting(received, new.node, f.subject_id, code,
                                                  frozenset(self.groups_on(new.node))))

    def accept_pod_report(self, report: PodReport, received: float) -> None:
        if not report.confirmed:  # held (module docstring)
            return
        key = report.uid
        state = self.pod_reports.get(key)
        was_silent = state is None or received - state.received > self.silence_seconds
        before = _finding_keys(state.report if state else None)
        actionable = any(f.severity != "info" for f in report.findings)
        bad_at = state.became_bad_at if state is not None else None
        self.pod_reports[key] = PodReportState(
            report, received, (bad_at or received) if actionable else None)
        if report.findings:
            self._pod_attention.add(key)
        if was_silent or _finding_keys(report) != before:
            self.changed.set()

    def pod(self, uid: str) -> PodInfo | None:
        """The group member with this UID, as the Pod watch has it."""
        group = self.groups.get(self._pod_group.get(uid, ""))
        return None if group is None else group.pods.get(uid)

    def _fresh_pod_reports(self, now: float) -> list[tuple[PodReportState, PodInfo]]:
        """Sidecar reports with findings, fresh, from pods we know the group of."""
        out = []
        for key in list(self._pod_attention):
            state = self.pod_reports.get(key)
            if state is None or not state.report.findings:
                self._pod_attention.discard(key)
                continue
            pod = self.pod(key)
            if pod is not None and now - state.received <= self.silence_seconds:
                out.append((state, pod))
        return out

    # --- derived ---------------------------------------------------------------------------

    def silent_nodes(self) -> list[str]:
        now = self._clock.monotonic()
        return [n.name for n in self.nodes.values()
                if n.last_report is not None and now - n.last_report > self.silence_seconds]

    def _attributed(self, f: ReportedFinding, groups: tuple[str, ...], now: float
                    ) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
        """For a node finding against the ``groups`` on its node: whose it is ("gpu",
        "workload", "unsure"; "" for anything but an application-class XID), the groups
        it counts against (none when it is a workload's; when unproven, only those it was
        seen under — not a group placed on the node since), and the groups at fault for a
        workload's."""
        if xid_code(f.fault_class, f.detail) is None:
            return "", groups, ()
        verdict = self.attribution.verdict(f.subject_id, now)
        if verdict.whose == "workload":
            return verdict.whose, (), verdict.groups
        if verdict.whose == "unsure":
            seen = self.attribution.groups_seen(f.subject_id)
            return verdict.whose, tuple(g for g in groups if g in seen), ()
        return verdict.whose, groups, ()

    def signals(self) -> list[Signal]:
        now = self._clock.monotonic()
        out: list[Signal] = []
        crashing: dict[str, float] = {}  # group → since: its XIDs are the workload's
        for name in list(self._attention):
            info = self.nodes.get(name)
            if info is None or (info.ready is not False and not (
                    info.report and info.report.findings)):
                self._attention.discard(name)
                continue
            groups = self.groups_on(info.name)
            report = info.report
            if report is not None and info.last_report is not None:
                # Reporter clocks differ from ours; keep only the *age* it reports.
                for f in report.findings:
                    age = max(0.0, report.sent_at - f.first_seen)
                    since = min(now, info.last_report - age)
                    whose, hit, at_fault = self._attributed(f, groups, now)
                    for group in at_fault:
                        crashing[group] = min(crashing.get(group, since), since)
                    if whose == "workload":
                        continue  # the workload's crash, not evidence against this node
                    out.append(Signal(
                        fault_class=f.fault_class, severity=f.severity,
                        subject_kind=f.subject_kind, subject_id=f.subject_id, node=info.name,
                        groups=hit,
                        node_local=f.fault_class in NODE_LOCAL and whose != "unsure",
                        since=since, suspect=whose == "unsure"))
            silent = info.last_report is None or now - info.last_report > self.silence_seconds
            if info.ready is False and silent and info.not_ready_since is not None:
                out.append(Signal(fault_class="node_down", severity="critical",
                                  subject_kind="node", subject_id=info.name, node=info.name,
                                  groups=groups, node_local=True, since=info.not_ready_since))
        loops = self.attribution.crash_loops(now)
        self.crash_loops = {g: loops[g] for g in crashing if g in loops}
        for group, since in sorted(crashing.items()):
            crashed = self.groups.get(group)
            if crashed is not None:
                out.append(Signal(
                    fault_class=WORKLOAD_CRASH_LOOP, severity="critical",
                    subject_kind="model", subject_id=self.model_of(crashed), node=None,
                    groups=(group,), node_local=False, since=since))
        for state, pod in self._fresh_pod_reports(now):
            for f in state.report.findings:
                age = max(0.0, state.report.sent_at - f.first_seen)
                # A finding may name another member of the group (a collective check
                # localized the slow member): the ingest took that member's node from its
                # Pod object, and that node is where the cause sits.
                out.append(Signal(
                    fault_class=f.fault_class, severity=f.severity,
                    subject_kind=f.subject_kind, subject_id=f.subject_id,
                    node=f.subject_node or pod.node,
                    groups=(pod.group,), node_local=f.fault_class in NODE_LOCAL,
                    since=min(now, state.received - age)))
        return out

    def view(self) -> View:
        now = self._clock.monotonic()
        sick: set[str] = set()
        for name in self._attention:
            info = self.nodes.get(name)
            if info is None:
                continue
            if info.report is not None:
                on_node = self.groups_on(info.name)
                for f in info.report.findings:
                    if f.severity != "info":
                        sick.update(self._attributed(f, on_node, now)[1])
            if info.ready is False:
                sick.update(self.groups_on(info.name))
        for state, pod in self._fresh_pod_reports(now):
            if any(f.severity != "info" for f in state.report.findings):
                sick.add(pod.group)
        groups = {}
        for key, group in self.groups.items():
            size = self.expected_size(group)
            complete = size is None or len(group.pods) >= size  # a missing member stops it
            healthy = key not in sick and bool(group.pods) and complete and all(
                p.capable and not p.terminating for p in group.pods.values())
            groups[key] = GroupView(key=key, model=self.model_of(group), healthy=healthy,
                                    nodes=group.nodes)
        return View(groups=groups)

    def detection_time(self, target: str) -> float | None:
        """When the fault behind an action on ``target`` (group or node) first reached us."""
        if target in self.groups:
            group = self.groups[target]
            times = [self.nodes[n].became_bad_at for n in group.nodes
                     if n in self.nodes and self.nodes[n].became_bad_at is not None]
            times += [state.became_bad_at for p in group.pods.values()
                      if (state := self.pod_reports.get(p.uid)) is not None
                      and state.became_bad_at is not None]
        else:
            info = self.nodes.get(target)
            times = [info.became_bad_at] if info and info.became_bad_at is not None else []
        return min((t for t in times if t is not None), default=None)


def _finding_keys(report: NodeReport | PodReport | None
                  ) -> frozenset[tuple[str, str, str, str]]:
    if report is None:
        return frozenset()
    return frozenset((f.fault_class, f.subject_id, f.detail, f.severity)
                     for f in report.findings)


def _matches(labels: dict[str, str], selector: str) -> bool:
    """Equality-based label selector ("a=b,c=d", "a!=b", "a") as Kubernetes reads it."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            k, v = term.split("!=", 1)
            if labels.get(k.strip()) == v.strip():
                return False
        elif "=" in term:
            k, v = term.split("=", 1)
            if labels.get(k.strip().rstrip("=")) != v.strip():
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True
