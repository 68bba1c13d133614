"""Our LeaderWorkerSet CRD on the real kube-apiserver: it fills in upstream's defaults,
rejects what upstream's schema rejects with 422, and its scale subresource reports the
HPA selector."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from simulator.controlplane.cluster import KubeTestCluster

pytestmark = pytest.mark.kube

GROUP, VERSION, PLURAL = "leaderworkerset.x-k8s.io", "v1", "leaderworkersets"
NS = "lws-crd"


def lws(name: str, **spec: Any) -> dict[str, Any]:
    """An LWS with only what upstream requires (a worker template) plus ``spec``."""
    template: dict[str, Any] = {
        "workerTemplate": {"spec": {"containers": [{"name": "c", "image": "x"}]}}}
    template.update(spec.pop("leaderWorkerTemplate", {}))
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "LeaderWorkerSet",
            "metadata": {"name": name}, "spec": {"leaderWorkerTemplate": template, **spec}}


async def dry_run_create(cluster: KubeTestCluster, body: dict[str, Any]) -> dict[str, Any]:
    """Create ``body`` server-side without storing it; the object as the server has it."""
    await cluster.ensure_namespace(NS)
    async with await cluster.api_client() as api:
        got: dict[str, Any] = await client.CustomObjectsApi(api).create_namespaced_custom_object(
            GROUP, VERSION, NS, PLURAL, body, dry_run="All")
    return got


async def test_apiserver_fills_in_upstreams_defaults(kube_cluster: KubeTestCluster) -> None:
    got = await dry_run_create(kube_cluster, lws(
        "defaults", rolloutStrategy={"rollingUpdateConfiguration": {}},
        leaderWorkerTemplate={"subGroupPolicy": {"subGroupSize": 1}}))
    spec = got["spec"]
    template = spec["leaderWorkerTemplate"]
    assert spec["replicas"] == 1
    assert spec["startupPolicy"] == "LeaderCreated"
    assert template["size"] == 1
    assert template["restartPolicy"] == "RecreateGroupOnPodRestart"
    assert template["subGroupPolicy"] == {"subGroupPolicyType": "LeaderWorker",
                                          "subGroupSize": 1}
    assert spec["rolloutStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdateConfiguration": {"partition": 0, "maxUnavailable": 1, "maxSurge": 0}}
    assert "networkConfig" not in spec


async def test_apiserver_keeps_pod_templates_whole(kube_cluster: KubeTestCluster) -> None:
    leader = {"metadata": {"labels": {"role": "leader"}},
              "spec": {"containers": [{"name": "c", "image": "x"}],
                       "readinessGates": [{"conditionType": "example.com/ready"}]}}
    got = await dry_run_create(kube_cluster, lws(
        "templates", leaderWorkerTemplate={"leaderTemplate": leader}))
    assert got["spec"]["leaderWorkerTemplate"]["leaderTemplate"] == leader


def without_worker_template() -> dict[str, Any]:
    body = lws("no-worker-template")
    del body["spec"]["leaderWorkerTemplate"]["workerTemplate"]
    return body


@pytest.mark.parametrize("body", [
    lws("restart-policy", leaderWorkerTemplate={"restartPolicy": "Always"}),
    lws("startup-policy", startupPolicy="WorkersFirst"),
    lws("subgroup-type", leaderWorkerTemplate={"subGroupPolicy": {
        "subGroupPolicyType": "Workers"}}),
    lws("rollout-type", rolloutStrategy={"type": "Recreate"}),
    lws("subdomain-policy", networkConfig={"subdomainPolicy": "PerPod"}),
    lws("subdomain-policy-missing", networkConfig={}),
    lws("replicas-negative", replicas=-1),
    lws("replicas-too-many", replicas=1000001),
    without_worker_template(),
], ids=lambda body: str(body["metadata"]["name"]))
async def test_apiserver_rejects_what_upstreams_schema_rejects(
        kube_cluster: KubeTestCluster, body: dict[str, Any]) -> None:
    with pytest.raises(ApiException) as exc:
        await dry_run_create(kube_cluster, body)
    assert exc.value.status == 422, exc.value.body


async def test_scale_subresource_reports_replicas_and_hpa_selector(
        kube_cluster: KubeTestCluster) -> None:
    await kube_cluster.ensure_namespace(NS)
    async with await kube_cluster.api_client() as api:
        co = client.CustomObjectsApi(api)
        await co.create_namespaced_custom_object(
            GROUP, VERSION, NS, PLURAL, lws("scaled", replicas=2))
        try:
            await co.patch_namespaced_custom_object_status(
                GROUP, VERSION, NS, PLURAL, "scaled",
                {"status": {"replicas": 2, "hpaPodSelector": "role=leader"}},
                _content_type="application/merge-patch+json")
            scale = await co.get_namespaced_custom_object_scale(
                GROUP, VERSION, NS, PLURAL, "scaled")
        finally:
            await co.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "scaled")
    assert scale["spec"]["replicas"] == 2
    assert scale["status"] == {"replicas": 2, "selector": "role=leader"}
