"""Each controller action's exact effect on real objects, as the controller's ServiceAccount.

The executor is driven directly with policy Decisions; the HealthModel it reads is fed from
the real API server, as the controller's watches would feed it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio import client

from policies.model import Action, Decision
from simulator.controlplane.cluster import KubeTestCluster
from supervisor.controller.actions import (
    QUARANTINE_CONDITION,
    QUARANTINE_TAINT,
    ActionExecutor,
    DegradeTarget,
    Traffic,
    Workload,
)
from supervisor.controller.model import READINESS_GATE, GroupKind, HealthModel
from supervisor.kube import METADATA_ONLY, KubeClient
from supervisor.runtime.clock import SystemClock
from tests.integration.api_proxy import ApiProxy
from tests.integration.cluster_objects import (
    deployment_body,
    finish_deletion,
    list_pods,
    make_endpoint_slice,
    make_generic_group,
    make_lws_group,
    make_nodes,
    unique,
)
from tests.kubeenv import manifests

pytestmark = pytest.mark.kube


@dataclass
class Rig:
    admin: client.ApiClient
    kube: KubeClient
    ns: str
    model: HealthModel
    executor: ActionExecutor
    saved: list[dict[str, Any]] = field(default_factory=list)
    leader: bool = True
    cluster: KubeTestCluster | None = None
    kubeconfig: Path | None = None  # the controller's credentials

    def remaining(self) -> float:
        """The executor's fence: a comfortable Lease while ``leader``, none otherwise."""
        return 30.0 if self.leader else 0.0

    async def refresh(self) -> None:
        """Feed the model from the API server, as the Pod and Node watches would."""
        pods = await self.kube.request("GET", f"/api/v1/namespaces/{self.ns}/pods")
        for pod in pods["items"]:
            self.model.upsert_pod(pod)
        nodes = await self.kube.request("GET", "/api/v1/nodes")
        for node in nodes["items"]:
            self.model.upsert_node(node)


def decision(action: Action, target: str, step: int = 0, incident: str = "") -> Decision:
    return Decision(incident=incident or f"test/{target}", rule="test", step=step,
                    action=action, target=target, reason="GPU 3 fell off the bus",
                    dry_run=False, node_local=True)


@pytest.fixture(name="rig")
async def _rig(kube_cluster: KubeTestCluster, tmp_path: Any) -> AsyncIterator[Rig]:
    async with await kube_cluster.api_client() as admin:
        release = await manifests.install_rbac(admin, manifests.NAMESPACE, "controller")
        token = await kube_cluster.service_account_token(
            release.namespace, release.service_account("controller"))
        kubeconfig = kube_cluster.write_kubeconfig(tmp_path / "kc", token)
        kube = await KubeClient.connect(str(kubeconfig))
        ns = unique("serving")
        await kube_cluster.ensure_namespace(ns)
        clock = SystemClock()
        model = HealthModel(clock, silence_seconds=30,
                            kinds=[GroupKind("ray", "ray.io/node-type=worker", "ray.io/group",
                                             "llama-70b")],
                            quarantine_taint=QUARANTINE_TAINT)
        rig = Rig(admin=admin, kube=kube, ns=ns, model=model, executor=None,  # type: ignore[arg-type]
                  cluster=kube_cluster, kubeconfig=kubeconfig)

        async def save() -> None:
            rig.saved.append(json.loads(json.dumps(rig.executor.intents)))

        rig.executor = ActionExecutor(kube, model, clock, fence=rig, intents={}, save=save)
        try:
            yield rig
        finally:
            await kube.close()


async def events_for(rig: Rig, name: str, ns: str | None = None) -> list[Any]:
    evs = await client.CoreV1Api(rig.admin).list_namespaced_event(
        ns or rig.ns, field_selector=f"involvedObject.name={name}")
    return list(evs.items)


def gate(pod: dict[str, Any]) -> str | None:
    for cond in pod["status"].get("conditions") or []:
        if cond["type"] == READINESS_GATE:
            return str(cond["status"])
    return None


class TestControllerFailOver:
    async def test_fail_over_gates_every_pod_and_recover_ungates(self, rig: Rig) -> None:
        """fail_over sets our readiness-gate condition False on all 4 pods; recover, True."""
        nodes = await make_nodes(rig.admin, 4)
        await make_lws_group(rig.admin, rig.ns, "llama", 0, nodes)
        await make_lws_group(rig.admin, rig.ns, "llama", 1, nodes[:2])
        await rig.refresh()
        key = f"{rig.ns}/llama/0"
        assert await rig.executor.execute(decision(Action.FAIL_OVER, key))
        pods = await list_pods(rig.admin, rig.ns)
        assert {n: gate(p) for n, p in pods.items()} == {
            "llama-0": "False", "llama-0-1": "False", "llama-0-2": "False",
            "llama-0-3": "False", "llama-1": "True", "llama-1-1": "True"}
        reason = next(c["reason"] for c in pods["llama-0"]["status"]["conditions"]
                      if c["type"] == READINESS_GATE)
        assert reason == "GroupFailedOver"
        (event,) = await events_for(rig, "llama-0")
        assert (event.type, event.reason) == ("Warning", "GroupFailedOver")
        assert await rig.executor.execute(decision(Action.RECOVER, key, step=-1))
        pods = await list_pods(rig.admin, rig.ns)
        assert all(gate(p) == "True" for p in pods.values())


class TestControllerFencing:
    async def test_gate_write_on_a_stale_view_does_not_land_over_a_newer_one(
            self, rig: Rig) -> None:
        """The executor saw the pods at one resourceVersion; a newer leader has since put
        the group back in traffic. The stale fail-over's write fails its precondition, and
        with the Lease gone it is not tried again: the newer leader's True stays."""
        nodes = await make_nodes(rig.admin, 2)
        await make_lws_group(rig.admin, rig.ns, "llama", 0, nodes)
        await rig.refresh()
        core = client.CoreV1Api(rig.admin)
        for name in ("llama-0", "llama-0-1"):  # the newer leader's write
            await core.patch_namespaced_pod_status(name, rig.ns, {"status": {"conditions": [
                {"type": READINESS_GATE, "status": "True", "reason": "GroupHealthy",
                 "message": "recovered by the new leader"}]}})
        stale = ActionExecutor(rig.kube, rig.model, SystemClock(), fence=LeaseRunsOut(2),
                               intents={}, save=_noop)
        assert not await stale.execute(decision(Action.FAIL_OVER, f"{rig.ns}/llama/0"))
        assert stale.outcomes[("fail_over", "fenced")] == 1
        pods = await list_pods(rig.admin, rig.ns)
        assert all(gate(p) == "True" for p in pods.values())

    async def test_gate_conflict_with_a_kubelet_update_is_retried_while_leading(
            self, rig: Rig) -> None:
        """A 409 because the kubelet touched the pod's status is not a fence: the leader
        reads the pod again and its fail-over lands."""
        nodes = await make_nodes(rig.admin, 1)
        await make_lws_group(rig.admin, rig.ns, "llama", 0, nodes)
        await rig.refresh()
        await client.CoreV1Api(rig.admin).patch_namespaced_pod_status(
            "llama-0", rig.ns, {"status": {"podIP": "10.0.0.7"}})
        assert await rig.executor.execute(decision(Action.FAIL_OVER, f"{rig.ns}/llama/0"))
        assert gate((await list_pods(rig.admin, rig.ns))["llama-0"]) == "False"


class TestControllerRestartGroup:
    async def test_lws_restart_deletes_only_the_leader_foreground(self, rig: Rig) -> None:
        """LWS: the leader pod is deleted with Foreground propagation; workers are left to
        LWS, exactly as RecreateGroupOnPodRestart does."""
        nodes = await make_nodes(rig.admin, 3)
        await make_lws_group(rig.admin, rig.ns, "llama", 0, nodes)
        await rig.refresh()
        d = decision(Action.RESTART_GROUP, f"{rig.ns}/llama/0", step=2)
        assert await rig.executor.execute(d)
        pods = await list_pods(rig.admin, rig.ns)
        leader = pods["llama-0"]["metadata"]
        # No garbage collector runs here, so Foreground deletion stays visible as a finalizer.
        assert leader.get("deletionTimestamp")
        assert "foregroundDeletion" in (leader.get("finalizers") or [])
        assert not pods["llama-0-1"]["metadata"].get("deletionTimestamp")
        assert not pods["llama-0-2"]["metadata"].get("deletionTimestamp")
        # The intent was saved before the delete, naming the leader's UID.
        (saved,) = rig.saved
        (intent,) = saved.values()
        assert [p["uid"] for p in intent["pods"]] == [leader["uid"]]

    async def test_replayed_restart_never_deletes_the_recreated_pod(self, rig: Rig) -> None:
        """A successor replaying the intent finds the pod recreated (new UID) and leaves it:
        the group is restarted exactly once."""
        nodes = await make_nodes(rig.admin, 2)
        await make_lws_group(rig.admin, rig.ns, "llama", 0, nodes)
        await rig.refresh()
        d = decision(Action.RESTART_GROUP, f"{rig.ns}/llama/0", step=1)
        assert await rig.executor.execute(d)
        # Play LWS: finish the deletion and recreate the leader under the same name.
        await finish_deletion(rig.admin, rig.ns, "llama-0")
        recreated = await make_lws_group(rig.admin, rig.ns, "llama", 0, nodes[:1])
        new_uid = recreated[0]["metadata"]["uid"]
        successor = ActionExecutor(rig.kube, rig.model, SystemClock(), fence=Leading(),
                                   intents=dict(rig.executor.intents), save=_noop)
        assert await successor.execute(d)
        pod = (await list_pods(rig.admin, rig.ns))["llama-0"]
        assert pod["metadata"]["uid"] == new_uid
        assert not pod["metadata"].get("deletionTimestamp")

    async def test_the_same_group_failing_again_later_is_restarted_again(
            self, rig: Rig) -> None:
        """A later incident of the same rule and group (same incident id, later opening)
        restarts the recreated group: its intent is its own, not the first incident's
        replayed (whose pod UID is gone, which made the second restart a no-op)."""
        nodes = await make_nodes(rig.admin, 2)
        await make_lws_group(rig.admin, rig.ns, "llama", 0, nodes)
        await rig.refresh()
        first = dataclasses.replace(decision(Action.RESTART_GROUP, f"{rig.ns}/llama/0"),
                                    opened=1.8e9)
        old = (await list_pods(rig.admin, rig.ns))["llama-0"]
        assert await rig.executor.execute(first)
        await finish_deletion(rig.admin, rig.ns, "llama-0")
        rig.model.delete_pod(old)  # what the controller's pod watch does
        await make_lws_group(rig.admin, rig.ns, "llama", 0, nodes[:1])
        await rig.refresh()
        again = dataclasses.replace(first, opened=1.8e9 + 3600)
        assert await rig.executor.execute(again)
        pod = (await list_pods(rig.admin, rig.ns))["llama-0"]
        assert pod["metadata"].get("deletionTimestamp"), "the recreated leader was not deleted"
        assert len(rig.executor.intents) == 2

    async def test_generic_group_restart_deletes_every_pod(self, rig: Rig) -> None:
        """A generic (label-selector) group has no leader to delete: all its pods go."""
        nodes = await make_nodes(rig.admin, 3)
        await make_generic_group(rig.admin, rig.ns, "rg-a", nodes)
        await make_generic_group(rig.admin, rig.ns, "rg-b", nodes[:1])
        await rig.refresh()
        assert await rig.executor.execute(decision(Action.RESTART_GROUP, f"{rig.ns}/ray/rg-a"))
        pods = await list_pods(rig.admin, rig.ns)
        # No kubelet confirms the deletion, so deleted pods stay visible as terminating.
        terminating = sorted(n for n, p in pods.items() if p["metadata"].get("deletionTimestamp"))
        assert terminating == ["rg-a-0", "rg-a-1", "rg-a-2"]

    async def test_fenced_executor_does_not_touch_anything(self, rig: Rig) -> None:
        """Without the Lease the executor refuses before its first write."""
        nodes = await make_nodes(rig.admin, 2)
        await make_lws_group(rig.admin, rig.ns, "llama", 0, nodes)
        await rig.refresh()
        rig.leader = False
        assert not await rig.executor.execute(decision(Action.RESTART_GROUP,
                                                       f"{rig.ns}/llama/0"))
        assert not await rig.executor.execute(decision(Action.FAIL_OVER, f"{rig.ns}/llama/0"))
        pods = await list_pods(rig.admin, rig.ns)
        assert all(not p["metadata"].get("deletionTimestamp") for p in pods.values())
        assert all(gate(p) == "True" for p in pods.values())
        assert rig.saved == []


async def _noop() -> None:
    return None


class Leading:
    """A fence that always allows: a leader with a fresh Lease."""

    def remaining(self) -> float:
        return 30.0


class LeaseRunsOut:
    """A fence that allows ``writes`` calls, then never again: the Lease expired while the
    action was under way."""

    def __init__(self, writes: int) -> None:
        self.left = writes

    def remaining(self) -> float:
        self.left -= 1
        return 30.0 if self.left >= 0 else 0.0


class TestControllerQuarantine:
    async def test_quarantine_cordons_taints_and_sets_condition_once(self, rig: Rig) -> None:
        """Cordon + our NoSchedule taint (foreign taints kept) + condition; a repeat is a
        no-op; lifting restores the node as it was."""
        (node,) = await make_nodes(rig.admin, 1)
        core = client.CoreV1Api(rig.admin)
        foreign = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
        await core.patch_node(node, {"spec": {"taints": [foreign]}})
        d = decision(Action.QUARANTINE, node, step=1)
        assert await rig.executor.execute(d)
        assert await rig.executor.execute(d)
        raw = rig.admin.sanitize_for_serialization(await core.read_node(node))
        assert raw["spec"]["unschedulable"] is True
        # (the API server's TaintNodesByCondition may add node.kubernetes.io/not-ready too)
        keys = [t["key"] for t in raw["spec"]["taints"]
                if t["key"] != "node.kubernetes.io/not-ready"]
        assert keys == ["nvidia.com/gpu", QUARANTINE_TAINT]
        ours = next(t for t in raw["spec"]["taints"] if t["key"] == QUARANTINE_TAINT)
        assert ours["effect"] == "NoSchedule"
        cond = next(c for c in raw["status"]["conditions"] if c["type"] == QUARANTINE_CONDITION)
        assert (cond["status"], cond["reason"]) == ("True", "Quarantined")
        assert any(c["type"] == "Ready" for c in raw["status"]["conditions"])
        events = await events_for(rig, node, ns="default")
        assert [(e.type, e.reason) for e in events] == [("Warning", "NodeQuarantined")]

        assert await rig.executor.execute(decision(Action.UNQUARANTINE, node, step=-1))
        raw = rig.admin.sanitize_for_serialization(await core.read_node(node))
        assert not raw["spec"].get("unschedulable")
        assert [t for t in raw["spec"]["taints"] if t["key"] != "node.kubernetes.io/not-ready"] \
            == [foreign]
        assert "gpu-supervisor.io/quarantine" not in (raw["metadata"].get("annotations") or {})
        cond = next(c for c in raw["status"]["conditions"] if c["type"] == QUARANTINE_CONDITION)
        assert (cond["status"], cond["reason"]) == ("False", "QuarantineLifted")

    async def test_lifting_keeps_an_admin_cordon(self, rig: Rig) -> None:
        """A node an administrator had cordoned stays cordoned when our quarantine lifts."""
        (node,) = await make_nodes(rig.admin, 1)
        core = client.CoreV1Api(rig.admin)
        await core.patch_node(node, {"spec": {"unschedulable": True}})
        assert await rig.executor.execute(decision(Action.QUARANTINE, node))
        assert await rig.executor.execute(decision(Action.UNQUARANTINE, node, step=-1))
        raw = await core.read_node(node)
        assert raw.spec.unschedulable is True
        assert not [t for t in raw.spec.taints or [] if t.key == QUARANTINE_TAINT]


async def ready_pods(rig: Rig, labels: dict[str, str], count: int) -> None:
    """Pods matching ``labels``, Ready, as the kubelet would report them."""
    core = client.CoreV1Api(rig.admin)
    for _ in range(count):
        pod = await core.create_namespaced_pod(rig.ns, {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": "serving-", "labels": labels},
            "spec": {"containers": [{"name": "c", "image": "x"}]}})
        await core.patch_namespaced_pod_status(pod.metadata.name, rig.ns, {"status": {
            "phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}})


class TestControllerDegrade:
    async def _deployment(self, rig: Rig, name: str, replicas: int) -> None:
        await client.AppsV1Api(rig.admin).create_namespaced_deployment(
            rig.ns, deployment_body(name, replicas))

    async def _become_ready(self, rig: Rig, name: str, replicas: int) -> None:
        """Play the Deployment and EndpointSlice controllers: once the fallback is scaled
        up, its Service (named like it) has that many ready endpoints."""
        apps = client.AppsV1Api(rig.admin)
        for _ in range(100):
            dep = await apps.read_namespaced_deployment(name, rig.ns)
            if dep.spec.replicas == replicas:
                await make_endpoint_slice(rig.admin, rig.ns, name, replicas)
                return
            await asyncio.sleep(0.05)
        raise AssertionError("fallback was never scaled")

    async def test_degrade_scales_waits_and_shifts_httproute_then_restores(
            self, rig: Rig) -> None:
        """Degrade: fallback scaled 0→2, traffic moves only once it is ready (weights 0/100);
        restore puts the weights back and scales the fallback to 0."""
        await self._deployment(rig, "llama-8b", 0)
        co = client.CustomObjectsApi(rig.admin)
        route = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                 "metadata": {"name": "llm"},
                 "spec": {"parentRefs": [{"name": "gw"}], "rules": [{"backendRefs": [
                     {"name": "llama-70b", "port": 8000, "weight": 100},
                     {"name": "llama-8b", "port": 8000, "weight": 0}]}]}}
        await co.create_namespaced_custom_object("gateway.networking.k8s.io", "v1", rig.ns,
                                                 "httproutes", route)
        rig.executor._degrade = {"llama-70b": DegradeTarget(
            "llama-70b", Workload("Deployment", rig.ns, "llama-8b", 2),
            Traffic("HTTPRoute", rig.ns, "llm", "llama-70b", "llama-8b"), ready_timeout=30,
            drain_seconds=0)}

        async def weights() -> dict[str, int]:
            obj = await co.get_namespaced_custom_object("gateway.networking.k8s.io", "v1",
                                                        rig.ns, "httproutes", "llm")
            return {r["name"]: r["weight"] for r in obj["spec"]["rules"][0]["backendRefs"]}

        d = Decision(incident="degrade/llama-70b", rule="degrade", step=-1,
                     action=Action.DEGRADE, target="llama-70b", reason="2 of 4 groups healthy",
                     dry_run=False)
        task = asyncio.create_task(rig.executor.execute(d))
        await asyncio.sleep(1.5)
        assert await weights() == {"llama-70b": 100, "llama-8b": 0}  # not ready: no shift yet
        await self._become_ready(rig, "llama-8b", 2)
        assert await task
        assert await weights() == {"llama-70b": 0, "llama-8b": 100}
        apps = client.AppsV1Api(rig.admin)
        assert (await apps.read_namespaced_deployment("llama-8b", rig.ns)).spec.replicas == 2

        restore = Decision(incident="degrade/llama-70b", rule="degrade", step=-1,
                           action=Action.RESTORE, target="llama-70b",
                           reason="primary healthy", dry_run=False)
        await make_endpoint_slice(rig.admin, rig.ns, "llama-70b", 1)  # the primary serves again
        assert await rig.executor.execute(restore)
        assert await weights() == {"llama-70b": 100, "llama-8b": 0}
        assert (await apps.read_namespaced_deployment("llama-8b", rig.ns)).spec.replicas == 0

    async def test_degrade_switches_service_selector_without_gateway(self, rig: Rig) -> None:
        """Without Gateway API the Service's selector moves to the fallback and back."""
        await self._deployment(rig, "small", 1)
        core = client.CoreV1Api(rig.admin)
        await core.create_namespaced_service(rig.ns, {
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": "llm"},
            "spec": {"selector": {"model": "big", "tier": "serving"},
                     "ports": [{"port": 8000}]}})
        rig.executor._degrade = {"big": DegradeTarget(
            "big", Workload("Deployment", rig.ns, "small", 1),
            Traffic("Service", rig.ns, "llm", "model=big,tier=serving",
                    "model=small,tier=serving"), ready_timeout=30, drain_seconds=0)}
        await ready_pods(rig, {"model": "small", "tier": "serving"}, 1)
        await ready_pods(rig, {"model": "big", "tier": "serving"}, 1)
        d = Decision(incident="degrade/big", rule="degrade", step=-1, action=Action.DEGRADE,
                     target="big", reason="capacity", dry_run=False)
        assert await rig.executor.execute(d)
        svc = await core.read_namespaced_service("llm", rig.ns)
        assert svc.spec.selector == {"model": "small", "tier": "serving"}
        assert await rig.executor.execute(Decision(
            incident="degrade/big", rule="degrade", step=-1, action=Action.RESTORE,
            target="big", reason="back", dry_run=False))
        svc = await core.read_namespaced_service("llm", rig.ns)
        assert svc.spec.selector == {"model": "big", "tier": "serving"}

    async def _route(self, rig: Rig, rules: list[dict[str, Any]]) -> None:
        await client.CustomObjectsApi(rig.admin).create_namespaced_custom_object(
            "gateway.networking.k8s.io", "v1", rig.ns, "httproutes", {
                "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                "metadata": {"name": "llm"},
                "spec": {"parentRefs": [{"name": "gw"}], "rules": rules}})

    async def _rules(self, rig: Rig) -> list[dict[str, Any]]:
        obj = await client.CustomObjectsApi(rig.admin).get_namespaced_custom_object(
            "gateway.networking.k8s.io", "v1", rig.ns, "httproutes", "llm")
        rules: list[dict[str, Any]] = obj["spec"]["rules"]
        return rules

    def _target(self, rig: Rig, replicas: int = 2, *, ready_timeout: float = 30,
                drain: float = 0) -> None:
        rig.executor._degrade = {"llama-70b": DegradeTarget(
            "llama-70b", Workload("Deployment", rig.ns, "llama-8b", replicas),
            Traffic("HTTPRoute", rig.ns, "llm", "llama-70b", "llama-8b"),
            ready_timeout=ready_timeout, drain_seconds=drain)}

    DEGRADE = Decision(incident="degrade/llama-70b", rule="degrade", step=-1,
                       action=Action.DEGRADE, target="llama-70b", reason="capacity",
                       dry_run=False)
    RESTORE = Decision(incident="degrade/llama-70b", rule="degrade", step=-1,
                       action=Action.RESTORE, target="llama-70b", reason="back",
                       dry_run=False)

    async def test_degrade_is_refused_when_the_route_has_no_fallback(self, rig: Rig) -> None:
        """A route without the fallback's backendRef would send the primary's share
        nowhere: degrade is refused with an Event and counted, nothing is scaled or
        shifted."""
        await self._deployment(rig, "llama-8b", 0)
        await self._route(rig, [{"backendRefs": [{"name": "llama-70b", "port": 8000}]}])
        self._target(rig)
        assert not await rig.executor.execute(self.DEGRADE)
        assert rig.executor.outcomes[("degrade", "refused")] == 1
        assert [r.get("weight", 1) for r in (await self._rules(rig))[0]["backendRefs"]] == [1]
        apps = client.AppsV1Api(rig.admin)
        assert (await apps.read_namespaced_deployment("llama-8b", rig.ns)).spec.replicas == 0
        events = await events_for(rig, "llm")
        assert [(e.type, e.reason) for e in events] == [("Warning", "DegradeRefused")]
        assert "no backendRef llama-8b" in events[0].message
        assert rig.executor.intents == {}

    async def test_restore_changes_only_the_weights_degrade_changed(self, rig: Rig) -> None:
        """Restore puts back the two weights degrade moved, in the rules it moved them in;
        a rule added meanwhile and a canary's weight edited meanwhile stay as edited."""
        await self._deployment(rig, "llama-8b", 0)
        await self._route(rig, [
            {"backendRefs": [{"name": "llama-70b", "port": 8000, "weight": 90},
                             {"name": "llama-8b", "port": 8000, "weight": 0},
                             {"name": "canary", "port": 8000, "weight": 10}]}])
        self._target(rig)
        task = asyncio.create_task(rig.executor.execute(self.DEGRADE))
        await self._become_ready(rig, "llama-8b", 2)
        assert await task
        rules = await self._rules(rig)
        assert {r["name"]: r["weight"] for r in rules[0]["backendRefs"]} == {
            "llama-70b": 0, "llama-8b": 90, "canary": 10}
        # Someone edits the route while degraded.
        rules[0]["backendRefs"][2]["weight"] = 5
        rules.append({"matches": [{"path": {"type": "PathPrefix", "value": "/admin"}}],
                      "backendRefs": [{"name": "admin", "port": 80}]})
        co = client.CustomObjectsApi(rig.admin)
        await co.patch_namespaced_custom_object(
            "gateway.networking.k8s.io", "v1", rig.ns, "httproutes", "llm",
            [{"op": "replace", "path": "/spec/rules", "value": rules}])
        await make_endpoint_slice(rig.admin, rig.ns, "llama-70b", 1)
        assert await rig.executor.execute(self.RESTORE)
        rules = await self._rules(rig)
        assert {r["name"]: r["weight"] for r in rules[0]["backendRefs"]} == {
            "llama-70b": 90, "llama-8b": 0, "canary": 5}
        assert rules[1]["backendRefs"][0]["name"] == "admin"

    async def test_replicas_are_recorded_before_the_fallback_is_scaled(
            self, rig: Rig) -> None:
        """The original replica count is saved while it is still the original, and a
        successor finding a half-done degrade (already scaled up) keeps that record: the
        restore scales back to it, not to the scaled-up count."""
        await self._deployment(rig, "llama-8b", 1)
        await self._route(rig, [{"backendRefs": [{"name": "llama-70b", "port": 8000},
                                                 {"name": "llama-8b", "port": 8000,
                                                  "weight": 0}]}])
        self._target(rig, replicas=3)
        apps = client.AppsV1Api(rig.admin)
        seen_at_save: list[int] = []

        async def save() -> None:
            dep = await apps.read_namespaced_deployment("llama-8b", rig.ns)
            seen_at_save.append(dep.spec.replicas)

        first = ActionExecutor(rig.kube, rig.model, SystemClock(), fence=Leading(),
                               intents={}, save=save,
                               degrade_targets=rig.executor._degrade)
        task = asyncio.create_task(first.execute(self.DEGRADE))
        await self._become_ready(rig, "llama-8b", 3)
        assert await task
        assert seen_at_save == [1]
        assert first.intents == {"degrade/llama-70b": {"replicas_before": 1}}
        # A successor replays the degrade from the saved intents: the record stays 1.
        successor = ActionExecutor(rig.kube, rig.model, SystemClock(), fence=Leading(),
                                   intents=json.loads(json.dumps(first.intents)), save=_noop,
                                   degrade_targets=rig.executor._degrade)
        assert await successor.execute(self.DEGRADE)
        assert successor.intents["degrade/llama-70b"] == {"replicas_before": 1}
        await make_endpoint_slice(rig.admin, rig.ns, "llama-70b", 1)
        assert await successor.execute(self.RESTORE)
        assert (await apps.read_namespaced_deployment("llama-8b", rig.ns)).spec.replicas == 1


    async def test_a_fallback_that_never_becomes_ready_gets_no_traffic(
            self, rig: Rig) -> None:
        """The fallback is scaled up but its endpoints never turn ready: after
        ready_timeout the degrade is refused — the route still sends everything to the
        primary — and the executor holds a finding saying why, with a Warning Event."""
        await self._deployment(rig, "llama-8b", 0)
        await self._route(rig, [{"backendRefs": [{"name": "llama-70b", "port": 8000},
                                                 {"name": "llama-8b", "port": 8000,
                                                  "weight": 0}]}])
        await make_endpoint_slice(rig.admin, rig.ns, "llama-8b", ready=0, not_ready=2)
        self._target(rig, ready_timeout=2)
        assert not await rig.executor.execute(self.DEGRADE)
        assert [r.get("weight", 1) for r in (await self._rules(rig))[0]["backendRefs"]] \
            == [1, 0]
        blocked = rig.executor.blocked["llama-70b"]
        assert blocked["reason"] == "FallbackNotServing"
        assert "llama-8b has no ready endpoint" in blocked["message"]
        events = await events_for(rig, "llm")
        assert [(e.type, e.reason) for e in events] == [("Warning", "FallbackNotServing")]
        assert "no traffic was moved" in events[0].message
        # Its endpoints turn ready: the next attempt moves the traffic and clears it.
        await make_endpoint_slice(rig.admin, rig.ns, "llama-8b", ready=2)
        assert await rig.executor.execute(self.DEGRADE)
        assert "llama-70b" not in rig.executor.blocked

    async def test_restore_waits_for_the_primarys_endpoints_then_drains_in_steps(
            self, rig: Rig) -> None:
        """Traffic goes back only once the primary has ready endpoints; then a quarter at
        a time over drain_seconds, and the fallback is scaled down only at the end."""
        await self._deployment(rig, "llama-8b", 0)
        await self._route(rig, [{"backendRefs": [{"name": "llama-70b", "port": 8000,
                                                  "weight": 100},
                                                 {"name": "llama-8b", "port": 8000,
                                                  "weight": 0}]}])
        self._target(rig, drain=2.0)
        task = asyncio.create_task(rig.executor.execute(self.DEGRADE))
        await self._become_ready(rig, "llama-8b", 2)
        assert await task
        assert not await rig.executor.execute(self.RESTORE)  # no primary endpoint yet
        assert rig.executor.blocked["llama-70b"]["reason"] == "PrimaryNotServing"
        assert await self._weights(rig) == {"llama-70b": 0, "llama-8b": 100}

        await make_endpoint_slice(rig.admin, rig.ns, "llama-70b", 2)
        apps = client.AppsV1Api(rig.admin)
        restoring = asyncio.create_task(rig.executor.execute(self.RESTORE))
        seen = []
        while not restoring.done():
            weights = await self._weights(rig)
            replicas = (await apps.read_namespaced_deployment("llama-8b", rig.ns)).spec.replicas
            if not seen or seen[-1] != (weights, replicas):
                seen.append((weights, replicas))
            await asyncio.sleep(0.05)
        assert await restoring
        primary = [w["llama-70b"] for w, _ in seen]
        assert primary == sorted(primary) and 0 < primary[1] < 100  # stepped back, upwards
        assert all(r == 2 for w, r in seen if w["llama-70b"] < 100)  # still scaled meanwhile
        assert await self._weights(rig) == {"llama-70b": 100, "llama-8b": 0}
        assert (await apps.read_namespaced_deployment("llama-8b", rig.ns)).spec.replicas == 0
        assert "llama-70b" not in rig.executor.blocked

    async def _weights(self, rig: Rig) -> dict[str, int]:
        return {r["name"]: r.get("weight", 1) for r in (await self._rules(rig))[0]["backendRefs"]}


class Switch:
    """A fence a test turns off: the Lease running out at a moment of its choosing."""

    leader = True

    def remaining(self) -> float:
        return 30.0 if self.leader else 0.0


class TestLateWritesOfADeposedLeader:
    """A leader's write held on its way to the API server (a stopped process, a slow path,
    a request queued by priority and fairness) must not land after its Lease is gone."""

    async def _held_executor(self, rig: Rig, hold: Callable[[str, str, bytes], bool],
                             fence: Any) -> tuple[ActionExecutor, ApiProxy, KubeClient]:
        assert rig.cluster is not None and rig.kubeconfig is not None
        proxy = await ApiProxy(rig.cluster, hold_from=hold).start()
        config = json.loads(rig.kubeconfig.read_text())
        config["clusters"][0]["cluster"] = {"server": proxy.url}
        slow = rig.kubeconfig.with_name("kc-through-proxy")
        slow.write_text(json.dumps(config))
        kube = await KubeClient.connect(str(slow))
        executor = ActionExecutor(kube, rig.model, SystemClock(), fence=fence, intents={},
                                  save=_noop, degrade_targets=rig.executor._degrade)
        return executor, proxy, kube

    async def test_a_late_scale_to_zero_does_not_land_after_the_new_leaders_degrade(
            self, rig: Rig) -> None:
        """Leader A restores a model: its scale of the fallback to 0 is held. A's Lease
        runs out; the new leader degrades the model again and scales the fallback up. When
        A's write reaches the API server it fails its precondition and A, fenced, does not
        try again: the fallback keeps the new leader's replicas."""
        apps = client.AppsV1Api(rig.admin)
        await apps.create_namespaced_deployment(rig.ns, deployment_body("llama-8b", 1))
        await client.CustomObjectsApi(rig.admin).create_namespaced_custom_object(
            "gateway.networking.k8s.io", "v1", rig.ns, "httproutes", {
                "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                "metadata": {"name": "llm"}, "spec": {"parentRefs": [{"name": "gw"}],
                "rules": [{"backendRefs": [{"name": "llama-70b", "port": 8000},
                                           {"name": "llama-8b", "port": 8000,
                                            "weight": 0}]}]}})
        await make_endpoint_slice(rig.admin, rig.ns, "llama-70b", 1)
        rig.executor._degrade = {"llama-70b": DegradeTarget(
            "llama-70b", Workload("Deployment", rig.ns, "llama-8b", 3),
            Traffic("HTTPRoute", rig.ns, "llm", "llama-70b", "llama-8b"), drain_seconds=0)}
        a_leads = Switch()
        a, proxy, kube = await self._held_executor(
            rig, lambda method, path, _: method == "PATCH" and path.endswith("/scale"), a_leads)
        a.intents["degrade/llama-70b"] = {"replicas_before": 0}
        try:
            restoring = asyncio.create_task(a.execute(TestControllerDegrade.RESTORE))
            await proxy.until_held()
            a_leads.leader = False  # A's Lease runs out while its write is on its way
            # The new leader degrades: the fallback goes to 3.
            await apps.patch_namespaced_deployment_scale("llama-8b", rig.ns,
                                                         {"spec": {"replicas": 3}})
            proxy.release()
            assert not await restoring
            assert a.outcomes[("restore", "fenced")] == 1
            assert [s for m, _, s in proxy.late_statuses if m == "PATCH"] == [409]
            dep = await apps.read_namespaced_deployment("llama-8b", rig.ns)
            assert dep.spec.replicas == 3
        finally:
            await proxy.close()
            await kube.close()

    async def test_a_late_quarantine_condition_does_not_land_after_the_lift(
            self, rig: Rig) -> None:
        """Leader A quarantines a node: taint written, its condition write held. The new
        leader lifts the quarantine. A's late condition fails its precondition and is not
        tried again: the node does not read as quarantined while untainted."""
        (node,) = await make_nodes(rig.admin, 1)
        a_leads = Switch()
        a, proxy, kube = await self._held_executor(
            rig, lambda method, path, _: method == "PATCH" and path.endswith("/status"), a_leads)
        try:
            quarantining = asyncio.create_task(a.execute(decision(Action.QUARANTINE, node)))
            await proxy.until_held()
            a_leads.leader = False
            assert await rig.executor.execute(decision(Action.UNQUARANTINE, node, step=-1))
            proxy.release()
            assert not await quarantining
            raw = rig.admin.sanitize_for_serialization(
                await client.CoreV1Api(rig.admin).read_node(node))
            assert not [t for t in raw["spec"].get("taints") or []
                        if t["key"] == QUARANTINE_TAINT]
            cond = next(c for c in raw["status"]["conditions"]
                        if c["type"] == QUARANTINE_CONDITION)
            assert cond["status"] == "False"
        finally:
            await proxy.close()
            await kube.close()


class TestWriteCost:
    async def test_a_gate_write_asks_for_metadata_only_and_lands(self, rig: Rig) -> None:
        """Gate writes discard the API server's answer: the request asks for the pod's
        metadata only (PartialObjectMetadata, a fraction of a Pod's JSON, which the API
        server transforms write responses into), and the write still lands."""
        nodes = await make_nodes(rig.admin, 1)
        await make_lws_group(rig.admin, rig.ns, "llama", 0, nodes)
        path = f"/api/v1/namespaces/{rig.ns}/pods/llama-0/status"
        body = {"status": {"conditions": [{"type": READINESS_GATE, "status": "False"}]}}
        status, raw = await rig.kube._transport.request(
            "PATCH", path, [], body, "application/strategic-merge-patch+json",
            METADATA_ONLY)
        answer = json.loads(raw)
        assert status == 200
        assert answer["kind"] == "PartialObjectMetadata" and "status" not in answer
        result = await rig.kube.request(
            "PATCH", path, body={"status": {"conditions": [
                {"type": READINESS_GATE, "status": "True"}]}},
            content_type="application/strategic-merge-patch+json", discard_body=True)
        assert result["status"] == "Success"
        assert gate((await list_pods(rig.admin, rig.ns))["llama-0"]) == "True"


class TestReflector:
    async def test_a_paged_list_syncs_every_object_and_keeps_only_identities(
            self, rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
        """Listed two at a time (continue tokens on the real API server), five nodes all
        reach the model; the reflector keeps each object's identity, not the object; a node
        deleted while unwatched is deleted from the model by the next relist."""
        from supervisor.controller import role

        monkeypatch.setattr(role, "LIST_PAGE", 2)
        names = await make_nodes(rig.admin, 5)
        seen: dict[str, dict[str, Any]] = {}
        gone: list[str] = []
        reflector = role.Reflector(rig.kube, "/api/v1/nodes", "",
                                   lambda o: seen.__setitem__(o["metadata"]["name"], o),
                                   lambda o: gone.append(o["metadata"]["name"]))

        async def list_once() -> None:
            """Run the reflector until it has listed (and synced), then stop it."""
            reflector.synced = False
            task = asyncio.create_task(reflector.run())
            try:
                for _ in range(100):
                    if reflector.synced:
                        return
                    await asyncio.sleep(0.05)
                raise AssertionError("the reflector did not sync")
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

        await list_once()
        assert set(names) <= set(seen)
        assert all(set(stub) == {"metadata"} and set(stub["metadata"]) <= {
            "name", "namespace", "uid"} for stub in reflector._known.values())
        await client.CoreV1Api(rig.admin).delete_node(names[0])
        await list_once()
        assert names[0] in gone


class TestTheLeaseFence:
    """The chart's ValidatingAdmissionPolicy: the API server itself refuses the
    controller's writes unless they come from the pod holding its Lease — and nobody
    else's, ever."""

    async def test_a_late_write_to_an_object_nobody_changed_is_refused_by_the_api_server(
            self, kube_cluster: KubeTestCluster, tmp_path: Path) -> None:
        """Before any Lease exists the fence lets everything through (no leader to fence
        for: the API server resolves the Lease for every node and pod update in the
        cluster, and must not block them). Leader A (a controller pod holding the Lease)
        quarantines a node; its next quarantine is held on the way while the Lease passes
        to B, which does not touch that node — so no resourceVersion precondition could
        catch A's write when it arrives. The API server refuses it: the node stays
        untainted. Anyone else's writes go through throughout."""
        async with await kube_cluster.api_client() as admin:
            release = await manifests.install_rbac(admin, unique("gs"), "controller")
            fence = [o for o in release.objects if o["kind"].startswith(
                "ValidatingAdmissionPolicy")]
            assert len(fence) == 2
            await manifests.create(admin, fence)
            lease_name = release.config("controller")["controller"]["lease_name"]
            account = release.service_account("controller")
            core = client.CoreV1Api(admin)
            pod = await core.create_namespaced_pod(release.namespace, {
                "apiVersion": "v1", "kind": "Pod", "metadata": {"name": unique("ctl-a")},
                "spec": {"serviceAccountName": account, "automountServiceAccountToken": False,
                         "containers": [{"name": "controller", "image": "gpu-supervisor"}]}})
            token = await kube_cluster.service_account_token(
                release.namespace, account,
                bound_to={"kind": "Pod", "name": pod.metadata.name, "uid": pod.metadata.uid})
            before, first, late = await make_nodes(admin, 3)
            kubeconfig = kube_cluster.write_kubeconfig(tmp_path / "kc-a", token)
            proxy = await ApiProxy(kube_cluster, hold_from=lambda method, path, _:
                                   method == "PATCH" and path.endswith(f"/nodes/{late}")
                                   ).start()
            config = json.loads(kubeconfig.read_text())
            config["clusters"][0]["cluster"] = {"server": proxy.url}
            kubeconfig.write_text(json.dumps(config))
            kube = await KubeClient.connect(str(kubeconfig))
            a_leads = Switch()
            model = HealthModel(SystemClock(), silence_seconds=30)
            a = ActionExecutor(kube, model, SystemClock(), fence=a_leads, intents={},
                               save=_noop)
            leases = client.CoordinationV1Api(admin)
            try:
                assert await a.execute(decision(Action.QUARANTINE, before))  # no Lease yet
                await leases.create_namespaced_lease(release.namespace, {
                    "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": lease_name},
                    "spec": {"holderIdentity": pod.metadata.name, "leaseDurationSeconds": 15}})
                assert await a.execute(decision(Action.QUARANTINE, first))  # A holds it
                assert await tainted(admin, first)
                quarantining = asyncio.create_task(a.execute(decision(Action.QUARANTINE,
                                                                      late)))
                await proxy.until_held()
                a_leads.leader = False
                await leases.patch_namespaced_lease(lease_name, release.namespace, {
                    "spec": {"holderIdentity": "ctl-b"}})  # B leads; it leaves the node be
                await asyncio.sleep(1.0)  # the fence's param informer sees the new holder
                proxy.release()
                assert not await quarantining
                assert [s for m, _, s in proxy.late_statuses if m == "PATCH"] == [403]
                assert not await tainted(admin, late)
                # Nobody else is fenced: an administrator (or a kubelet) changes the node.
                await core.patch_node(late, {"metadata": {"labels": {"touched": "yes"}}})
            finally:
                await proxy.close()
                await kube.close()
                registration = client.AdmissionregistrationV1Api(admin)
                name = fence[0]["metadata"]["name"]  # the policy's and its binding's
                await registration.delete_validating_admission_policy_binding(name)
                await registration.delete_validating_admission_policy(name)


async def tainted(admin: client.ApiClient, node: str) -> bool:
    raw = await client.CoreV1Api(admin).read_node(node)
    return any(t.key == QUARANTINE_TAINT for t in raw.spec.taints or [])
