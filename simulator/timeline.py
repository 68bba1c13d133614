"""What happened to each fault, seen from outside the supervisor.

Every time is measured by watching the API server, as a user with ``kubectl get -w`` would
see it — never from the supervisor's own logs:

- *detected*: the first finding of the fault's class on the daemon that should see it
  (the node's agent, or the pod's sidecar), from its ``first_seen``;
- *traffic off*: the replica's leader pod is no longer a ready endpoint of its model's
  Service (the EndpointSlice, written by kube-controller-manager);
- *restarted*: a pod of the group that existed at injection is being deleted;
- *quarantined*: the fault's node carries our quarantine taint;
- *recovered*: after traffic went off, the replica serves again (its leader a ready
  endpoint, every member Ready);
- *capacity restored*: after that, every group of the replica's model serves again (the
  model back at the capacity it had before the fault);
- *crash loop*: the leading controller names the group's crash loop (its /status: the
  group's application-class XIDs followed it across nodes);
- *breaker*: a controller's circuit breaker is open (its /status).

Requests that reached a sick replica (between injection and traffic off) are counted by
:class:`simulator.traffic.Traffic` and attributed here.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from simulator.processes import DaemonProcess
from simulator.scenario import Fault
from simulator.world import GROUP_LABEL, GroupRef
from supervisor.controller.actions import QUARANTINE_TAINT

STEPS = ("injected", "detected", "traffic_off", "quarantined", "restarted", "recovered",
         "capacity_restored", "degraded", "restored", "crash_loop", "breaker")


@dataclass
class FaultRecord:
    fault: Fault
    group: GroupRef | None
    node: str | None = None
    pod: str | None = None
    times: dict[str, float] = field(default_factory=dict)  # step → wall time
    detail: dict[str, str] = field(default_factory=dict)  # step → what was seen
    uids: frozenset[str] = frozenset()  # the group's pods at injection
    leader_ip: str | None = None  # the replica's address in the Service at injection
    sick_requests: int = 0
    sick: Counter[str] = field(default_factory=Counter)  # sent, answered, failed, hung
    daemon: DaemonProcess | None = None  # the agent or sidecar that should see the fault
    log_offset: int = 0  # how far its log has been read
    undo: list[list[str]] = field(default_factory=list)  # iptables rules of a partition
    release: Callable[[], None] | None = None  # lets a stalled all-reduce worker run again
    # When it was undone: by a later fault (resumed, cleared, healed, repaired) or the
    # bench's repair between trials.
    undone_at: float | None = None
    nodes: set[str] = field(default_factory=set)  # every node its XIDs were injected on
    serving: bool = True  # its group served at injection (else no traffic to take off)
    skipped: str = ""  # why it was never injected: no pod came to hold its rank in time
    groups_hit: set[str] = field(default_factory=set)  # other groups its XIDs reached

    @property
    def ended(self) -> bool:
        return self.undone_at is not None

    def at(self, step: str) -> float | None:
        """Seconds from injection to ``step``, or None if it has not happened."""
        if step not in self.times or "injected" not in self.times:
            return None
        return self.times[step] - self.times["injected"]

    def mark(self, step: str, wall: float | None = None, detail: str = "") -> bool:
        """Record ``step`` once; True the first time."""
        if step in self.times or ("injected" not in self.times and step != "injected"):
            return False
        self.times[step] = time.time() if wall is None else wall
        if detail:
            self.detail[step] = detail
        return True

    def as_json(self) -> dict[str, Any]:
        return {"name": self.fault.name, "kind": self.fault.kind,
                "target": str(self.fault.target) if self.fault.target else None,
                "group": self.group.key if self.group else None, "node": self.node,
                "pod": self.pod, "injected_at": self.times.get("injected"),
                "skipped": self.skipped or None, "serving_at_injection": self.serving,
                "seconds_after_injection": {s: round(v, 3) for s in STEPS[1:]
                                            if (v := self.at(s)) is not None},
                "detail": self.detail, "requests_to_sick_replica": self.sick_requests,
                "sick_requests": self.sick_split()}

    def sick_split(self) -> dict[str, int]:
        """The requests that reached the sick replica: sent = answered + failed + hung
        (no answer within the clients' timeout) + in flight at the end."""
        c = self.sick
        return {"sent": c["sent"], "answered": c["answered"], "failed": c["failed"],
                "hung": c["hung"],
                "in_flight": c["sent"] - c["answered"] - c["failed"] - c["hung"]}


class ClusterView:
    """The serving state as the API server shows it, kept from watch events."""

    def __init__(self) -> None:
        self.pods: dict[str, dict[str, Any]] = {}  # name → pod
        self.ready_endpoints: dict[str, set[str]] = {}  # EndpointSlice name → ready IPs
        self.slice_service: dict[str, str] = {}  # EndpointSlice name → its Service
        self.taints: dict[str, set[str]] = {}  # node → taint keys
        self.selectors: dict[str, dict[str, str]] = {}  # Service → its selector
        # model → (its front Service, the fallback's selector): degraded while they match
        self.fronts: dict[str, tuple[str, dict[str, str]]] = {}
        # model → (its HTTPRoute, the fallback's Service); route → backend → weight
        self.routes: dict[str, tuple[str, str]] = {}
        self.route_weights: dict[str, dict[str, int]] = {}
        self.groups: list[GroupRef] = []  # every group of the scenario, once known

    def groups_of(self, model: str) -> list[GroupRef]:
        return [g for g in self.groups if g.model.name == model]

    def ready_ips(self) -> set[str]:
        out: set[str] = set()
        for ips in self.ready_endpoints.values():
            out |= ips
        return out

    def service_ips(self, service: str) -> set[str]:
        """The ready addresses behind ``service`` (its EndpointSlices')."""
        out: set[str] = set()
        for name, ips in self.ready_endpoints.items():
            if self.slice_service.get(name) == service:
                out |= ips
        return out

    def entry(self, model: str) -> list[tuple[str, int]]:
        """Where ``model``'s clients go: (Service, weight) — its HTTPRoute's backends, or
        its front Service, or its own Service."""
        route = self.routes.get(model)
        if route is not None:
            return sorted(self.route_weights.get(route[0], {}).items())
        front = self.fronts.get(model)
        return [(front[0] if front else model, 1)]

    def on_slice(self, kind: str, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        if kind == "DELETED":
            self.ready_endpoints.pop(name, None)
            self.slice_service.pop(name, None)
            return
        self.slice_service[name] = obj["metadata"].get("labels", {}).get(
            "kubernetes.io/service-name", "")
        ready: set[str] = set()
        for endpoint in obj.get("endpoints") or []:
            if (endpoint.get("conditions") or {}).get("ready"):
                ready.update(endpoint.get("addresses") or [])
        self.ready_endpoints[name] = ready

    def on_pod(self, kind: str, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        if kind == "DELETED":
            self.pods.pop(name, None)
        else:
            self.pods[name] = obj

    def on_service(self, kind: str, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        if kind == "DELETED":
            self.selectors.pop(name, None)
        else:
            self.selectors[name] = dict(obj.get("spec", {}).get("selector") or {})

    def degraded(self, model: str) -> bool | None:
        """Whether ``model``'s clients are sent to its fallback (None: it has none): its
        front Service selects the fallback's pods, or its HTTPRoute gives the fallback's
        Service weight (shared with the model's own while some of its groups serve)."""
        route = self.routes.get(model)
        if route is not None:
            weights = self.route_weights.get(route[0], {})
            return weights.get(route[1], 0) > 0
        front = self.fronts.get(model)
        if front is None:
            return None
        return self.selectors.get(front[0]) == front[1]

    def on_route(self, kind: str, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        if kind == "DELETED":
            self.route_weights.pop(name, None)
            return
        weights: dict[str, int] = {}
        for rule in obj.get("spec", {}).get("rules") or []:
            for ref in rule.get("backendRefs") or []:
                weights[ref["name"]] = weights.get(ref["name"], 0) + int(ref.get("weight", 1))
        self.route_weights[name] = weights

    def on_node(self, kind: str, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        if kind == "DELETED":
            self.taints.pop(name, None)
        else:
            self.taints[name] = {t.get("key", "") for t in obj.get("spec", {}).get("taints")
                                 or []}

    def group_pods(self, group: GroupRef) -> list[dict[str, Any]]:
        return [p for p in self.pods.values()
                if p["metadata"].get("labels", {}).get(GROUP_LABEL) == group.name]

    def leader_ip(self, group: GroupRef) -> str | None:
        pod = self.pods.get(group.name)
        if pod is None or pod["metadata"].get("deletionTimestamp"):
            return None
        ip = pod.get("status", {}).get("podIP")
        return str(ip) if ip else None

    def serving(self, group: GroupRef) -> bool:
        """The replica takes traffic: its leader a ready endpoint, every member Ready."""
        ip = self.leader_ip(group)
        pods = self.group_pods(group)
        return (ip is not None and ip in self.ready_ips() and len(pods) == group.model.size
                and all(_ready(p) for p in pods))

    def group_of_ip(self, ip: str, groups: list[GroupRef]) -> GroupRef | None:
        for group in groups:
            if self.leader_ip(group) == ip:
                return group
        return None


def _ready(pod: dict[str, Any]) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in pod.get("status", {}).get("conditions") or [])


def update(record: FaultRecord, view: ClusterView) -> list[str]:
    """Advance one fault's steps from the current view; the steps newly reached."""
    reached: list[str] = []
    if "injected" not in record.times or record.group is None:
        return reached
    group = record.group
    ready = view.ready_ips()
    if record.leader_ip is not None and record.leader_ip not in ready and \
            record.mark("traffic_off", detail=f"{record.leader_ip} not ready in the "
                        f"{group.model.name} EndpointSlice"):
        reached.append("traffic_off")
    live = {p["metadata"]["uid"]: p for p in view.group_pods(group)}
    gone = [u for u in record.uids if u not in live or live[u]["metadata"].get(
        "deletionTimestamp")]
    if gone and record.mark("restarted", detail=f"{len(gone)} of the group's pods deleted"):
        reached.append("restarted")
    for node in sorted(record.nodes | ({record.node} if record.node else set())):
        if QUARANTINE_TAINT in view.taints.get(node, set()) and \
                record.mark("quarantined", detail=f"node {node} tainted"):
            reached.append("quarantined")
    degraded = view.degraded(group.model.name)
    if degraded and record.mark("degraded", detail=f"{group.model.name}'s clients sent to "
                                "its fallback"):
        reached.append("degraded")
    if degraded is False and "degraded" in record.times and record.mark(
            "restored", detail=f"{group.model.name}'s clients back on it"):
        reached.append("restored")
    # A group that was not serving at injection (being recreated) had no traffic to lose:
    # it recovers once recreated again and serving.
    off = "traffic_off" in record.times or (not record.serving and "restarted" in record.times)
    if off and view.serving(group) and record.mark(
            "recovered", detail=f"{group.name} serving again"
            + (" (new pods)" if "restarted" in record.times else "")):
        reached.append("recovered")
    if "recovered" in record.times and all(
            view.serving(g) for g in view.groups_of(group.model.name) or [group]) and record.mark(
            "capacity_restored", detail=f"every group of {group.model.name} serving"):
        reached.append("capacity_restored")
    return reached


# What the supervisor (or anyone) can do to the serving fleet, as the API server shows it;
# every one must be explained by a fault or allowed by the scenario (``allow:``).
ACTIONS = ("traffic_off", "quarantine", "restart", "degrade")
# Seen and printed, never judged: each undoes an action that was judged already.
UNDOINGS = ("quarantine_lifted", "restore")


@dataclass
class Action:
    """One action seen on the API server: what, to which group (traffic_off, restart),
    node (quarantine) or model (degrade), when, and which faults explain it."""

    at: float  # wall time it was seen
    kind: str
    subject: str
    faults: tuple[str, ...] = ()
    allowed: bool = False

    @property
    def judged(self) -> bool:
        return self.kind in ACTIONS

    @property
    def unexplained(self) -> bool:
        return self.judged and not self.faults and not self.allowed

    def describe(self) -> str:
        what = f"{self.kind.replace('_', ' '):<17} {self.subject}"
        if self.faults:
            return f"{what}  for {', '.join(self.faults)}"
        if self.allowed:
            return f"{what}  no fault explains it; allowed by the scenario"
        if not self.judged:
            return what
        return f"{what}  UNATTRIBUTED: no fault explains it"

    def as_json(self) -> dict[str, Any]:
        return {"at": self.at, "action": self.kind, "subject": self.subject,
                "faults": list(self.faults), "allowed": self.allowed,
                "attributed": bool(self.faults)}


@dataclass(frozen=True)
class Snapshot:
    """The state actions change: which groups serve and their live pods, which nodes carry
    our taint, which models are degraded."""

    serving: frozenset[str]
    uids: dict[str, frozenset[str]]  # group → its pods not being deleted
    quarantined: frozenset[str]
    degraded: frozenset[str]

    @classmethod
    def of(cls, view: ClusterView, groups: list[GroupRef]) -> Snapshot:
        models = sorted({g.model.name for g in groups})
        return cls(
            serving=frozenset(g.name for g in groups if view.serving(g)),
            uids={g.name: frozenset(p["metadata"]["uid"] for p in view.group_pods(g)
                                    if not p["metadata"].get("deletionTimestamp"))
                  for g in groups},
            quarantined=frozenset(n for n, keys in view.taints.items()
                                  if QUARANTINE_TAINT in keys),
            degraded=frozenset(m for m in models if view.degraded(m)))


def changes(before: Snapshot, after: Snapshot, restarting: set[str]) -> list[tuple[str, str]]:
    """The actions between two snapshots: (kind, subject). ``restarting`` holds the groups
    whose restart was seen and whose new pods have not appeared yet (a restart deletes the
    pods one by one: it is one action), updated here."""
    out: list[tuple[str, str]] = []
    for group, uids in sorted(after.uids.items()):
        was = before.uids.get(group, frozenset())
        if uids - was:
            restarting.discard(group)  # a new pod: the group's next incarnation
        if was - uids and group not in restarting:
            restarting.add(group)
            out.append(("restart", group))
    out += [("traffic_off", g) for g in sorted(before.serving - after.serving)]
    out += [("quarantine", n) for n in sorted(after.quarantined - before.quarantined)]
    out += [("quarantine_lifted", n) for n in sorted(before.quarantined - after.quarantined)]
    out += [("degrade", m) for m in sorted(after.degraded - before.degraded)]
    out += [("restore", m) for m in sorted(before.degraded - after.degraded)]
    return out


def explaining(kind: str, subject: str, at: float, records: list[FaultRecord]) -> list[str]:
    """The faults injected before ``at`` that explain an action: one in the group that was
    restarted or taken out of traffic (or that the fault's XIDs reached), on the node that
    was quarantined, in a group of the model that was degraded."""
    names: list[str] = []
    for r in records:
        injected = r.times.get("injected")
        if injected is None or injected > at:
            continue
        if kind in ("traffic_off", "restart"):
            hit = (r.group is not None and r.group.name == subject) or subject in r.groups_hit
        elif kind in ("quarantine", "quarantine_lifted"):
            hit = subject == r.node or subject in r.nodes
        else:
            hit = r.group is not None and r.group.model.name == subject
        if hit:
            names.append(r.fault.name)
    return names
