"""The action layer: carries out a policy ``Decision`` on the cluster, idempotently.

- fail_over: our readiness-gate condition ``gpu-supervisor.io/serving`` False on every pod
  of the group, so Services, routers and the inference gateway drop the whole replica at once;
- recover: the same condition True again;
- restart_group: LWS — delete the leader pod (Foreground), as LWS's RecreateGroupOnPodRestart
  does; generic kinds — delete every pod of the group. UID preconditions taken from a
  write-ahead intent make it at-most-once across leader changes;
- quarantine: cordon, add our NoSchedule taint, NodeCondition ``GPUSupervisorQuarantined``
  True; remember whether the node was already cordoned;
- unquarantine: remove our taint, uncordon only if we cordoned, condition False;
- suspect / unsuspect: our PreferNoSchedule taint ``gpu-supervisor.io/suspect`` on a node
  the cause may sit on (unproven), and off again: the scheduler places new work elsewhere
  when it can, nothing is cordoned or evicted;
- degrade: check that the route (or Service) can carry the fallback, record the fallback
  workload's replicas, scale it up, wait until it is ready, then shift traffic — refused,
  with an Event, when the route has no place for the fallback, so a misconfiguration never
  drops traffic. An HTTPRoute's weight is split between the model's groups that still
  serve and the fallback, in proportion to what each side can serve (``_split``), and split
  again when a repeated degrade finds that capacity changed; a Service's selector moves to
  the fallback's, which keeps the primary's pods only if that selector also selects them
  (``_shares_pods``);
- restore: shift back only what degrade changed (and only where nobody changed it since),
  then scale the fallback back to the recorded replicas;
- notify: nothing but the Event, metric and log every action gets.

Fencing: every request carries the controller's ``Fence``, so no attempt — first or
retried — is sent once this replica's Lease is gone or about to be, and none outlives it.
A request already on its way can still arrive late (a slow network, a stopped process);
so every write is conditional — the readiness gate, the node's taint and condition, the
scale subresource and the traffic object on the ``resourceVersion`` last read, a restart's
deletes on the pods' UIDs — and a write decided on a stale view fails with 409 instead of
landing on top of whatever a newer leader wrote since. (Events are new objects: nothing to
overwrite.) Every action ends in an Event, a counter and a structured log line.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog

from policies.model import Action, Decision
from supervisor.controller.model import READINESS_GATE, HealthModel, PodInfo
from supervisor.errors import Fenced, KubeError, KubeTemporaryError, SupervisorError
from supervisor.kube import STRATEGIC_MERGE, Fence, KubeClient, rfc3339
from supervisor.runtime.clock import Clock

log = structlog.get_logger(__name__)

QUARANTINE_TAINT = "gpu-supervisor.io/quarantine"
SUSPECT_TAINT = "gpu-supervisor.io/suspect"  # PreferNoSchedule: new work prefers elsewhere
QUARANTINE_ANNOTATION = "gpu-supervisor.io/quarantine"
QUARANTINE_CONDITION = "GPUSupervisorQuarantined"
TRAFFIC_ANNOTATION = "gpu-supervisor.io/traffic-before-degrade"
COMPONENT = "gpu-supervisor-controller"
GATE_WRITE_ATTEMPTS = 3  # precondition conflicts re-read the pod and try again
DRAIN_STEPS = 4  # a restore gives an HTTPRoute's traffic back a quarter at a time
REFUSAL_EVENT_EVERY_SECONDS = 600.0  # a refusal repeats every evaluation; its Event does not

# When the current action's first request was answered (None: not yet). Task-local: every
# decision runs in its own task, so concurrent actions never see each other's value.
_FIRST_WRITE: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "first_write", default=None)
MERGE = "application/merge-patch+json"


@dataclass(frozen=True, slots=True)
class Workload:
    kind: str  # "Deployment" | "LeaderWorkerSet"
    namespace: str
    name: str
    replicas: int  # replicas while degraded

    @property
    def path(self) -> str:
        if self.kind == "Deployment":
            return f"/apis/apps/v1/namespaces/{self.namespace}/deployments/{self.name}"
        return (f"/apis/leaderworkerset.x-k8s.io/v1/namespaces/{self.namespace}"
                f"/leaderworkersets/{self.name}")


@dataclass(frozen=True, slots=True)
class Traffic:
    kind: str  # "HTTPRoute" | "Service"
    namespace: str
    name: str
    primary: str  # HTTPRoute: backend Service name; Service: selector "k=v,k2=v2"
    fallback: str

    @property
    def path(self) -> str:
        if self.kind == "HTTPRoute":
            return (f"/apis/gateway.networking.k8s.io/v1/namespaces/{self.namespace}"
                    f"/httproutes/{self.name}")
        return f"/api/v1/namespaces/{self.namespace}/services/{self.name}"


@dataclass(frozen=True, slots=True)
class DegradeTarget:
    model: str
    workload: Workload
    traffic: Traffic
    ready_timeout: float = 600.0  # for the fallback's endpoints to be ready
    drain_seconds: float = 30.0  # restore moves traffic back over this long


def _selector(text: str) -> dict[str, str]:
    return dict(term.split("=", 1) for term in text.split(",") if "=" in term)


class DegradeRefused(SupervisorError):
    """Moving traffic now would drop it: the traffic object cannot carry the fallback, or
    the side it would move to has no ready endpoint. ``note`` says what was (not) done."""

    def __init__(self, traffic: Traffic, why: str, *, reason: str = "DegradeRefused",
                 note: str = "Nothing was scaled or shifted") -> None:
        super().__init__(f"{traffic.kind} {traffic.namespace}/{traffic.name}: {why}")
        self.traffic = traffic
        self.why = why
        self.reason = reason
        self.note = note


def _shares_pods(traffic: Traffic) -> bool:
    """Whether a Service's fallback selector also selects every pod the primary's does: its
    terms are some of the primary's (primary ``app=llm,model=llama-70b``, fallback
    ``app=llm``). A Service sends to every Ready pod its selector picks, so only then can
    it keep the primary's serving pods in traffic next to the fallback's."""
    primary, fallback = _selector(traffic.primary), _selector(traffic.fallback)
    return bool(fallback) and fallback != primary and fallback.items() <= primary.items()


def _split(before: dict[str, int], serving: int, ready: int) -> dict[str, int]:
    """One rule's weights while degraded: the sum the primary and fallback had ``before``,
    shared in proportion to what each side can serve now — ``serving`` groups of the model
    against ``ready`` endpoints of the fallback, one of each taken as one replica's worth.

    The sum stays what it was so that other backendRefs of the rule (a canary) keep their
    share; the primary never gets more than it had before (degrade only takes away from
    it), and a side that can serve gets at least 1. A sum below 2 cannot be split in whole
    weights: it all goes to the fallback, as when no group of the model serves. A fallback
    with no ready endpoint (possible only when splitting again: degrade waits for them)
    takes nothing from the primary."""
    total = before["primary"] + before["fallback"]
    if serving > 0 and ready <= 0:
        return dict(before)
    if serving <= 0 or total < 2:
        return {"primary": 0, "fallback": total}
    primary = min(before["primary"],
                  max(1, min(total - 1, round(total * serving / (serving + ready)))))
    return {"primary": primary, "fallback": total - primary}


def _between(after: dict[str, int], before: dict[str, int], fraction: float
             ) -> dict[str, int]:
    """Weights ``fraction`` of the way back from ``after`` (degraded) to ``before``: the
    primary's share grows from what degrade left it (0, or its part of a split), the
    fallback's shrinks, their sum stays what it was."""
    total = after["primary"] + after["fallback"]
    primary = round(after["primary"] + (before["primary"] - after["primary"]) * fraction)
    return {"primary": primary, "fallback": total - primary}


def _weight(ref: dict[str, Any]) -> int:
    """A backendRef's weight; Gateway API's default is 1."""
    return int(ref.get("weight", 1))


def _step_weights(rule: dict[str, Any], traffic: Traffic, now: dict[str, int],
                  weights: dict[str, int]) -> tuple[dict[str, int], list[str]]:
    """Set the primary's and the fallback's weight in ``rule`` to ``weights``, each only
    where it is still ``now`` (what we last set): one edited since, or gone, is whoever
    edited it's. Returns what we have set now, per side, and the refs left alone."""
    written, left = dict(now), []
    for role, name in (("primary", traffic.primary), ("fallback", traffic.fallback)):
        refs = [ref for ref in rule.get("backendRefs") or [] if ref.get("name") == name]
        if not refs or any(_weight(ref) != now[role] for ref in refs):
            left.append(name)
            continue
        for ref in refs:
            ref["weight"] = weights[role]
        written[role] = weights[role]
    return written, left


def _route_plan(route: dict[str, Any], traffic: Traffic, serving: int = 0, ready: int = 0
                ) -> list[dict[str, Any]]:
    """Where degrade moves weight: per rule with the primary, its index and the weights of
    the primary and fallback refs before and after (``_split`` of ``serving`` primary
    groups and ``ready`` fallback endpoints). Refused if any such rule lacks the fallback
    (its share of traffic would go nowhere) or no rule has the primary."""
    plan = []
    for index, rule in enumerate(route.get("spec", {}).get("rules") or []):
        refs = rule.get("backendRefs") or []
        primary = [r for r in refs if r.get("name") == traffic.primary]
        if not primary:
            continue
        fallback = [r for r in refs if r.get("name") == traffic.fallback]
        if not fallback:
            raise DegradeRefused(traffic, f"rule {index} sends traffic to {traffic.primary} "
                                          f"but has no backendRef {traffic.fallback}")
        before = {"primary": _weight(primary[0]), "fallback": _weight(fallback[0])}
        plan.append({"rule": index, "before": before,
                     "after": _split(before, serving, ready)})
    if not plan:
        raise DegradeRefused(traffic, f"no rule has a backendRef {traffic.primary}")
    return plan


class ActionExecutor:
    def __init__(self, kube: KubeClient, model: HealthModel, clock: Clock, *,
                 fence: Fence, intents: dict[str, Any],
                 save: Callable[[], Awaitable[None]],
                 degrade_targets: dict[str, DegradeTarget] | None = None,
                 follow_up_concurrency: int = 4,
                 observe_latency: Callable[[float], None] = lambda _: None) -> None:
        self._kube = kube
        self._model = model
        self._clock = clock
        self._fence = fence
        self._refusals_told: dict[tuple[str, str], float] = {}  # (target, why) → last Event
        self.intents = intents
        self._save = save
        self._degrade = degrade_targets or {}
        # What holds a model's degrade or restore back right now (model → reason, message,
        # since): the controller's own findings, in /status and metrics until it clears.
        self.blocked: dict[str, dict[str, Any]] = {}
        self.outcomes: Counter[tuple[str, str]] = Counter()
        self.latencies: list[float] = []  # detection → first API write, seconds
        self._observe_latency = observe_latency
        # Follow-up requests (the other pods of a group, Events) queue here so that in a
        # burst every action's *first* request — the one that takes a group out of
        # traffic — reaches the API server ahead of them: a follow-up is sent only while
        # no first request waits or runs (at most ``follow_up_concurrency`` of them can
        # be ahead of a new first request at the API server).
        self._followups = asyncio.Semaphore(follow_up_concurrency)
        self._firsts_pending = 0
        self._no_first_pending = asyncio.Event()
        self._no_first_pending.set()
        # First requests run 32 at a time: enough to keep the API server busy, few enough
        # that a burst does not open a hundred new TLS connections at once and slow every
        # one of them down.
        self._first_writes = asyncio.Semaphore(32)

    async def first_writes_drained(self) -> None:
        """Until no action's first request waits or runs."""
        await self._no_first_pending.wait()

    async def execute(self, decision: Decision) -> bool:
        """Carry out ``decision``; True when its effect is in place."""
        if decision.dry_run:
            log.info("dry-run: would act", action=str(decision.action),
                     target=decision.target, incident=decision.incident, reason=decision.reason)
            self.outcomes[(str(decision.action), "dry_run")] += 1
            return True
        _FIRST_WRITE.set(None)
        handler = {
            Action.FAIL_OVER: self._fail_over, Action.RECOVER: self._recover,
            Action.RESTART_GROUP: self._restart_group, Action.QUARANTINE: self._quarantine,
            Action.UNQUARANTINE: self._unquarantine, Action.SUSPECT: self._suspect,
            Action.UNSUSPECT: self._unsuspect, Action.DEGRADE: self._degrade_model,
            Action.RESTORE: self._restore_model, Action.NOTIFY: self._notify,
        }[decision.action]
        try:
            await handler(decision)
        except Fenced:
            self.outcomes[(str(decision.action), "fenced")] += 1
            log.warning("not acting: lost leadership", action=str(decision.action),
                        target=decision.target)
            return False
        except DegradeRefused as exc:
            self.outcomes[(str(decision.action), "refused")] += 1
            self.blocked.setdefault(decision.target, {"since": self._clock.wall()}).update(
                action=str(decision.action), reason=exc.reason, message=str(exc))
            await self._tell_refusal(exc, decision)
            return False
        except (KubeError, TimeoutError) as exc:
            self.outcomes[(str(decision.action), "failed")] += 1
            log.error("action failed", action=str(decision.action), target=decision.target,
                      incident=decision.incident, error=str(exc))
            return False
        self.outcomes[(str(decision.action), "done")] += 1
        log.info("action done", action=str(decision.action), target=decision.target,
                 incident=decision.incident, rule=decision.rule, step=decision.step,
                 reason=decision.reason)
        return True

    async def _write(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        """Every mutating request goes through here: fencing check, latency bookkeeping.

        The decision latency is taken when the action's first request has been *answered*
        by the API server — an upper bound on when it was sent, so connection-pool waits
        and the round trip count against us, not for us.
        """
        if _FIRST_WRITE.get() is None:
            self._firsts_pending += 1
            self._no_first_pending.clear()
            try:
                async with self._first_writes:
                    result = await self._kube.request(method, path, fence=self._fence,
                                                      **kwargs)
            finally:
                self._firsts_pending -= 1
                if not self._firsts_pending:
                    self._no_first_pending.set()
            _FIRST_WRITE.set(self._clock.monotonic())
            return result
        async with self._followups:
            await self._no_first_pending.wait()
            return await self._kube.request(method, path, fence=self._fence, **kwargs)

    def _may_act(self) -> bool:
        return self._fence.remaining() > 0

    def _record_latency(self, target: str) -> None:
        detected = self._model.detection_time(target)
        first = _FIRST_WRITE.get()
        if detected is not None and first is not None:
            self.latencies.append(max(0.0, first - detected))
            del self.latencies[:-10_000]
            self._observe_latency(self.latencies[-1])

    async def _event(self, obj: dict[str, str], decision: Decision, reason: str,
                     warning: bool = True, note: str = "") -> None:
        now = rfc3339(self._clock.wall())
        # Events about cluster-scoped objects (Nodes) live in "default", as the kubelet's do.
        ns = obj.get("namespace") or "default"
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{obj['name']}.", "namespace": ns},
            "involvedObject": obj, "type": "Warning" if warning else "Normal",
            "reason": reason,
            "message": (note or f"{decision.action} ({decision.rule}, step {decision.step}): "
                                f"{decision.reason}")[:1024],
            "source": {"component": COMPONENT}, "reportingComponent": COMPONENT,
            "reportingInstance": COMPONENT, "firstTimestamp": now, "lastTimestamp": now,
            "count": 1,
        }
        try:
            await self._write("POST", f"/api/v1/namespaces/{ns}/events", body=body,
                              retry=False)
        except KubeError as exc:  # an Event is never worth failing the action for
            log.warning("event not recorded", error=str(exc))

    # --- traffic gate ----------------------------------------------------------------------

    async def _set_gate(self, decision: Decision, serving: bool) -> None:
        group = self._model.groups.get(decision.target)
        if group is None:
            log.info("group vanished before action", group=decision.target)
            return
        pods = sorted(group.pods.values(), key=lambda p: (p.worker_index is None,
                                                          p.worker_index, p.name))

        async def patch(pod: PodInfo) -> None:
            await self._patch_gate(pod, serving, decision.reason)

        # The leader first: in LWS serving set-ups it is the pod the Service and routers
        # send traffic to, so gating it takes the replica out of traffic; in a burst, every
        # group's leader patch is queued before any group's worker patches.
        if pods:
            await patch(pods[0])
        await asyncio.gather(*(patch(p) for p in pods[1:]))
        self._record_latency(decision.target)
        if pods:
            await self._event({"kind": "Pod", "apiVersion": "v1", "namespace": pods[0].namespace,
                               "name": pods[0].name, "uid": pods[0].uid}, decision,
                              "GroupRecovered" if serving else "GroupFailedOver",
                              warning=not serving)

    async def admit(self, group_key: str, pod: PodInfo, serving: bool) -> None:
        """Set the readiness gate of a pod that has none yet (a new or recreated member):
        True, or False when the rest of its group is failed over. Without this a pod that
        lists our gate in ``spec.readinessGates`` would never become Ready."""
        await self._patch_gate(pod, serving,
                               f"admitted by the controller (group {group_key})")

    async def _patch_gate(self, pod: PodInfo, serving: bool, message: str) -> None:
        """Our readiness-gate condition on one pod, with the pod's resourceVersion as a
        precondition: a 409 means the pod changed since we looked (the kubelet, or a newer
        leader); it is read again and, if still needed, written again — fenced like every
        write, so a deposed leader stops here."""
        path = f"/api/v1/namespaces/{pod.namespace}/pods/{pod.name}"
        version = pod.resource_version
        for _ in range(GATE_WRITE_ATTEMPTS):
            body = self._gate_body(serving, message)
            if version:
                body["metadata"] = {"resourceVersion": version}
            if await self._write("PATCH", path + "/status", body=body,
                                 content_type=STRATEGIC_MERGE,
                                 ok_statuses=frozenset({404, 409}), discard_body=True):
                return
            # Gone (404) or changed under us (409): look again.
            current = await self._kube.request("GET", path, ok_statuses=frozenset({404}),
                                               fence=self._fence)
            meta = current.get("metadata", {})
            if not current or meta.get("uid") != pod.uid or meta.get("deletionTimestamp"):
                return  # that pod is gone; its replacement is admitted like any new pod
            wanted = "True" if serving else "False"
            if any(c.get("type") == READINESS_GATE and c.get("status") == wanted
                   for c in current.get("status", {}).get("conditions") or []):
                return
            version = str(meta.get("resourceVersion", ""))
        raise KubeTemporaryError(f"pod {pod.namespace}/{pod.name} kept changing under us",
                                 status=409)

    def _gate_body(self, serving: bool, message: str) -> dict[str, Any]:
        """Pod status patch setting our readiness-gate condition."""
        return {"status": {"conditions": [{
            "type": READINESS_GATE, "status": "True" if serving else "False",
            "reason": "GroupHealthy" if serving else "GroupFailedOver",
            "message": message[:500], "lastTransitionTime": rfc3339(self._clock.wall())}]}}

    async def _fail_over(self, decision: Decision) -> None:
        await self._set_gate(decision, serving=False)

    async def _recover(self, decision: Decision) -> None:
        await self._set_gate(decision, serving=True)

    # --- restart ---------------------------------------------------------------------------

    async def _restart_group(self, decision: Decision) -> None:
        # This incident's restart, not an earlier incident's of the same rule and group
        # (same id): that one's pods are long gone, and replaying it would delete nothing.
        key = f"{decision.incident}@{decision.opened:.3f}#{decision.step}"
        intent = self.intents.get(key)
        if intent is None:
            group = self._model.groups.get(decision.target)
            if group is None:
                log.info("group vanished before restart", group=decision.target)
                return
            if group.kind == "lws":
                leader = group.leader()
                victims = [leader] if leader is not None else list(group.pods.values())
                propagation = "Foreground"
            else:
                victims = list(group.pods.values())
                propagation = "Background"
            intent = {"action": "restart_group", "target": decision.target,
                      "propagation": propagation, "recorded_at": self._clock.wall(),
                      "pods": [{"namespace": p.namespace, "name": p.name, "uid": p.uid}
                               for p in victims]}
            if not self._may_act():
                raise Fenced("not the leader")
            self.intents[key] = intent
            await self._save()  # write-ahead: a successor replays exactly these UIDs
        for pod in intent["pods"]:
            body = {"apiVersion": "v1", "kind": "DeleteOptions",
                    "propagationPolicy": intent["propagation"],
                    "preconditions": {"uid": pod["uid"]}}
            # 404: already gone; 409: the UID precondition failed, the pod was recreated —
            # either way this pod incarnation has been restarted, possibly by a predecessor.
            await self._write("DELETE",
                              f"/api/v1/namespaces/{pod['namespace']}/pods/{pod['name']}",
                              body=body, ok_statuses=frozenset({404, 409}))
        self._record_latency(decision.target)
        if intent["pods"]:
            first = intent["pods"][0]
            await self._event({"kind": "Pod", "apiVersion": "v1", **first}, decision,
                              "GroupRestarted")

    # --- quarantine ------------------------------------------------------------------------

    async def _patch_node(self, name: str, mutate: Callable[[dict[str, Any]], dict[str, Any]
                                                             | None]) -> dict[str, Any] | None:
        """Read-modify-write with the resourceVersion as precondition; retry on conflict."""
        for _ in range(5):
            node = await self._kube.request("GET", f"/api/v1/nodes/{name}",
                                            ok_statuses=frozenset({404}))
            if not node:
                return None
            patch = mutate(node)
            if patch is None:
                return node
            patch.setdefault("metadata", {})["resourceVersion"] = \
                node["metadata"]["resourceVersion"]
            result = await self._write("PATCH", f"/api/v1/nodes/{name}", body=patch,
                                       content_type=MERGE, ok_statuses=frozenset({409}),
                                       retry=False)
            if result:
                return result
        raise KubeTemporaryError(f"node {name} kept changing under us", status=409)

    async def _node_condition(self, node: dict[str, Any], status: bool, reason: str,
                              message: str) -> None:
        """Our quarantine condition on ``node`` (as our taint write left it), with its
        resourceVersion as the precondition. The condition says what the taint says: on a
        409 the node is read again and the condition written only while our taint is
        still as we left it — a newer leader that has lifted (or set) the quarantine
        since is not contradicted by our late write. Fenced like every write."""
        name = node["metadata"]["name"]
        for _ in range(5):
            now = self._clock.wall()
            cond = KubeClient.condition(QUARANTINE_CONDITION, status, reason, message[:1000],
                                        now, now)
            body = {"metadata": {"resourceVersion": node["metadata"]["resourceVersion"]},
                    "status": {"conditions": [cond]}}
            if await self._write("PATCH", f"/api/v1/nodes/{name}/status", body=body,
                                 content_type=STRATEGIC_MERGE,
                                 ok_statuses=frozenset({404, 409}), discard_body=True):
                return
            node = await self._kube.request("GET", f"/api/v1/nodes/{name}",
                                            ok_statuses=frozenset({404}), fence=self._fence)
            tainted = any(t.get("key") == QUARANTINE_TAINT
                          for t in node.get("spec", {}).get("taints") or [])
            if not node or tainted != status:
                log.info("quarantine condition not written: the node changed since",
                         node=name, wanted=status, tainted=tainted)
                return
        raise KubeTemporaryError(f"node {name} kept changing under us", status=409)

    async def _quarantine(self, decision: Decision) -> None:
        changed = False

        def mutate(node: dict[str, Any]) -> dict[str, Any] | None:
            nonlocal changed
            spec = node.get("spec", {})
            taints = spec.get("taints") or []
            if any(t.get("key") == QUARANTINE_TAINT for t in taints):
                return None  # already quarantined (by us, maybe by a predecessor)
            changed = True
            record = {"cordoned_by_us": not spec.get("unschedulable", False),
                      "incident": decision.incident, "reason": decision.reason[:300],
                      "at": rfc3339(self._clock.wall())}
            return {"metadata": {"annotations": {QUARANTINE_ANNOTATION: json.dumps(record)}},
                    "spec": {"unschedulable": True, "taints": [
                        *taints, {"key": QUARANTINE_TAINT, "value": decision.rule,
                                  "effect": "NoSchedule"}]}}

        node = await self._patch_node(decision.target, mutate)
        if node is None:
            log.info("node vanished before quarantine", node=decision.target)
            return
        if not changed:
            return
        self._record_latency(decision.target)
        await self._node_condition(node, True, "Quarantined", decision.reason)
        await self._event({"kind": "Node", "apiVersion": "v1", "name": decision.target},
                          decision, "NodeQuarantined")

    async def _unquarantine(self, decision: Decision) -> None:
        def mutate(node: dict[str, Any]) -> dict[str, Any] | None:
            meta = node.get("metadata", {})
            raw = (meta.get("annotations") or {}).get(QUARANTINE_ANNOTATION)
            taints = node.get("spec", {}).get("taints") or []
            ours = [t for t in taints if t.get("key") == QUARANTINE_TAINT]
            if raw is None and not ours:
                return None
            record = json.loads(raw) if raw else {}
            spec: dict[str, Any] = {"taints": [t for t in taints
                                               if t.get("key") != QUARANTINE_TAINT] or None}
            if record.get("cordoned_by_us", False):
                spec["unschedulable"] = None
            return {"metadata": {"annotations": {QUARANTINE_ANNOTATION: None}}, "spec": spec}

        node = await self._patch_node(decision.target, mutate)
        if node is None:
            return
        await self._node_condition(node, False, "QuarantineLifted", decision.reason)
        await self._event({"kind": "Node", "apiVersion": "v1", "name": decision.target},
                          decision, "NodeQuarantineLifted", warning=False)

    async def _suspect(self, decision: Decision) -> None:
        added = False

        def mutate(node: dict[str, Any]) -> dict[str, Any] | None:
            nonlocal added
            taints = node.get("spec", {}).get("taints") or []
            if any(t.get("key") == SUSPECT_TAINT for t in taints):
                return None
            added = True
            return {"spec": {"taints": [*taints, {"key": SUSPECT_TAINT, "value": decision.rule,
                                                  "effect": "PreferNoSchedule"}]}}

        if await self._patch_node(decision.target, mutate) is None or not added:
            return
        self._record_latency(decision.target)
        await self._event({"kind": "Node", "apiVersion": "v1", "name": decision.target},
                          decision, "NodeSuspected",
                          note=f"New work prefers other nodes while the cause of "
                               f"{decision.incident} may sit on this one: "
                               f"{decision.reason}"[:1024])

    async def _unsuspect(self, decision: Decision) -> None:
        removed = False

        def mutate(node: dict[str, Any]) -> dict[str, Any] | None:
            nonlocal removed
            taints = node.get("spec", {}).get("taints") or []
            if not any(t.get("key") == SUSPECT_TAINT for t in taints):
                return None
            removed = True
            return {"spec": {"taints": [t for t in taints if t.get("key") != SUSPECT_TAINT]
                             or None}}

        if await self._patch_node(decision.target, mutate) is not None and removed:
            await self._event({"kind": "Node", "apiVersion": "v1", "name": decision.target},
                              decision, "NodeSuspicionLifted", warning=False)

    # --- degrade and restore ---------------------------------------------------------------

    async def _replicas(self, workload: Workload) -> int:
        current = await self._kube.request("GET", f"{workload.path}/scale", fence=self._fence)
        return int(current.get("spec", {}).get("replicas") or 0)

    async def _scale(self, workload: Workload, replicas: int) -> None:
        """Set replicas through the scale subresource — the only write the controller's
        RBAC allows on a workload, so it can never rewrite the pod template — with the
        resourceVersion just read as the precondition: a deposed leader's late write
        (a restore's scale to zero arriving after the new leader's degrade) fails with 409
        instead of landing. A conflict is read again and retried, fenced, so only a
        leader still holding the Lease tries again."""
        path = f"{workload.path}/scale"
        for _ in range(5):
            current = await self._kube.request("GET", path, fence=self._fence)
            if int(current.get("spec", {}).get("replicas") or 0) == replicas:
                return
            version = current.get("metadata", {}).get("resourceVersion", "")
            if await self._write("PATCH", path, body={
                    "metadata": {"resourceVersion": version}, "spec": {"replicas": replicas}},
                    content_type=MERGE, ok_statuses=frozenset({409}), retry=False):
                return
        raise KubeTemporaryError(f"{workload.kind} {workload.namespace}/{workload.name} kept "
                                 "changing under us", status=409)

    async def _ready_endpoints(self, traffic: Traffic, side: str) -> int:
        """Ready endpoints behind one side ("primary" or "fallback") of ``traffic``: for an
        HTTPRoute, those of the backend Service's EndpointSlices (what the gateway sends
        to); for a Service switched by selector, the Ready pods the selector picks (what
        its EndpointSlices will hold once it points there) — for a fallback selector that
        also picks the primary's pods, only those the primary's does not: the fallback's
        own, which are what degrade waits for."""
        name = traffic.primary if side == "primary" else traffic.fallback
        if traffic.kind == "HTTPRoute":
            slices = await self._kube.request(
                "GET", f"/apis/discovery.k8s.io/v1/namespaces/{traffic.namespace}"
                       "/endpointslices",
                query={"labelSelector": f"kubernetes.io/service-name={name}"},
                fence=self._fence)
            ready = set()
            for item in slices.get("items") or []:
                for ep in item.get("endpoints") or []:
                    # Unset means unknown, which consumers are told to read as ready.
                    if (ep.get("conditions") or {}).get("ready") is not False:
                        ready.add(tuple(ep.get("addresses") or ()))
            return len(ready)
        pods = await self._kube.request(
            "GET", f"/api/v1/namespaces/{traffic.namespace}/pods",
            query={"labelSelector": name}, fence=self._fence)
        primary = (_selector(traffic.primary).items()
                   if side == "fallback" and _shares_pods(traffic) else None)
        return sum(1 for pod in pods.get("items") or []
                   if not pod["metadata"].get("deletionTimestamp")
                   and (primary is None
                        or not primary <= (pod["metadata"].get("labels") or {}).items())
                   and any(c.get("type") == "Ready" and c.get("status") == "True"
                           for c in pod.get("status", {}).get("conditions") or []))

    async def _serving_groups(self, target: DegradeTarget) -> int:
        """Groups of the model that serve now, as the route can reach them: healthy in the
        health model with no member failed over (our gate False on it), and no more than
        the primary backend has ready endpoints — weight left on a backend with none would
        be answered with errors by the gateway."""
        view = self._model.view()
        groups = 0
        for key, group in view.groups.items():
            info = self._model.groups.get(key)
            if group.model == target.model and group.healthy and info is not None and \
                    not any(p.gate == "False" for p in info.pods.values()):
                groups += 1
        if groups == 0:
            return 0
        return min(groups, await self._ready_endpoints(target.traffic, "primary"))

    async def _wait_serving(self, traffic: Traffic, side: str, want: int, timeout: float
                            ) -> int:
        """Until ``want`` endpoints of ``side`` are ready, or ``timeout``; how many are."""
        deadline = self._clock.monotonic() + timeout
        while True:
            ready = await self._ready_endpoints(traffic, side)
            if ready >= want or self._clock.monotonic() >= deadline:
                return ready
            await asyncio.sleep(min(1.0, max(0.0, deadline - self._clock.monotonic())))

    async def _traffic(self, traffic: Traffic) -> dict[str, Any]:
        obj = await self._kube.request("GET", traffic.path, ok_statuses=frozenset({404}),
                                       fence=self._fence)
        if not obj:
            raise DegradeRefused(traffic, "does not exist")
        return obj

    @staticmethod
    def _check_shift(obj: dict[str, Any], traffic: Traffic) -> Any:
        """What shifting would change; ``DegradeRefused`` if it would drop traffic."""
        if traffic.kind == "HTTPRoute":
            return _route_plan(obj, traffic)
        selector = obj.get("spec", {}).get("selector") or {}
        fallback = _selector(traffic.fallback)
        if not fallback:
            raise DegradeRefused(traffic, f"fallback selector {traffic.fallback!r} is empty")
        if selector not in (_selector(traffic.primary), fallback):
            raise DegradeRefused(traffic, f"selector {selector} is neither the primary's "
                                          f"({traffic.primary}) nor the fallback's")
        return {"before": selector, "after": fallback}

    async def _shift(self, target: DegradeTarget, decision: Decision, ready: int) -> None:
        """Primary → fallback, ``ready`` being the fallback's ready endpoints. The plan (what
        was there, what we set) is kept in an annotation on the object itself, so restore —
        by this leader or the next — knows exactly what to put back.

        An HTTPRoute's weights are split between the model's serving groups and the
        fallback (``_split``); a route shifted already (by us, maybe by a predecessor) is
        split again for the capacity there is now — the engine decides degrade again when
        the model's healthy groups change while it is degraded. A Service's selector
        moves once: its endpoints follow capacity by themselves."""
        traffic = target.traffic
        obj = await self._traffic(traffic)
        annotations = obj.get("metadata", {}).get("annotations") or {}
        raw = annotations.get(TRAFFIC_ANNOTATION)
        if raw is not None:
            if traffic.kind == "HTTPRoute":
                await self._resplit(target, decision, obj, json.loads(raw), ready)
            return
        if traffic.kind == "HTTPRoute":
            serving = await self._serving_groups(target)
            plan: Any = _route_plan(obj, traffic, serving, ready)
            rules = obj["spec"]["rules"]
            for step in plan:
                self._set_weights(rules[step["rule"]], traffic, step["after"])
            note = self._split_note(decision, traffic, plan, serving, ready)
        else:
            plan = self._check_shift(obj, traffic)
            obj["spec"]["selector"] = plan["after"]
            note = self._selector_note(decision, target)
        annotations[TRAFFIC_ANNOTATION] = json.dumps(plan)
        obj["metadata"]["annotations"] = annotations
        # The object keeps the resourceVersion we read: a concurrent edit makes this 409.
        await self._write("PUT", traffic.path, body=obj)
        await self._event({"kind": traffic.kind, "apiVersion": obj.get("apiVersion", "v1"),
                           "namespace": traffic.namespace, "name": traffic.name}, decision,
                          "TrafficShiftedToFallback", note=note)

    async def _resplit(self, target: DegradeTarget, decision: Decision, obj: dict[str, Any],
                       plan: list[dict[str, Any]], ready: int) -> None:
        """Split a shifted route's weights again for the capacity there is now — each
        weight only while it is still what we last set (an edit made since is the
        editor's). A restore cut short (entries with ``stepped``) is taken back to the
        split: the model is short of groups again."""
        traffic = target.traffic
        serving = await self._serving_groups(target)
        rules = obj.get("spec", {}).get("rules") or []
        was = json.dumps(plan)
        kept: list[str] = []
        for entry in plan:
            rule = rules[entry["rule"]] if entry["rule"] < len(rules) else {}
            now = entry.get("now", entry["after"])
            entry["after"] = _split(entry["before"], serving, ready)
            written, left = _step_weights(rule, traffic, now, entry["after"])
            entry.pop("stepped", None)
            entry.pop("now", None)
            if written != entry["after"]:
                entry["now"] = written  # what we set where a weight was edited since
            kept += [f"rule {entry['rule']}: {name}" for name in left]
        if kept:
            log.warning("degrade left edited traffic settings alone", kind=traffic.kind,
                        name=f"{traffic.namespace}/{traffic.name}", kept=kept)
        if json.dumps(plan) == was:
            return  # split for this capacity already
        obj["metadata"]["annotations"][TRAFFIC_ANNOTATION] = json.dumps(plan)
        # The object keeps the resourceVersion we read: a concurrent edit makes this 409.
        await self._write("PUT", traffic.path, body=obj)
        await self._event({"kind": traffic.kind, "apiVersion": obj.get("apiVersion", "v1"),
                           "namespace": traffic.namespace, "name": traffic.name}, decision,
                          "TrafficRebalanced", warning=False,
                          note=self._split_note(decision, traffic, plan, serving, ready))

    @staticmethod
    def _split_note(decision: Decision, traffic: Traffic, plan: list[dict[str, Any]],
                    serving: int, ready: int) -> str:
        weights = "; ".join(f"rule {e['rule']}: {traffic.primary} {e['after']['primary']}, "
                            f"{traffic.fallback} {e['after']['fallback']}" for e in plan)
        return (f"{decision.reason} Weights by what serves — {serving} group(s) of the model, "
                f"{ready} ready endpoint(s) of {traffic.fallback}: {weights}.")

    def _selector_note(self, decision: Decision, target: DegradeTarget) -> str:
        traffic = target.traffic
        if _shares_pods(traffic):
            return (f"{decision.reason} Selector now {traffic.fallback}: the model's serving "
                    f"pods and {target.workload.name}'s, each Ready pod one endpoint.")
        log.warning("degrade moves all of a Service's traffic to the fallback: its selector "
                    "cannot pick both models' pods", service=f"{traffic.namespace}/"
                    f"{traffic.name}", primary=traffic.primary, fallback=traffic.fallback)
        return (f"{decision.reason} Selector now {traffic.fallback}: all of the Service's "
                f"traffic goes to {target.workload.name} and none to the model's groups that "
                "still serve — a selector picks both models only through labels both carry "
                "(a fallback selector that also selects the primary's pods), or use an "
                "HTTPRoute.")

    async def _unshift(self, traffic: Traffic, decision: Decision, drain: float = 0.0
                       ) -> None:
        """Fallback → primary: put back only what ``_shift`` changed, and only where it is
        still what we set — a weight or selector someone edited since is theirs.

        Over ``drain`` seconds: an HTTPRoute's weights step back in ``DRAIN_STEPS`` steps,
        so the primary's groups take the load a share at a time and the fallback's
        requests finish; a Service's selector switches at once, and the drain is waited
        out before the caller scales the fallback down. Each step is a write conditional
        on the route as we left it; the annotation records the step reached, so a
        successor continues from there instead of taking it for someone's edit. A weight
        edited since is left alone at every step while the others step on to the end —
        stopping them part-way would leave weight on a fallback about to be scaled down."""
        steps = DRAIN_STEPS if traffic.kind == "HTTPRoute" and drain > 0 else 1
        while True:
            obj = await self._traffic(traffic)
            annotations = obj.get("metadata", {}).get("annotations") or {}
            raw = annotations.get(TRAFFIC_ANNOTATION)
            if raw is None:
                return
            plan = json.loads(raw)
            kept: list[str] = []
            if traffic.kind == "HTTPRoute":
                done = max(int(s_.get("stepped", 0)) for s_ in plan) + 1
                fraction = min(1.0, done / steps)
                rules = obj.get("spec", {}).get("rules") or []
                for entry in plan:
                    rule = rules[entry["rule"]] if entry["rule"] < len(rules) else {}
                    weights = _between(entry["after"], entry["before"], fraction)
                    entry["now"], left = _step_weights(
                        rule, traffic, entry.get("now", entry["after"]), weights)
                    entry["stepped"] = done
                    kept += [f"rule {entry['rule']}: {name}" for name in left]
                last = fraction >= 1.0
            elif obj.get("spec", {}).get("selector") == plan["after"]:
                obj["spec"]["selector"] = plan["before"]
                last = True
            else:
                kept.append("selector")
                last = True
            if kept and last:
                log.warning("restore left edited traffic settings alone", kind=traffic.kind,
                            name=f"{traffic.namespace}/{traffic.name}", kept=kept)
            if last:
                annotations.pop(TRAFFIC_ANNOTATION)
            else:
                annotations[TRAFFIC_ANNOTATION] = json.dumps(plan)
            obj["metadata"]["annotations"] = annotations
            # The object keeps the resourceVersion we read: a concurrent edit makes this 409.
            await self._write("PUT", traffic.path, body=obj)
            if drain > 0:
                await asyncio.sleep(drain / steps)  # the step's share of the drain
            if last:
                break
        await self._event({"kind": traffic.kind, "apiVersion": obj.get("apiVersion", "v1"),
                           "namespace": traffic.namespace, "name": traffic.name}, decision,
                          "TrafficRestoredToPrimary", warning=False)

    @staticmethod
    def _set_weights(rule: dict[str, Any], traffic: Traffic, weights: dict[str, int]
                     ) -> None:
        """Set the primary's and fallback's weights in one rule."""
        for ref in rule.get("backendRefs") or []:
            for role, name in (("primary", traffic.primary), ("fallback", traffic.fallback)):
                if ref.get("name") == name:
                    ref["weight"] = weights[role]

    async def _degrade_model(self, decision: Decision) -> None:
        target = self._degrade.get(decision.target)
        if target is None:
            raise KubeTemporaryError(f"no degrade target configured for {decision.target}")
        # Refuse before touching anything if the route cannot carry the fallback.
        current = await self._traffic(target.traffic)
        self._check_shift(current, target.traffic)
        if TRAFFIC_ANNOTATION in (current.get("metadata", {}).get("annotations") or {}):
            # Shifted already (by us, maybe by a predecessor): the scale came before the
            # shift, so all that is left is to split the traffic again for the capacity
            # there is now — with the fallback's endpoints as they are: a fallback that
            # lost them all gives the primary its weight back rather than being waited for.
            await self._shift(target, decision,
                              await self._ready_endpoints(target.traffic, "fallback"))
            self.blocked.pop(decision.target, None)
            return
        key = f"degrade/{decision.target}"
        if "replicas_before" not in self.intents.get(key, {}):
            # Recorded (and saved) before scaling: a leader that dies after the scale
            # leaves the original behind, never the scaled-up count.
            before = await self._replicas(target.workload)
            # No recorded_at: unlike a restart's, this intent lives as long as the degrade.
            self.intents[key] = {"replicas_before": before}
            await self._save()
        await self._scale(target.workload, target.workload.replicas)
        self._record_latency(decision.target)
        # Traffic moves only to endpoints that serve: all the replicas we asked for, or —
        # after ready_timeout — whatever part of them is ready (some capacity beats the
        # none the primary has left); none at all, and nothing moves.
        wanted = target.workload.replicas
        ready = await self._wait_serving(target.traffic, "fallback", wanted,
                                         target.ready_timeout)
        if ready == 0:
            raise DegradeRefused(
                target.traffic, f"fallback {target.traffic.fallback} has no ready endpoint "
                                f"{target.ready_timeout:g}s after it was scaled to {wanted}",
                reason="FallbackNotServing",
                note=f"{target.workload.kind} {target.workload.name} is scaled to {wanted} "
                     "but no traffic was moved to it; check why its pods do not become "
                     "Ready")
        if ready < wanted:
            log.warning("degrading to a fallback that is only partly ready",
                        model=decision.target, ready=ready, wanted=wanted)
        await self._shift(target, decision, ready)
        self.blocked.pop(decision.target, None)

    async def _restore_model(self, decision: Decision) -> None:
        target = self._degrade.get(decision.target)
        if target is None:
            raise KubeTemporaryError(f"no degrade target configured for {decision.target}")
        # Traffic goes back only to endpoints that serve: healthy groups are not enough
        # while their pods are not (yet) Ready behind the route.
        if await self._ready_endpoints(target.traffic, "primary") == 0:
            raise DegradeRefused(
                target.traffic, f"the primary {target.traffic.primary} has no ready "
                                "endpoint", reason="PrimaryNotServing",
                note="Traffic stays on the fallback until the primary's endpoints are ready")
        await self._unshift(target.traffic, decision, target.drain_seconds)
        key = f"degrade/{decision.target}"
        intent = self.intents.get(key)
        if intent is not None:
            await self._scale(target.workload, int(intent["replicas_before"]))
            del self.intents[key]
            await self._save()
        self.blocked.pop(decision.target, None)

    async def _tell_refusal(self, refusal: DegradeRefused, decision: Decision) -> None:
        """An Event and an error line per refusal reason — again only after a while, since
        the engine decides a refused degrade again on every evaluation."""
        told = (decision.target, refusal.why)
        now = self._clock.monotonic()
        last = self._refusals_told.get(told)
        if last is not None and now - last < REFUSAL_EVENT_EVERY_SECONDS:
            return
        self._refusals_told[told] = now
        log.error("traffic not moved: it would be dropped", model=decision.target,
                  action=str(decision.action), reason=refusal.reason, error=str(refusal))
        traffic = refusal.traffic
        api = ("gateway.networking.k8s.io/v1" if traffic.kind == "HTTPRoute" else "v1")
        verb = "degrading" if decision.action is Action.DEGRADE else "restoring"
        await self._event({"kind": traffic.kind, "apiVersion": api,
                           "namespace": traffic.namespace, "name": traffic.name},
                          decision, refusal.reason,
                          note=f"Not {verb} {decision.target} ({traffic.primary} ↔ "
                               f"{traffic.fallback}): {refusal.why}. {refusal.note}.")

    async def _notify(self, decision: Decision) -> None:
        group = self._model.groups.get(decision.target)
        if group is not None and group.pods:
            pod = next(iter(group.pods.values()))
            obj = {"kind": "Pod", "apiVersion": "v1", "namespace": pod.namespace,
                   "name": pod.name, "uid": pod.uid}
        else:
            obj = {"kind": "Node", "apiVersion": "v1", "name": decision.target}
        await self._event(obj, decision, "GPUSupervisorNotice")
