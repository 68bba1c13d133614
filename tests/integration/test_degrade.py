"""Degrade keeps a model's serving groups in traffic next to its fallback (issue #20).

The executor is driven with policy Decisions as the controller's ServiceAccount, on a real
API server; its HealthModel is fed from the API server as the watches would feed it. No
Deployment, EndpointSlice or LWS controller runs here: the tests create the pods and
EndpointSlices those would have.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from kubernetes_asyncio import client

from policies.model import Action, Decision
from simulator.controlplane.cluster import KubeTestCluster
from supervisor.controller.actions import (
    QUARANTINE_TAINT,
    TRAFFIC_ANNOTATION,
    ActionExecutor,
    DegradeTarget,
    Traffic,
    Workload,
)
from supervisor.controller.model import HealthModel
from supervisor.kube import KubeClient
from supervisor.runtime.clock import SystemClock
from tests.integration.cluster_objects import (
    deployment_body,
    make_endpoint_slice,
    make_lws_group,
    make_nodes,
    unique,
)
from tests.kubeenv import manifests

pytestmark = pytest.mark.kube

GROUP = "gateway.networking.k8s.io"
DEGRADE = Decision(incident="degrade/llama-70b", rule="degrade", step=-1,
                   action=Action.DEGRADE, target="llama-70b", reason="capacity", dry_run=False)
RESTORE = Decision(incident="degrade/llama-70b", rule="degrade", step=-1,
                   action=Action.RESTORE, target="llama-70b", reason="back", dry_run=False)


class Leading:
    """A fence that always allows: a leader with a fresh Lease."""

    def remaining(self) -> float:
        return 30.0


@dataclass
class Rig:
    admin: client.ApiClient
    kube: KubeClient
    ns: str
    model: HealthModel
    executor: ActionExecutor

    async def refresh(self) -> None:
        """Feed the model from the API server, as the Pod watch would."""
        pods = await self.kube.request("GET", f"/api/v1/namespaces/{self.ns}/pods")
        for pod in pods["items"]:
            self.model.upsert_pod(pod)

    async def groups(self, count: int) -> None:
        """``count`` healthy two-pod groups of llama-70b, in the model."""
        nodes = await make_nodes(self.admin, 2 * count)
        for index in range(count):
            await make_lws_group(self.admin, self.ns, "llama-70b", index,
                                 nodes[2 * index:2 * index + 2], model="llama-70b")
        await self.refresh()

    async def fail_over(self, index: int) -> None:
        """The group out of traffic, as the fail-over action leaves it."""
        assert await self.executor.execute(Decision(
            incident=f"gpu-lost/group/{index}", rule="gpu-lost", step=0,
            action=Action.FAIL_OVER, target=f"{self.ns}/llama-70b/{index}",
            reason="XID 79", dry_run=False))
        await self.refresh()

    async def recover(self, index: int) -> None:
        assert await self.executor.execute(Decision(
            incident=f"gpu-lost/group/{index}", rule="gpu-lost", step=-1,
            action=Action.RECOVER, target=f"{self.ns}/llama-70b/{index}",
            reason="healthy", dry_run=False))
        await self.refresh()

    async def endpoints(self, service: str, ready: int) -> None:
        """The Service's EndpointSlice as the EndpointSlice controller would rewrite it."""
        await client.DiscoveryV1Api(self.admin).delete_collection_namespaced_endpoint_slice(
            self.ns, label_selector=f"kubernetes.io/service-name={service}")
        await make_endpoint_slice(self.admin, self.ns, service, ready)

    async def route(self, rules: list[dict[str, Any]],
                    annotations: dict[str, str] | None = None) -> None:
        await client.CustomObjectsApi(self.admin).create_namespaced_custom_object(
            GROUP, "v1", self.ns, "httproutes", {
                "apiVersion": f"{GROUP}/v1", "kind": "HTTPRoute",
                "metadata": {"name": "llm", "annotations": annotations or {}},
                "spec": {"parentRefs": [{"name": "gw"}], "rules": rules}})

    async def route_obj(self) -> dict[str, Any]:
        obj: dict[str, Any] = await client.CustomObjectsApi(
            self.admin).get_namespaced_custom_object(GROUP, "v1", self.ns, "httproutes", "llm")
        return obj

    async def weights(self, rule: int = 0) -> dict[str, int]:
        refs = (await self.route_obj())["spec"]["rules"][rule]["backendRefs"]
        return {r["name"]: r.get("weight", 1) for r in refs}

    async def replicas(self, name: str) -> int:
        dep = await client.AppsV1Api(self.admin).read_namespaced_deployment(name, self.ns)
        return int(dep.spec.replicas)

    async def events(self, name: str) -> list[Any]:
        evs = await client.CoreV1Api(self.admin).list_namespaced_event(
            self.ns, field_selector=f"involvedObject.name={name}")
        return sorted(evs.items, key=lambda e: e.metadata.creation_timestamp)


@pytest.fixture(name="rig")
async def _rig(kube_cluster: KubeTestCluster, tmp_path: Any) -> AsyncIterator[Rig]:
    async with await kube_cluster.api_client() as admin:
        release = await manifests.install_rbac(admin, manifests.NAMESPACE, "controller")
        token = await kube_cluster.service_account_token(
            release.namespace, release.service_account("controller"))
        kube = await KubeClient.connect(str(kube_cluster.write_kubeconfig(tmp_path / "kc",
                                                                          token)))
        ns = unique("serving")
        await kube_cluster.ensure_namespace(ns)
        clock = SystemClock()
        model = HealthModel(clock, silence_seconds=30, quarantine_taint=QUARANTINE_TAINT)

        async def save() -> None:
            return None

        executor = ActionExecutor(kube, model, clock, fence=Leading(), intents={}, save=save)
        try:
            yield Rig(admin, kube, ns, model, executor)
        finally:
            await kube.close()


def route_target(rig: Rig, *, replicas: int = 2, drain: float = 0.0) -> None:
    rig.executor._degrade = {"llama-70b": DegradeTarget(
        "llama-70b", Workload("Deployment", rig.ns, "llama-8b", replicas),
        Traffic("HTTPRoute", rig.ns, "llm", "llama-70b", "llama-8b"), ready_timeout=30,
        drain_seconds=drain)}


async def degrade_with_fallback_ready(rig: Rig, ready: int) -> None:
    """Degrade, playing the Deployment and EndpointSlice controllers: once the fallback is
    scaled up, its Service has ``ready`` ready endpoints."""
    task = asyncio.create_task(rig.executor.execute(DEGRADE))
    for _ in range(200):
        if await rig.replicas("llama-8b") > 0:
            break
        await asyncio.sleep(0.05)
    await rig.endpoints("llama-8b", ready)
    assert await task


ROUTE_100_0 = [{"backendRefs": [{"name": "llama-70b", "port": 8000, "weight": 100},
                                {"name": "llama-8b", "port": 8000, "weight": 0}]}]


async def one_of_two_groups_down(rig: Rig, *, drain: float = 0.0) -> None:
    """Two groups, the first failed over (the other's leader the model's one ready
    endpoint), the fallback Deployment at zero and the route all on the model."""
    await rig.groups(2)
    await rig.fail_over(0)
    await rig.endpoints("llama-70b", 1)
    await client.AppsV1Api(rig.admin).create_namespaced_deployment(
        rig.ns, deployment_body("llama-8b", 0))
    await rig.route(ROUTE_100_0)
    route_target(rig, drain=drain)


class TestRouteSplit:
    async def test_degrade_shares_the_route_between_serving_groups_and_fallback(
            self, rig: Rig) -> None:
        """One of two groups failed over, the fallback ready with two replicas: the
        route's weight is split 1 : 2 between the group that still serves and the
        fallback, their sum kept; the annotation records the split as degrade's "after"."""
        await one_of_two_groups_down(rig)
        await degrade_with_fallback_ready(rig, 2)
        assert await rig.weights() == {"llama-70b": 33, "llama-8b": 67}
        plan = json.loads((await rig.route_obj())["metadata"]["annotations"][
            TRAFFIC_ANNOTATION])
        assert plan == [{"rule": 0, "before": {"primary": 100, "fallback": 0},
                         "after": {"primary": 33, "fallback": 67}}]
        (event,) = [e for e in await rig.events("llm")
                    if e.reason == "TrafficShiftedToFallback"]
        assert "1 group(s) of the model, 2 ready endpoint(s) of llama-8b" in event.message
        assert "llama-70b 33, llama-8b 67" in event.message

    async def test_with_no_group_serving_the_primary_gets_nothing(self, rig: Rig) -> None:
        """Both groups failed over: nothing of the model serves, all the weight goes to the
        fallback (weight on a backend without endpoints would be answered with errors)."""
        await rig.groups(2)
        await rig.fail_over(0)
        await rig.fail_over(1)
        await client.AppsV1Api(rig.admin).create_namespaced_deployment(
            rig.ns, deployment_body("llama-8b", 0))
        await rig.route(ROUTE_100_0)
        route_target(rig)
        await degrade_with_fallback_ready(rig, 2)
        assert await rig.weights() == {"llama-70b": 0, "llama-8b": 100}

    async def test_a_group_counts_only_while_the_primary_backend_has_endpoints(
            self, rig: Rig) -> None:
        """Groups healthy in the model but no ready endpoint behind the primary's Service
        (its pods not Ready yet): the gateway could not send there, so it gets nothing."""
        await rig.groups(1)
        await client.AppsV1Api(rig.admin).create_namespaced_deployment(
            rig.ns, deployment_body("llama-8b", 0))
        await rig.route(ROUTE_100_0)
        route_target(rig)
        await degrade_with_fallback_ready(rig, 2)
        assert await rig.weights() == {"llama-70b": 0, "llama-8b": 100}

    async def test_a_degraded_route_follows_the_groups_that_serve(self, rig: Rig) -> None:
        """Degrade decided again while degraded splits the route anew: off the last group
        when it fails too, back onto the groups that return — the fallback is not scaled
        again and the restore record keeps the weights from before the first degrade."""
        await one_of_two_groups_down(rig)
        await degrade_with_fallback_ready(rig, 2)
        assert await rig.weights() == {"llama-70b": 33, "llama-8b": 67}

        await rig.fail_over(1)
        await rig.endpoints("llama-70b", 0)
        assert await rig.executor.execute(DEGRADE)
        assert await rig.weights() == {"llama-70b": 0, "llama-8b": 100}

        await rig.recover(0)
        await rig.recover(1)
        await rig.endpoints("llama-70b", 2)
        assert await rig.executor.execute(DEGRADE)
        assert await rig.weights() == {"llama-70b": 50, "llama-8b": 50}
        plan = json.loads((await rig.route_obj())["metadata"]["annotations"][
            TRAFFIC_ANNOTATION])
        assert plan[0]["before"] == {"primary": 100, "fallback": 0}
        assert [e.reason for e in await rig.events("llm")].count("TrafficRebalanced") == 2
        assert rig.executor.intents == {"degrade/llama-70b": {"replicas_before": 0}}

        assert await rig.executor.execute(DEGRADE)  # nothing changed: nothing written
        assert [e.reason for e in await rig.events("llm")].count("TrafficRebalanced") == 2

        assert await rig.executor.execute(RESTORE)
        assert await rig.weights() == {"llama-70b": 100, "llama-8b": 0}
        assert await rig.replicas("llama-8b") == 0

    async def test_splitting_again_and_restoring_leave_a_weight_edited_since_alone(
            self, rig: Rig) -> None:
        """Someone sets the fallback's weight in a degraded rule by hand: splitting again
        and restoring leave that weight as they set it, and still move the others — the
        primary's off the failed group, then back."""
        await rig.groups(2)
        await rig.fail_over(0)
        await rig.endpoints("llama-70b", 1)
        await client.AppsV1Api(rig.admin).create_namespaced_deployment(
            rig.ns, deployment_body("llama-8b", 0))
        await rig.route(ROUTE_100_0 + [
            {"matches": [{"path": {"type": "PathPrefix", "value": "/v2"}}],
             "backendRefs": [{"name": "llama-70b", "port": 8000, "weight": 10},
                             {"name": "llama-8b", "port": 8000, "weight": 0}]}])
        route_target(rig)
        await degrade_with_fallback_ready(rig, 2)
        assert [await rig.weights(0), await rig.weights(1)] == [
            {"llama-70b": 33, "llama-8b": 67}, {"llama-70b": 3, "llama-8b": 7}]
        obj = await rig.route_obj()
        obj["spec"]["rules"][1]["backendRefs"][1]["weight"] = 1
        await client.CustomObjectsApi(rig.admin).replace_namespaced_custom_object(
            GROUP, "v1", rig.ns, "httproutes", "llm", obj)

        await rig.fail_over(1)
        await rig.endpoints("llama-70b", 0)
        assert await rig.executor.execute(DEGRADE)
        assert [await rig.weights(0), await rig.weights(1)] == [
            {"llama-70b": 0, "llama-8b": 100}, {"llama-70b": 0, "llama-8b": 1}]

        await rig.endpoints("llama-70b", 2)
        assert await rig.executor.execute(RESTORE)
        assert [await rig.weights(0), await rig.weights(1)] == [
            {"llama-70b": 100, "llama-8b": 0}, {"llama-70b": 10, "llama-8b": 1}]

    async def test_a_drained_restore_steps_past_a_weight_edited_since(
            self, rig: Rig) -> None:
        """An edited weight does not cut a drained restore short: the other weights step
        on to where they were before degrade (stopping part-way would leave weight on the
        fallback that is scaled down next)."""
        await rig.groups(1)
        await rig.endpoints("llama-70b", 1)
        await client.AppsV1Api(rig.admin).create_namespaced_deployment(
            rig.ns, deployment_body("llama-8b", 0))
        await rig.route(ROUTE_100_0 + [
            {"matches": [{"path": {"type": "PathPrefix", "value": "/v2"}}],
             "backendRefs": [{"name": "llama-70b", "port": 8000, "weight": 100},
                             {"name": "llama-8b", "port": 8000, "weight": 0}]}])
        route_target(rig, drain=0.4)
        await degrade_with_fallback_ready(rig, 1)
        assert await rig.weights(1) == {"llama-70b": 50, "llama-8b": 50}
        obj = await rig.route_obj()
        obj["spec"]["rules"][1]["backendRefs"][1]["weight"] = 40
        await client.CustomObjectsApi(rig.admin).replace_namespaced_custom_object(
            GROUP, "v1", rig.ns, "httproutes", "llm", obj)
        assert await rig.executor.execute(RESTORE)
        assert [await rig.weights(0), await rig.weights(1)] == [
            {"llama-70b": 100, "llama-8b": 0}, {"llama-70b": 100, "llama-8b": 40}]

    async def test_restore_drains_upwards_from_the_split(self, rig: Rig) -> None:
        """Restore gives the weight back a quarter of the way at a time from the split —
        the serving group's share only ever grows — and scales the fallback down last."""
        await one_of_two_groups_down(rig, drain=2.0)
        await degrade_with_fallback_ready(rig, 2)
        await rig.recover(0)
        await rig.endpoints("llama-70b", 2)
        restoring = asyncio.create_task(rig.executor.execute(RESTORE))
        seen: list[tuple[int, int]] = []
        while not restoring.done():
            w = (await rig.weights())["llama-70b"], await rig.replicas("llama-8b")
            if not seen or seen[-1] != w:
                seen.append(w)
            await asyncio.sleep(0.05)
        assert await restoring
        assert seen[0] == (33, 2)
        primary = [p for p, _ in seen]
        assert primary == sorted(primary) and {50, 67, 83} & set(primary)
        assert all(r == 2 for p, r in seen if p < 100)
        assert await rig.weights() == {"llama-70b": 100, "llama-8b": 0}
        assert await rig.replicas("llama-8b") == 0

    async def test_a_route_degraded_by_an_earlier_version_is_split_and_restored(
            self, rig: Rig) -> None:
        """A route degraded before splits (everything on the fallback, its annotation
        with the primary's "after" at 0): degrade decided again splits it, restore brings
        it back to where it was before that first degrade."""
        await rig.groups(1)
        await rig.endpoints("llama-70b", 1)
        await client.AppsV1Api(rig.admin).create_namespaced_deployment(
            rig.ns, deployment_body("llama-8b", 2))
        await rig.endpoints("llama-8b", 2)
        old_plan = [{"rule": 0, "before": {"primary": 90, "fallback": 0},
                     "after": {"primary": 0, "fallback": 90}}]
        await rig.route([{"backendRefs": [{"name": "llama-70b", "port": 8000, "weight": 0},
                                          {"name": "llama-8b", "port": 8000, "weight": 90}]}],
                        annotations={TRAFFIC_ANNOTATION: json.dumps(old_plan)})
        route_target(rig)
        rig.executor.intents["degrade/llama-70b"] = {"replicas_before": 0}
        assert await rig.executor.execute(DEGRADE)
        assert await rig.weights() == {"llama-70b": 30, "llama-8b": 60}
        assert await rig.executor.execute(RESTORE)
        assert await rig.weights() == {"llama-70b": 90, "llama-8b": 0}
        assert TRAFFIC_ANNOTATION not in (await rig.route_obj())["metadata"].get(
            "annotations", {})


async def ready_pod(rig: Rig, labels: dict[str, str]) -> None:
    """A Ready pod with ``labels``, as the kubelet would report it."""
    core = client.CoreV1Api(rig.admin)
    pod = await core.create_namespaced_pod(rig.ns, {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"generateName": "serving-", "labels": labels},
        "spec": {"containers": [{"name": "c", "image": "x"}]}})
    await core.patch_namespaced_pod_status(pod.metadata.name, rig.ns, {"status": {
        "phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}})


class TestServiceSelector:
    async def _service(self, rig: Rig, fallback: str) -> None:
        await client.AppsV1Api(rig.admin).create_namespaced_deployment(
            rig.ns, deployment_body("small", 0))
        await client.CoreV1Api(rig.admin).create_namespaced_service(rig.ns, {
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": "llm"},
            "spec": {"selector": {"app": "llm", "model": "big"},
                     "ports": [{"port": 8000}]}})
        rig.executor._degrade = {"big": DegradeTarget(
            "big", Workload("Deployment", rig.ns, "small", 1),
            Traffic("Service", rig.ns, "llm", "app=llm,model=big", fallback),
            ready_timeout=2, drain_seconds=0)}

    async def _selector(self, rig: Rig) -> dict[str, str]:
        svc = await client.CoreV1Api(rig.admin).read_namespaced_service("llm", rig.ns)
        return dict(svc.spec.selector)

    @staticmethod
    def _decision(action: Action) -> Decision:
        return Decision(incident="degrade/big", rule="degrade", step=-1, action=action,
                        target="big", reason="capacity.", dry_run=False)

    async def test_a_fallback_selector_that_also_picks_the_primary_keeps_it_serving(
            self, rig: Rig) -> None:
        """A fallback selector made of some of the primary's terms (``app=llm``) selects
        both models' pods: degrade waits for the fallback's own Ready pods — the primary's
        do not count — then the Service sends to both, each Ready pod one endpoint; the
        Event says so. Restore puts the primary's selector back."""
        await self._service(rig, "app=llm")
        await ready_pod(rig, {"app": "llm", "model": "big"})
        await ready_pod(rig, {"app": "llm", "model": "big"})
        assert not await rig.executor.execute(self._decision(Action.DEGRADE))
        assert rig.executor.blocked["big"]["reason"] == "FallbackNotServing"
        assert await self._selector(rig) == {"app": "llm", "model": "big"}

        await ready_pod(rig, {"app": "llm", "model": "small"})
        assert await rig.executor.execute(self._decision(Action.DEGRADE))
        assert await self._selector(rig) == {"app": "llm"}
        (event,) = [e for e in await rig.events("llm")
                    if e.reason == "TrafficShiftedToFallback"]
        assert "the model's serving pods and small's" in event.message

        assert await rig.executor.execute(self._decision(Action.RESTORE))
        assert await self._selector(rig) == {"app": "llm", "model": "big"}

    async def test_a_fallback_selector_of_its_own_moves_all_traffic_and_says_so(
            self, rig: Rig) -> None:
        """A fallback selector that does not pick the primary's pods: the Service can
        select one model only, all of its traffic moves to the fallback, and the Event says
        that the model's serving groups get none and what would keep them serving."""
        await self._service(rig, "app=llm,model=small")
        await ready_pod(rig, {"app": "llm", "model": "big"})
        await ready_pod(rig, {"app": "llm", "model": "small"})
        assert await rig.executor.execute(self._decision(Action.DEGRADE))
        assert await self._selector(rig) == {"app": "llm", "model": "small"}
        (event,) = [e for e in await rig.events("llm")
                    if e.reason == "TrafficShiftedToFallback"]
        assert "all of the Service's traffic goes to small" in event.message
        assert "use an HTTPRoute" in event.message
