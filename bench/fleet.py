"""A GPU fleet on the test cluster as a controller meets it in production: Node objects of
the size a GPU node has (labels from the cloud, NFD and the GPU operator; a dozen
conditions; capacity with GPUs and RDMA; a cache of large images), LeaderWorkerSet pods with
a vLLM container as people write them, one agent pod per node, and a report token per node
bound to that node's agent pod — so the controller's TokenReviews, its cache and its
node-binding check all run as they do in a cluster.

Sizes were taken from GPU nodes as ``kubectl get node -o json`` shows them (about 20 KB);
the point is what the controller's watches and caches carry, not any vendor's exact labels.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from kubernetes_asyncio import client

from simulator.controlplane.cluster import REPORT_AUDIENCE
from supervisor.controller.model import LWS_GROUP, LWS_NAME, LWS_WORKER, READINESS_GATE

SERVING = "serving"
GPUS_PER_NODE = 8
_STAMP = "2026-11-30T08:00:00Z"


async def bounded(n: int, coros: list[Any]) -> list[Any]:
    sem = asyncio.Semaphore(n)

    async def one(c: Any) -> Any:
        async with sem:
            return await c

    return list(await asyncio.gather(*(one(c) for c in coros)))


def node_object(name: str, index: int) -> dict[str, Any]:
    zone = f"us-central1-{'abc'[index % 3]}"
    labels = {
        "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64", "beta.kubernetes.io/os": "linux",
        "beta.kubernetes.io/arch": "amd64", "node.kubernetes.io/instance-type": "a3-highgpu-8g",
        "beta.kubernetes.io/instance-type": "a3-highgpu-8g",
        "topology.kubernetes.io/region": "us-central1", "topology.kubernetes.io/zone": zone,
        "failure-domain.beta.kubernetes.io/region": "us-central1",
        "failure-domain.beta.kubernetes.io/zone": zone,
        "cloud.google.com/gke-nodepool": f"h100-pool-{index // 256}",
        "cloud.google.com/gke-accelerator": "nvidia-h100-80gb",
        "cloud.google.com/gke-gpu-driver-version": "latest",
        "cloud.google.com/machine-family": "a3", "cloud.google.com/gke-os-distribution": "cos",
        "cloud.google.com/gke-boot-disk": "pd-ssd", "cloud.google.com/gke-container-runtime":
        "containerd", "cloud.google.com/gke-placement-group": f"pg-{index // 64}",
        "nvidia.com/gpu.present": "true", "nvidia.com/gpu.count": str(GPUS_PER_NODE),
        "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "nvidia.com/gpu.memory": "81559",
        "nvidia.com/gpu.family": "hopper", "nvidia.com/gpu.machine": "a3-highgpu-8g",
        "nvidia.com/gpu.compute.major": "9", "nvidia.com/gpu.compute.minor": "0",
        "nvidia.com/cuda.driver.major": "550", "nvidia.com/cuda.driver.minor": "54",
        "nvidia.com/cuda.driver.rev": "15", "nvidia.com/cuda.runtime.major": "12",
        "nvidia.com/cuda.runtime.minor": "4", "nvidia.com/mig.capable": "true",
        "nvidia.com/gfd.timestamp": "1764489600",
        "feature.node.kubernetes.io/pci-10de.present": "true",
        "feature.node.kubernetes.io/pci-15b3.present": "true",
        "feature.node.kubernetes.io/cpu-model.vendor_id": "Intel",
        "feature.node.kubernetes.io/kernel-version.full": "6.1.100-cos",
        "feature.node.kubernetes.io/system-os_release.ID": "cos",
    }
    annotations = {
        "node.alpha.kubernetes.io/ttl": "0",
        "volumes.kubernetes.io/controller-managed-attach-detach": "true",
        "csi.volume.kubernetes.io/nodeid": '{"pd.csi.storage.gke.io":"projects/p/zones/'
                                           f'{zone}/instances/{name}"}}',
        "container.googleapis.com/instance_id": str(7_000_000_000_000_000 + index),
        "nfd.node.kubernetes.io/feature-labels": ",".join(
            k.split("/", 1)[1] for k in labels if k.startswith("feature.node")),
        "nfd.node.kubernetes.io/extended-resources": "",
        "nvidia.com/gpu-driver-upgrade-enabled": "true",
        "node.gke.io/last-applied-node-labels": ",".join(sorted(labels)[:20]),
    }
    quantities = {"cpu": "208", "memory": "1922112068Ki", "ephemeral-storage": "6057592Ki",
                  "hugepages-1Gi": "0", "hugepages-2Mi": "0", "pods": "110",
                  "nvidia.com/gpu": str(GPUS_PER_NODE), "rdma/ib": "8"}
    condition_types = [
        ("FrequentUnregisterNetDevice", "False", "NoFrequentUnregisterNetDevice"),
        ("FrequentKubeletRestart", "False", "NoFrequentKubeletRestart"),
        ("FrequentDockerRestart", "False", "NoFrequentDockerRestart"),
        ("FrequentContainerdRestart", "False", "NoFrequentContainerdRestart"),
        ("KernelDeadlock", "False", "KernelHasNoDeadlock"),
        ("ReadonlyFilesystem", "False", "FilesystemIsNotReadOnly"),
        ("CorruptDockerOverlay2", "False", "NoCorruptDockerOverlay2"),
        ("NetworkUnavailable", "False", "RouteCreated"),
        ("MemoryPressure", "False", "KubeletHasSufficientMemory"),
        ("DiskPressure", "False", "KubeletHasNoDiskPressure"),
        ("PIDPressure", "False", "KubeletHasSufficientPID"),
        ("Ready", "True", "KubeletReady"),
    ]
    images = [{"names": [f"us-docker.pkg.dev/serving/images/model-{j}@sha256:{j:064x}",
                         f"us-docker.pkg.dev/serving/images/model-{j}:v{j}.0"],
               "sizeBytes": 9_000_000_000 + j * 13_000_000} for j in range(30)]
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": labels, "annotations": annotations},
        "spec": {"podCIDR": f"10.{index // 256}.{index % 256}.0/24",
                 "providerID": f"gce://p/{zone}/{name}",
                 "taints": [{"key": "nvidia.com/gpu", "value": "present",
                             "effect": "NoSchedule"}]},
        "status": {
            "capacity": quantities, "allocatable": quantities,
            "conditions": [{"type": t, "status": s, "reason": r,
                            "message": f"node {name}: {r}", "lastHeartbeatTime": _STAMP,
                            "lastTransitionTime": _STAMP} for t, s, r in condition_types],
            "addresses": [{"type": "InternalIP", "address": f"10.128.{index // 256}."
                                                             f"{index % 256}"},
                          {"type": "Hostname", "address": name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {"machineID": f"{index:032x}", "systemUUID": f"{index:032x}",
                         "bootID": f"{index:032x}", "kernelVersion": "6.1.100+",
                         "osImage": "Container-Optimized OS from Google",
                         "containerRuntimeVersion": "containerd://1.7.24",
                         "kubeletVersion": "v1.33.5-gke.1000",
                         "kubeProxyVersion": "v1.33.5-gke.1000", "operatingSystem": "linux",
                         "architecture": "amd64"},
            "images": images,
        },
    }


def serving_pod(name: str, node: str, group: int, worker: int) -> dict[str, Any]:
    env = [{"name": k, "value": v} for k, v in (
        ("NCCL_DEBUG", "WARN"), ("NCCL_SOCKET_IFNAME", "eth0"), ("NCCL_IB_HCA", "mlx5"),
        ("VLLM_HOST_IP", "0.0.0.0"), ("HF_HOME", "/models/cache"),
        ("VLLM_LOGGING_LEVEL", "INFO"), ("CUDA_DEVICE_ORDER", "PCI_BUS_ID"))]
    env += [{"name": "LWS_LEADER_ADDRESS", "value": f"llama-{group}.llama.{SERVING}"},
            {"name": "LWS_GROUP_SIZE", "value": "8"},
            {"name": "LWS_WORKER_INDEX", "value": str(worker)}]
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name, "namespace": SERVING,
            "labels": {LWS_NAME: "llama", LWS_GROUP: str(group), LWS_WORKER: str(worker),
                       "leaderworkerset.sigs.k8s.io/group-key": f"{group:040x}",
                       "leaderworkerset.sigs.k8s.io/template-revision-hash": "5d8f9c7b6",
                       "gpu-supervisor.io/model": "llama-70b",
                       "gpu-supervisor.io/sidecar": "true", "app": "llama"},
            "annotations": {"leaderworkerset.sigs.k8s.io/size": "8",
                            "leaderworkerset.sigs.k8s.io/leader-name": f"llama-{group}"}},
        "spec": {
            "nodeName": node, "automountServiceAccountToken": False,
            "subdomain": "llama", "hostname": name,
            "readinessGates": [{"conditionType": READINESS_GATE}],
            "containers": [{
                "name": "vllm", "image": "vllm/vllm-openai:v0.11.0",
                "command": ["sh", "-c"],
                "args": ["ray start --address=$(LWS_LEADER_ADDRESS):6379 --block"
                         if worker else "vllm serve meta-llama/Llama-3.1-405B-Instruct "
                         "--tensor-parallel-size 8 --pipeline-parallel-size 8"],
                "env": env,
                "ports": [{"containerPort": 8080, "name": "http"}],
                "resources": {"limits": {"nvidia.com/gpu": "8", "rdma/ib": "8"},
                              "requests": {"cpu": "180", "memory": "1600Gi"}},
                "volumeMounts": [{"name": "models", "mountPath": "/models"},
                                 {"name": "dshm", "mountPath": "/dev/shm"}]}],
            "volumes": [{"name": "models", "persistentVolumeClaim": {"claimName": "models"}},
                        {"name": "dshm", "emptyDir": {"medium": "Memory",
                                                      "sizeLimit": "64Gi"}}],
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                             "effect": "NoSchedule"}]},
    }


def agent_pod(name: str, node: str, namespace: str, service_account: str,
              labels: dict[str, str]) -> dict[str, Any]:
    """An agent pod as the chart's DaemonSet creates it (``labels``: its pod labels, which
    the controller's ``agent_pod_selector`` matches)."""
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"nodeName": node, "serviceAccountName": service_account,
                 "automountServiceAccountToken": False,
                 "containers": [{"name": "agent", "image": "gpu-supervisor:0.1.0",
                                 "args": ["agent"]}]},
    }


@dataclass
class Fleet:
    nodes: list[str]
    group_size: int
    tokens: dict[str, str] = field(default_factory=dict)  # node → its agent's report token
    agent_pods: dict[str, tuple[str, str]] = field(default_factory=dict)  # node → name, uid
    pod_group: dict[str, int] = field(default_factory=dict)  # serving pod → group index

    def group_of(self, node: str) -> int:
        return int(node.rsplit("-", 1)[1]) // self.group_size  # gpu-node-<index>


async def raw(call: Any) -> Any:
    """The JSON an API call answered, read as plain dicts: building the client's model
    objects for 16,384 Nodes of ~20 KB would take longer than the API server's writes."""
    resp = await call
    try:
        return json.loads(await resp.read())
    finally:
        resp.release()


async def populate(api: client.ApiClient, n: int, group_size: int, namespace: str,
                   agent_sa: str, agent_labels: dict[str, str]) -> Fleet:
    """Nodes (status patched in, as the kubelet would), serving pods Ready with our gate
    True, an agent pod per node and its pod-bound report token."""
    core: Any = client.CoreV1Api(api)  # plain dict bodies; the stubs want model objects
    fleet = Fleet([f"gpu-node-{i:05d}" for i in range(n)], group_size)
    objects = [node_object(name, i) for i, name in enumerate(fleet.nodes)]
    await bounded(32, [raw(core.create_node(obj, _preload_content=False))
                       for obj in objects])
    await bounded(32, [raw(core.patch_node_status(obj["metadata"]["name"],
                                                  {"status": obj["status"]},
                                                  _preload_content=False))
                       for obj in objects])
    await core.create_namespace({"metadata": {"name": SERVING}})
    pods = []
    for i, node in enumerate(fleet.nodes):
        group, worker = divmod(i, group_size)
        name = f"llama-{group}" if worker == 0 else f"llama-{group}-{worker}"
        fleet.pod_group[name] = group
        pods.append(serving_pod(name, node, group, worker))
    await bounded(32, [raw(core.create_namespaced_pod(SERVING, body, _preload_content=False))
                       for body in pods])
    status = {"status": {"phase": "Running", "conditions": [
        {"type": "ContainersReady", "status": "True"}, {"type": "Ready", "status": "True"},
        {"type": READINESS_GATE, "status": "True"}]}}
    await bounded(32, [raw(core.patch_namespaced_pod_status(
        p["metadata"]["name"], SERVING, status, _preload_content=False)) for p in pods])
    agents = await bounded(32, [raw(core.create_namespaced_pod(
        namespace, agent_pod(f"agent-{i:05d}", node, namespace, agent_sa, agent_labels),
        _preload_content=False)) for i, node in enumerate(fleet.nodes)])

    fleet.agent_pods = {pod["spec"]["nodeName"]: (pod["metadata"]["name"],
                                                   pod["metadata"]["uid"])
                        for pod in agents}
    tokens = await bounded(32, [agent_token(api, namespace, agent_sa, *fleet.agent_pods[n])
                                for n in fleet.nodes])
    fleet.tokens = dict(zip(fleet.nodes, tokens, strict=True))
    return fleet


async def agent_token(api: client.ApiClient, namespace: str, agent_sa: str, pod: str,
                      uid: str) -> str:
    """A report token bound to an agent pod, as the kubelet projects it (each call a new
    one, as after a rotation)."""
    core: Any = client.CoreV1Api(api)
    body = {"spec": {"audiences": [REPORT_AUDIENCE], "expirationSeconds": 3600,
                     "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": pod,
                                        "uid": uid}}}
    resp = await core.create_namespaced_service_account_token(agent_sa, namespace, body)
    return str(resp.status.token)
