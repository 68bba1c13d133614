"""The simulated cluster's objects, through the same Kubernetes adapter the daemons use.

- the chart as an operator installs it (``deploy/manifests/gpu-supervisor.yaml``, the chart
  rendered): RBAC, config, the agent DaemonSet and the controller Deployment, whose pods
  the real scheduler places and kwok "runs" — the simulator then runs each pod's process;
- GPU nodes (capacity ``nvidia.com/gpu``, the labels the agent DaemonSet selects) and one
  system node for the controllers;
- per model, a Service in front of its groups' leaders and the groups themselves.

LeaderWorkerSet's controller cannot be built here (its Go module is not served), so
:class:`GroupKeeper` plays it: it creates each group's pods with LWS's labels (or a
topology group kind's), and recreates the whole group when any member is deleted — LWS's
``RecreateGroupOnPodRestart``. Everything else (scheduling, Running/Ready, readiness
gates, EndpointSlices, garbage collection) is the real machinery.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import yaml

from simulator.scenario import Fallback, Model, Scenario
from supervisor.controller.model import (
    LWS_GROUP,
    LWS_NAME,
    LWS_WORKER,
    MODEL_LABEL,
    READINESS_GATE,
)
from supervisor.errors import KubeError
from supervisor.kube import KubeClient

log = structlog.get_logger("simulator")

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "deploy" / "manifests" / "gpu-supervisor.yaml"
SYSTEM = "gpu-supervisor"
SERVING = "serving"
SYSTEM_NODE = "system-0"
REPORT_AUDIENCE = "gpu-supervisor"
GROUP_LABEL = "sim.gpu-supervisor.io/group"  # every member of a group, whatever its kind

# kind → (API path prefix, plural, namespaced): the kinds the chart renders and we create
# (the tests' chart installs use it too).
RESOURCES: dict[str, tuple[str, str, bool]] = {
    "Namespace": ("/api/v1", "namespaces", False),
    "ServiceAccount": ("/api/v1", "serviceaccounts", True),
    "ConfigMap": ("/api/v1", "configmaps", True),
    "Secret": ("/api/v1", "secrets", True),
    "Service": ("/api/v1", "services", True),
    "Node": ("/api/v1", "nodes", False),
    "Pod": ("/api/v1", "pods", True),
    "DaemonSet": ("/apis/apps/v1", "daemonsets", True),
    "Deployment": ("/apis/apps/v1", "deployments", True),
    "PodDisruptionBudget": ("/apis/policy/v1", "poddisruptionbudgets", True),
    "ClusterRole": ("/apis/rbac.authorization.k8s.io/v1", "clusterroles", False),
    "ClusterRoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "clusterrolebindings", False),
    "Role": ("/apis/rbac.authorization.k8s.io/v1", "roles", True),
    "RoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "rolebindings", True),
    "CustomResourceDefinition": ("/apis/apiextensions.k8s.io/v1",
                                 "customresourcedefinitions", False),
    "LeaderWorkerSet": ("/apis/leaderworkerset.x-k8s.io/v1", "leaderworkersets", True),
    "ServiceMonitor": ("/apis/monitoring.coreos.com/v1", "servicemonitors", True),
    "PodMonitor": ("/apis/monitoring.coreos.com/v1", "podmonitors", True),
    "PrometheusRule": ("/apis/monitoring.coreos.com/v1", "prometheusrules", True),
    "HTTPRoute": ("/apis/gateway.networking.k8s.io/v1", "httproutes", True),
    "ValidatingAdmissionPolicy": ("/apis/admissionregistration.k8s.io/v1",
                                  "validatingadmissionpolicies", False),
    "ValidatingAdmissionPolicyBinding": ("/apis/admissionregistration.k8s.io/v1",
                                         "validatingadmissionpolicybindings", False),
}


def collection(kind: str, namespace: str = "") -> str:
    prefix, plural, namespaced = RESOURCES[kind]
    return f"{prefix}/namespaces/{namespace}/{plural}" if namespaced else f"{prefix}/{plural}"


async def create(kube: KubeClient, obj: dict[str, Any]) -> dict[str, Any]:
    """Create ``obj`` (strict field validation); one that exists already is left alone."""
    path = collection(obj["kind"], obj["metadata"].get("namespace", ""))
    return await kube.request("POST", path, body=obj, query={"fieldValidation": "Strict"},
                              ok_statuses=frozenset({409}))


def chart_objects() -> list[dict[str, Any]]:
    """The chart rendered (``deploy/manifests``), as ``kubectl apply`` would take it."""
    if not MANIFESTS.exists():
        raise FileNotFoundError(
            f"{MANIFESTS} not found: `gpu-supervisor simulate` runs from a clone of the "
            "repository (it deploys the chart's manifests and builds the control plane)")
    return [d for d in yaml.safe_load_all(MANIFESTS.read_text()) if d]


def chart_settings(objects: list[dict[str, Any]], component: str) -> dict[str, Any]:
    """The daemon config the chart writes for ``component`` (agent or controller)."""
    for obj in objects:
        if obj["kind"] == "ConfigMap" and obj["metadata"]["name"] == f"gpu-supervisor-{component}":
            loaded: dict[str, Any] = yaml.safe_load(obj["data"][f"{component}.yaml"])
            return loaded
    raise LookupError(f"the chart has no {component} ConfigMap")


def gpu_node(name: str, gpus: int) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": {
        "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
        "nvidia.com/gpu.present": "true", "nvidia.com/gpu.count": str(gpus),
        "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}},
        "status": {"capacity": {"cpu": "208", "memory": "1922112068Ki", "pods": "110",
                                "nvidia.com/gpu": str(gpus)}}}


def system_node(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": {
        "kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}},
        "status": {"capacity": {"cpu": "16", "memory": "64Gi", "pods": "110"}}}


@dataclass(frozen=True, slots=True)
class GroupRef:
    """One pipeline group of a model: its key as the controller knows it, and labels."""

    model: Model
    index: int
    kind_label: dict[str, str]  # for non-LWS kinds: the topology kind's selector + group label

    @property
    def name(self) -> str:
        return f"{self.model.name}-{self.index}"

    @property
    def key(self) -> str:
        owner = self.model.name if self.model.kind == "lws" else self.model.kind
        return f"{SERVING}/{owner}/{self.index if self.model.kind == 'lws' else self.name}"

    def pod_name(self, rank: int) -> str:
        return self.name if rank == 0 else f"{self.name}-{rank}"


def groups_of(scenario: Scenario) -> list[GroupRef]:
    kinds = {k["name"]: k for k in scenario.topology.get("group_kinds", [])}
    out: list[GroupRef] = []
    for model in scenario.models:
        for index in range(model.replicas):
            labels: dict[str, str] = {}
            if model.kind != "lws":
                kind = kinds[model.kind]
                for term in str(kind.get("selector", "")).split(","):
                    key, _, value = term.partition("=")
                    if key.strip():
                        labels[key.strip()] = value.strip()
                labels[str(kind["group_label"])] = f"{model.name}-{index}"
            out.append(GroupRef(model, index, labels))
    return out


def member_pod(group: GroupRef, rank: int, gpus: int, leader_uid: str | None,
               supervised: bool = True) -> dict[str, Any]:
    """One member's pod as LWS (or the group kind's operator) creates it: the group's
    labels, our readiness gate, the GPUs of one node, anti-affinity spreading the group's
    pods over nodes; workers owned by the leader pod, as LWS's worker StatefulSet is.
    Unsupervised (today's stack, measured beside us): the pod of the upstream LWS + vLLM
    example — the engine alone, no sidecar, no readiness gate, the leader ready by a TCP
    probe of the engine's port (initialDelaySeconds 15, periodSeconds 10, the default
    failureThreshold 3) and no liveness probe."""
    labels = {MODEL_LABEL: group.model.name, GROUP_LABEL: group.name,
              "app.kubernetes.io/name": group.model.name}
    if group.model.kind == "lws":
        labels |= {LWS_NAME: group.model.name, LWS_GROUP: str(group.index),
                   LWS_WORKER: str(rank)}
    else:
        labels |= group.kind_label
    labels["sim.gpu-supervisor.io/rank"] = str(rank)
    meta: dict[str, Any] = {"name": group.pod_name(rank), "namespace": SERVING,
                            "labels": labels}
    if leader_uid is not None:
        meta["ownerReferences"] = [{"apiVersion": "v1", "kind": "Pod", "name": group.name,
                                    "uid": leader_uid, "blockOwnerDeletion": True}]
    # Probes as deploy/examples has them; the simulator's runtime runs them (see fleet.py).
    # The leader's engine serves the API; a worker's runs its rank with no port of its own.
    engine: dict[str, Any] = {"name": "engine", "image": "vllm/vllm-openai:v0.11.0",
                              "resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}
    if rank == 0 and not supervised:
        engine |= {"ports": [{"name": "http", "containerPort": 8000}],
                   "readinessProbe": {"tcpSocket": {"port": 8000}, "initialDelaySeconds": 15,
                                      "periodSeconds": 10}}
    elif rank == 0:
        engine |= {"ports": [{"name": "http", "containerPort": 8000}],
                   "readinessProbe": {"httpGet": {"path": "/health", "port": 8000},
                                      "periodSeconds": 5}}
    if not supervised:
        return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": {
            "serviceAccountName": "default", "containers": [engine],
            "terminationGracePeriodSeconds": 0, "affinity": _spread(group)}}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": {
        "serviceAccountName": "default",
        "containers": [
            engine,
            {"name": "gpu-supervisor", "image": "gpu-supervisor:0.1.0",
             "ports": [{"name": "sup-http", "containerPort": 8087}],
             "readinessProbe": {"httpGet": {"path": "/readyz", "port": "sup-http"},
                                "periodSeconds": 2, "failureThreshold": 1}}],
        "readinessGates": [{"conditionType": READINESS_GATE}],
        "terminationGracePeriodSeconds": 0, "affinity": _spread(group)}}


def _spread(group: GroupRef) -> dict[str, Any]:
    """One node per member of a group."""
    return {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"labelSelector": {"matchLabels": {GROUP_LABEL: group.name}},
         "topologyKey": "kubernetes.io/hostname"}]}}


FALLBACK_LABEL = "sim.gpu-supervisor.io/fallback"


def front_name(model: str) -> str:
    """The Service clients use for ``model`` when it has a fallback: the controller moves
    its selector to the fallback's pods while degraded."""
    return f"{model}-front"


def primary_selector(model: str) -> dict[str, str]:
    return {MODEL_LABEL: model, "sim.gpu-supervisor.io/rank": "0"}


def fallback_selector(fallback: str) -> dict[str, str]:
    return {MODEL_LABEL: fallback}


def front_service(fallback: Fallback) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": front_name(fallback.for_model), "namespace": SERVING},
            "spec": {"selector": primary_selector(fallback.for_model),
                     "ports": [{"name": "http", "port": 8000, "targetPort": 8000}]}}


def fallback_deployment(fallback: Fallback, gpus: int) -> dict[str, Any]:
    """The fallback model's Deployment, at 0 replicas until the controller degrades to it;
    one engine per pod, a node's GPUs each."""
    labels = {MODEL_LABEL: fallback.name, FALLBACK_LABEL: fallback.name}
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": fallback.name, "namespace": SERVING},
            "spec": {"replicas": 0, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels}, "spec": {
                         "serviceAccountName": "default",
                         "terminationGracePeriodSeconds": 0,
                         "containers": [{"name": "engine", "image": "vllm/vllm-openai:v0.11.0",
                                         "resources": {"limits": {
                                             "nvidia.com/gpu": str(gpus)}}}]}}}}


def fallback_service(fallback: Fallback) -> dict[str, Any]:
    """The fallback model's own Service: an HTTPRoute's second backend."""
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": fallback.name, "namespace": SERVING},
            "spec": {"selector": fallback_selector(fallback.name),
                     "ports": [{"name": "http", "port": 8000, "targetPort": 8000}]}}


def http_route(fallback: Fallback) -> dict[str, Any]:
    """The HTTPRoute clients use for ``fallback.for_model``: all weight on the model's
    Service, none on the fallback's, until the controller moves it. Its Gateway need not
    exist: nothing here plays a gateway, the weights are what is judged."""
    return {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": front_name(fallback.for_model), "namespace": SERVING},
            "spec": {"parentRefs": [{"name": "inference"}],
                     "rules": [{"backendRefs": [
                         {"name": fallback.for_model, "port": 8000, "weight": 100},
                         {"name": fallback.name, "port": 8000, "weight": 0}]}]}}


def degrade_topology(fallback: Fallback) -> dict[str, Any]:
    """The controller's topology entry for degrading ``fallback.for_model``."""
    def text(selector: dict[str, str]) -> str:
        return ",".join(f"{k}={v}" for k, v in selector.items())

    traffic = {"kind": "Service", "namespace": SERVING, "name": front_name(fallback.for_model),
               "primary": text(primary_selector(fallback.for_model)),
               "fallback": text(fallback_selector(fallback.name))}
    if fallback.traffic == "httproute":
        traffic = {"kind": "HTTPRoute", "namespace": SERVING,
                   "name": front_name(fallback.for_model), "primary": fallback.for_model,
                   "fallback": fallback.name}
    return {"model": fallback.for_model,
            "workload": {"kind": "Deployment", "namespace": SERVING, "name": fallback.name,
                         "replicas": fallback.replicas},
            # Restore gives traffic back over 10 s here (30 s by default) so a scenario
            # sees the whole cycle within its few minutes.
            "traffic": traffic, "ready_timeout_seconds": 120, "drain_seconds": 10}


def model_service(model: Model) -> dict[str, Any]:
    """The model's Service: its groups' leaders (rank 0), where requests enter a pipeline."""
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": model.name, "namespace": SERVING},
            "spec": {"selector": primary_selector(model.name),
                     "ports": [{"name": "http", "port": 8000, "targetPort": 8000}]}}


def lws_object(model: Model) -> dict[str, Any]:
    return {"apiVersion": "leaderworkerset.x-k8s.io/v1", "kind": "LeaderWorkerSet",
            "metadata": {"name": model.name, "namespace": SERVING,
                         "labels": {MODEL_LABEL: model.name}},
            "spec": {"replicas": model.replicas, "startupPolicy": "LeaderCreated",
                     "leaderWorkerTemplate": {
                         "size": model.size, "restartPolicy": "RecreateGroupOnPodRestart",
                         "workerTemplate": {"spec": {"containers": [
                             {"name": "engine", "image": "vllm/vllm-openai:v0.11.0"}]}}}}}


async def token_for_pod(kube: KubeClient, namespace: str, service_account: str,
                        pod: dict[str, Any], audiences: list[str]) -> str:
    """A ServiceAccount token bound to ``pod`` (what the kubelet projects into it)."""
    body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {
        "audiences": audiences, "expirationSeconds": 86400,
        "boundObjectRef": {"kind": "Pod", "apiVersion": "v1",
                           "name": pod["metadata"]["name"], "uid": pod["metadata"]["uid"]}}}
    result = await kube.request(
        "POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{service_account}/token",
        body=body)
    return str(result["status"]["token"])


class GroupKeeper:
    """Plays LeaderWorkerSet (or the group kind's operator): keeps every group whole.

    A group with a member missing — deleted by our controller's restart, or by anyone —
    is torn down and created again as a whole (RecreateGroupOnPodRestart), which is what
    re-forms an NCCL communicator."""

    def __init__(self, kube: KubeClient, groups: list[GroupRef], gpus: int,
                 supervised: bool = True) -> None:
        self._kube = kube
        self._groups = groups
        self._gpus = gpus
        self._supervised = supervised
        self.restarts: dict[str, int] = {g.name: 0 for g in groups}

    async def create(self, group: GroupRef) -> None:
        leader = await create(self._kube, member_pod(group, 0, self._gpus, None,
                                                     self._supervised))
        uid = leader.get("metadata", {}).get("uid")
        if uid is None:  # it existed already
            uid = (await self._kube.request(
                "GET", f"/api/v1/namespaces/{SERVING}/pods/{group.name}"))["metadata"]["uid"]
        for rank in range(1, group.model.size):
            await create(self._kube, member_pod(group, rank, self._gpus, uid,
                                                self._supervised))

    async def run(self) -> None:
        """Check every group twice a second (the real LWS reacts to watch events within
        about as long)."""
        while True:
            try:
                pods = await self._kube.request("GET", f"/api/v1/namespaces/{SERVING}/pods")
            except KubeError as exc:  # too slow for once: LWS's controller retries too
                log.warning("pods not listed", error=str(exc))
                await asyncio.sleep(0.5)
                continue
            members: dict[str, list[dict[str, Any]]] = {g.name: [] for g in self._groups}
            for pod in pods.get("items", []):
                name = pod["metadata"].get("labels", {}).get(GROUP_LABEL)
                if name in members:
                    members[name].append(pod)
            for group in self._groups:
                await self._keep(group, members[group.name])
            await asyncio.sleep(0.5)

    async def _keep(self, group: GroupRef, pods: list[dict[str, Any]]) -> None:
        live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
        if len(live) == group.model.size:
            return
        if live:  # a member went: tear the rest down (the leader first; GC takes workers)
            self.restarts[group.name] += 1
            for pod in sorted(live, key=lambda p: p["metadata"]["name"]):
                with contextlib.suppress(KubeError):
                    await self._kube.request(
                        "DELETE", f"/api/v1/namespaces/{SERVING}/pods/{pod['metadata']['name']}",
                        body={"propagationPolicy": "Background"},
                        ok_statuses=frozenset({404}))
            return
        if not pods:  # all gone: a new incarnation
            log.info("recreating group", group=group.name)
            with contextlib.suppress(KubeError):
                await self.create(group)
