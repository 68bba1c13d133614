"""The controller's RBAC from deploy/ on the real API server: every call the controller
makes succeeds as its ServiceAccount, and the calls it must never be able to make — rewrite
a workload's pod template, read Secrets, run pods — are forbidden."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from tests.integration.cluster_objects import make_lws_group, make_nodes, unique
from tests.kubeenv import manifests
from tests.kubeenv.cluster import REPORT_AUDIENCE, KubeTestCluster

pytestmark = pytest.mark.kube

LWS = ("leaderworkerset.x-k8s.io", "v1", "leaderworkersets")
ROUTES = ("gateway.networking.k8s.io", "v1", "httproutes")


async def forbidden(call: Awaitable[Any]) -> None:
    with pytest.raises(ApiException) as info:
        await call
    assert info.value.status == 403, info.value


async def test_controller_rbac_allows_its_calls_and_forbids_the_rest(
        kube_cluster: KubeTestCluster) -> None:
    """As gpu-supervisor-controller: watch and patch what the actions need, scale through
    /scale; no patch of a Deployment or LWS, no Secrets, no pods created, no events
    updated, no Lease or ConfigMap outside its own namespace."""
    async with await kube_cluster.api_client() as admin:
        await manifests.apply(admin, "namespace.yaml", "controller-rbac.yaml")
        ns = unique("serving")
        await kube_cluster.ensure_namespace(ns)
        nodes = await make_nodes(admin, 2)
        pods = await make_lws_group(admin, ns, "llama", 0, nodes)
        apps = client.AppsV1Api(admin)
        await apps.create_namespaced_deployment(ns, {
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "small"},
            "spec": {"replicas": 0, "selector": {"matchLabels": {"app": "small"}},
                     "template": {"metadata": {"labels": {"app": "small"}},
                                  "spec": {"containers": [{"name": "c", "image": "x"}]}}}})
        co = client.CustomObjectsApi(admin)
        await co.create_namespaced_custom_object(*LWS[:2], ns, LWS[2], {
            "apiVersion": "leaderworkerset.x-k8s.io/v1", "kind": "LeaderWorkerSet",
            "metadata": {"name": "llama"},
            "spec": {"replicas": 1, "leaderWorkerTemplate": {"size": 2, "workerTemplate": {
                "spec": {"containers": [{"name": "c", "image": "x"}]}}}}})
        await co.create_namespaced_custom_object(*ROUTES[:2], ns, ROUTES[2], {
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "llm"}, "spec": {"rules": [{"backendRefs": [
                {"name": "big", "port": 80}]}]}})
        await client.CoreV1Api(admin).create_namespaced_service(ns, {
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": "llm"},
            "spec": {"selector": {"model": "big"}, "ports": [{"port": 80}]}})
        await client.CoreV1Api(admin).create_namespaced_secret(ns, {
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "weights-token"},
            "stringData": {"token": "hf_x"}})
        agent_token = await kube_cluster.service_account_token(
            "gpu-supervisor", "gpu-supervisor-agent", audiences=[REPORT_AUDIENCE])

    async with await kube_cluster.service_account_client(
            "gpu-supervisor", "gpu-supervisor-controller") as api:
        core = client.CoreV1Api(api)
        apps = client.AppsV1Api(api)
        co = client.CustomObjectsApi(api)
        auth = client.AuthenticationV1Api(api)
        coord = client.CoordinationV1Api(api)
        leader = pods[0]["metadata"]["name"]
        # --- what the controller does ----------------------------------------------------
        await core.list_node()
        await core.list_pod_for_all_namespaces(label_selector="leaderworkerset.sigs.k8s.io/name")
        await core.read_namespaced_pod(leader, ns)
        await core.patch_namespaced_pod_status(leader, ns, {"status": {"conditions": [
            {"type": "gpu-supervisor.io/serving", "status": "False"}]}})
        await core.read_node(nodes[0])
        await core.patch_node(nodes[0], {"spec": {"unschedulable": True}})
        await core.patch_node_status(nodes[0], {"status": {"conditions": [
            {"type": "GPUSupervisorQuarantined", "status": "True"}]}})
        await core.create_namespaced_event(ns, {
            "metadata": {"generateName": "x."},
            "involvedObject": {"kind": "Pod", "name": leader, "namespace": ns},
            "reason": "GroupFailedOver", "message": "m", "type": "Warning"})
        review = await auth.create_token_review({"spec": {"token": agent_token,
                                                          "audiences": [REPORT_AUDIENCE]}})
        assert review.status.authenticated
        await apps.read_namespaced_deployment("small", ns)
        await apps.read_namespaced_deployment_scale("small", ns)
        await apps.patch_namespaced_deployment_scale("small", ns, {"spec": {"replicas": 1}})
        await co.list_cluster_custom_object(*LWS)
        await co.get_namespaced_custom_object(*LWS[:2], ns, LWS[2], "llama")
        await co.get_namespaced_custom_object_scale(*LWS[:2], ns, LWS[2], "llama")
        await co.patch_namespaced_custom_object_scale(
            *LWS[:2], ns, LWS[2], "llama", {"spec": {"replicas": 2}},
            _content_type="application/merge-patch+json")
        route = await co.get_namespaced_custom_object(*ROUTES[:2], ns, ROUTES[2], "llm")
        await co.replace_namespaced_custom_object(*ROUTES[:2], ns, ROUTES[2], "llm", route)
        svc = await core.read_namespaced_service("llm", ns)
        await core.replace_namespaced_service("llm", ns, svc)
        await coord.create_namespaced_lease("gpu-supervisor", {
            "metadata": {"name": "rbac-lease"}, "spec": {"holderIdentity": "x"}})
        lease = await coord.read_namespaced_lease("rbac-lease", "gpu-supervisor")
        await coord.replace_namespaced_lease("rbac-lease", "gpu-supervisor", lease)
        await core.create_namespaced_config_map("gpu-supervisor", {
            "metadata": {"name": "rbac-state"}, "data": {"state.json": "{}"}})
        await core.patch_namespaced_config_map("rbac-state", "gpu-supervisor",
                                               {"data": {"state.json": "{\"x\": 1}"}})
        await core.delete_namespaced_pod(leader, ns)
        # --- what it must never be able to do ---------------------------------------------
        template = {"spec": {"template": {"spec": {"containers": [
            {"name": "c", "image": "attacker/miner"}]}}}}
        await forbidden(apps.patch_namespaced_deployment("small", ns, template))
        await forbidden(apps.replace_namespaced_deployment(
            "small", ns, await client.AppsV1Api(api).read_namespaced_deployment("small", ns)))
        await forbidden(co.patch_namespaced_custom_object(*LWS[:2], ns, LWS[2], "llama", {
            "spec": {"leaderWorkerTemplate": {"workerTemplate": template["spec"]["template"]}}},
            _content_type="application/merge-patch+json"))
        await forbidden(core.read_namespaced_secret("weights-token", ns))
        await forbidden(core.list_secret_for_all_namespaces())
        await forbidden(core.create_namespaced_pod(ns, {
            "metadata": {"name": "evil"}, "spec": {"containers": [{"name": "c",
                                                                   "image": "x"}]}}))
        await forbidden(core.connect_get_namespaced_pod_exec(
            pods[1]["metadata"]["name"], ns, command=["sh"], stdout=True))
        await forbidden(core.delete_node(nodes[1]))
        await forbidden(core.patch_namespaced_event("x", ns, {"message": "rewritten"}))
        await forbidden(core.create_namespaced_config_map(ns, {"metadata": {"name": "x"}}))
        await forbidden(coord.create_namespaced_lease(ns, {"metadata": {"name": "x"}}))
        await forbidden(core.delete_namespaced_config_map("rbac-state", "gpu-supervisor"))
        await forbidden(core.create_namespaced_service_account_token(
            "gpu-supervisor-agent", "gpu-supervisor", {"spec": {}}))
