"""Serving objects on the test cluster, as LWS and a kubelet would have left them.

No LWS controller or kubelet runs on the test cluster, so tests create what they would
have: the pods of a group with LWS's labels, bound to nodes, containers ready.
"""

from __future__ import annotations

import uuid
from typing import Any

from kubernetes_asyncio import client

from simulator.controlplane.cluster import REPORT_AUDIENCE
from supervisor.controller.model import LWS_GROUP, LWS_NAME, LWS_WORKER, READINESS_GATE


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


async def make_nodes(api: client.ApiClient, count: int, prefix: str = "gpu") -> list[str]:
    core = client.CoreV1Api(api)
    names = [unique(prefix) for _ in range(count)]
    for name in names:
        await core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name=name)))
        await core.patch_node_status(name, {"status": {"conditions": [
            {"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "ok"}]}})
    return names


def pod_body(name: str, node: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": labels},
            "spec": {"nodeName": node, "serviceAccountName": "default",
                     "automountServiceAccountToken": False,
                     "readinessGates": [{"conditionType": READINESS_GATE}],
                     "containers": [{"name": "vllm", "image": "vllm/vllm-openai:test"}]}}



def deployment_body(name: str, replicas: int) -> dict[str, Any]:
    """A Deployment of ``replicas`` pods labelled ``app: name`` (a fallback model's, say);
    nothing here runs its pods."""
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}},
                                  "spec": {"containers": [{"name": "c", "image": "x"}]}}}}


async def make_endpoint_slice(api: client.ApiClient, ns: str, service: str, ready: int,
                              not_ready: int = 0) -> None:
    """An EndpointSlice of ``service`` as the EndpointSlice controller writes it."""
    eps = [{"addresses": [f"10.1.{i // 250}.{i % 250 + 1}"], "conditions": {"ready": True}}
           for i in range(ready)]
    eps += [{"addresses": [f"10.2.{i // 250}.{i % 250 + 1}"], "conditions": {"ready": False}}
            for i in range(not_ready)]
    await client.DiscoveryV1Api(api).create_namespaced_endpoint_slice(ns, {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"generateName": f"{service}-",
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4", "endpoints": eps, "ports": [{"name": "http", "port": 8000}]})

async def mark_running(core: client.CoreV1Api, ns: str, name: str, gate: bool = True) -> None:
    conditions = [{"type": "ContainersReady", "status": "True"}]
    if gate:  # as the controller would have admitted it
        conditions.append({"type": READINESS_GATE, "status": "True", "reason": "GroupHealthy"})
    await core.patch_namespaced_pod_status(name, ns, {"status": {
        "phase": "Running", "conditions": conditions}})


async def make_lws_group(api: client.ApiClient, ns: str, lws: str, index: int,
                         nodes: list[str], model: str = "", gate: bool = True
                         ) -> list[dict[str, Any]]:
    """Pods of one LWS group: worker 0 is the leader, one pod per node."""
    core = client.CoreV1Api(api)
    pods = []
    for worker, node in enumerate(nodes):
        labels = {LWS_NAME: lws, LWS_GROUP: str(index), LWS_WORKER: str(worker)}
        if model:
            labels["gpu-supervisor.io/model"] = model
        name = f"{lws}-{index}" if worker == 0 else f"{lws}-{index}-{worker}"
        created = await core.create_namespaced_pod(ns, pod_body(name, node, labels))
        await mark_running(core, ns, name, gate)
        pods.append(api.sanitize_for_serialization(created))
    return pods


async def make_generic_group(api: client.ApiClient, ns: str, group: str, nodes: list[str],
                             label: str = "ray.io/group") -> list[str]:
    core = client.CoreV1Api(api)
    names = []
    for i, node in enumerate(nodes):
        name = f"{group}-{i}"
        await core.create_namespaced_pod(ns, pod_body(
            name, node, {"ray.io/node-type": "worker", label: group}))
        await mark_running(core, ns, name)
        names.append(name)
    return names


async def list_pods(api: client.ApiClient, ns: str) -> dict[str, dict[str, Any]]:
    pods = await client.CoreV1Api(api).list_namespaced_pod(ns)
    return {p.metadata.name: api.sanitize_for_serialization(p) for p in pods.items}


async def finish_deletion(api: client.ApiClient, ns: str, name: str) -> None:
    """Play the garbage collector and kubelet: drop finalizers, force the pod away."""
    import asyncio

    core = client.CoreV1Api(api)
    await core.patch_namespaced_pod(name, ns, {"metadata": {"finalizers": None}})
    try:
        await core.delete_namespaced_pod(name, ns, grace_period_seconds=0)
    except client.exceptions.ApiException as exc:
        if exc.status != 404:
            raise
    for _ in range(100):
        if name not in await list_pods(api, ns):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"pod {ns}/{name} did not go away")


async def agent_pod(api: client.ApiClient, namespace: str, account: str,
                    labels: dict[str, str], node: str) -> dict[str, Any]:
    """An agent pod on ``node``, as the chart's DaemonSet would have created it (its labels,
    its ServiceAccount)."""
    core = client.CoreV1Api(api)
    body = {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": unique(f"agent-{node}")[:63], "labels": labels},
            "spec": {"nodeName": node, "serviceAccountName": account,
                     "automountServiceAccountToken": False,
                     "containers": [{"name": "agent", "image": "gpu-supervisor:test"}]}}
    created = await core.create_namespaced_pod(namespace, body)
    return dict(api.sanitize_for_serialization(created))


async def pod_token(api: client.ApiClient, pod: dict[str, Any],
                    expiration_seconds: int = 3600) -> str:
    """A report token bound to ``pod`` (its ServiceAccount, our audience), as the kubelet
    projects one into it."""
    core = client.CoreV1Api(api)
    meta = pod["metadata"]
    body: Any = {"spec": {"audiences": [REPORT_AUDIENCE],
                          "expirationSeconds": expiration_seconds,
                          "boundObjectRef": {"apiVersion": "v1", "kind": "Pod",
                                             "name": meta["name"], "uid": meta["uid"]}}}
    resp = await core.create_namespaced_service_account_token(
        pod["spec"]["serviceAccountName"], meta["namespace"], body)
    return str(resp.status.token)


async def agent_token(api: client.ApiClient, release: Any, node: str) -> str:
    """A report token of an agent of ``release`` (a ``manifests.Release``) on ``node``:
    an agent pod with the chart's labels on that node, and a token bound to it."""
    pod = await agent_pod(api, release.namespace, release.service_account("agent"),
                          release.agent_pod_labels(), node)
    return await pod_token(api, pod)
