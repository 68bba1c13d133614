"""The agent's Kubernetes outputs against a real kube-apiserver, as its own ServiceAccount.

NodeConditions must merge by type (never touching the kubelet's or NPD's), be published
healthy at start, flip with findings, come with NPD-style Events, survive clobbering, and
the agent's RBAC from deploy/ must allow exactly that and nothing more.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio import client

from simulator.controlplane.cluster import KubeTestCluster
from simulator.processes import AgentProcess
from supervisor.agent.conditions import CONDITION_TYPES, OUR_TYPES
from supervisor.agent.node_status import NodeConditionPublisher
from supervisor.findings import FaultClass, FindingBook, FindingKey, Severity, Subject, Verdict
from supervisor.kube import KubeClient
from supervisor.runtime.clock import SystemClock
from tests.kubeenv import manifests

pytestmark = pytest.mark.kube

FOREIGN = [
    {"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "kubelet is ready"},
    {"type": "KernelDeadlock", "status": "False", "reason": "KernelHasNoDeadlock",
     "message": "kernel has no deadlock"},
]


async def make_node(api: client.ApiClient) -> str:
    name = f"gpu-node-{uuid.uuid4().hex[:6]}"
    core = client.CoreV1Api(api)
    await core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name=name)))
    await core.patch_node_status(name, {"status": {"conditions": FOREIGN}})
    return name


@pytest.fixture(name="admin")
async def _admin(kube_cluster: KubeTestCluster) -> AsyncIterator[client.ApiClient]:
    async with await kube_cluster.api_client() as api:
        await manifests.install_rbac(api, manifests.NAMESPACE, "agent")
        yield api


@pytest.fixture(name="agent_kubeconfig")
async def _agent_kubeconfig(kube_cluster: KubeTestCluster, admin: client.ApiClient,
                            tmp_path: Path) -> Path:
    token = await kube_cluster.service_account_token("gpu-supervisor", "gpu-supervisor-agent")
    return kube_cluster.write_kubeconfig(tmp_path / "agent.kubeconfig", token)


async def conditions(admin: client.ApiClient, node: str) -> dict[str, dict[str, Any]]:
    raw = await client.CoreV1Api(admin).read_node(node)
    return {c.type: admin.sanitize_for_serialization(c) for c in raw.status.conditions or []}


async def node_events(admin: client.ApiClient, node: str) -> list[Any]:
    events = await client.CoreV1Api(admin).list_namespaced_event(
        "default", field_selector=f"involvedObject.name={node}")
    return list(events.items)


def xid_verdict(active: bool) -> Verdict:
    key = FindingKey(FaultClass.XID, "GPU-1", "79")
    if not active:
        return Verdict.clear(key)
    return Verdict(key=key, active=True, subject=Subject("gpu", "GPU-1", "n", 1),
                   severity=Severity.CRITICAL, reason="XidCriticalDetected",
                   message="GPU 1 (GPU-1): XID 79, GPU has fallen off the bus")


async def test_conditions_published_healthy_at_start_and_others_untouched(
        admin: client.ApiClient, agent_kubeconfig: Path) -> None:
    """First publish writes all our types False with healthy reasons; Ready and NPD's
    KernelDeadlock stay exactly as they were."""
    node = await make_node(admin)
    kube = await KubeClient.connect(str(agent_kubeconfig))
    try:
        book = FindingBook()
        pub = NodeConditionPublisher(kube, node, book.active, SystemClock(), resync=60)
        await pub.publish(full=True)
    finally:
        await kube.close()
    conds = await conditions(admin, node)
    for ctype in CONDITION_TYPES:
        assert conds[ctype.type]["status"] == "False"
        assert conds[ctype.type]["reason"] == ctype.healthy_reason
    for foreign in FOREIGN:
        got = conds[foreign["type"]]
        assert {k: got[k] for k in foreign} == foreign
    assert set(conds) == OUR_TYPES | {"Ready", "KernelDeadlock"}
    assert await node_events(admin, node) == []  # nothing flipped, nothing to tell


async def test_finding_flips_condition_with_event_and_back(
        admin: client.ApiClient, agent_kubeconfig: Path) -> None:
    """A critical XID sets GPUXidError True with a Warning Event; clearing sets it False
    with a Normal Event; lastTransitionTime moves only on flips."""
    node = await make_node(admin)
    kube = await KubeClient.connect(str(agent_kubeconfig))
    try:
        book = FindingBook()
        pub = NodeConditionPublisher(kube, node, book.active, SystemClock(), resync=60)
        await pub.publish(full=True)
        healthy_since = (await conditions(admin, node))["GPUXidError"]["lastTransitionTime"]
        await asyncio.sleep(1.1)  # RFC 3339 timestamps have second resolution
        book.apply([xid_verdict(True)], time.time())
        await pub.publish(full=False)
        cond = (await conditions(admin, node))["GPUXidError"]
        assert (cond["status"], cond["reason"]) == ("True", "XidCriticalDetected")
        assert cond["message"].startswith("GPU 1 ") and cond["message"].count("GPU 1") == 1
        assert cond["lastTransitionTime"] != healthy_since
        assert (await conditions(admin, node))["GPUMemoryError"]["status"] == "False"
        (event,) = await node_events(admin, node)
        assert (event.type, event.reason) == ("Warning", "XidCriticalDetected")
        assert event.involved_object.kind == "Node"
        assert event.source.component == "gpu-supervisor-agent"
        assert event.message.startswith("Node condition GPUXidError is now: True")
        book.apply([xid_verdict(False)], time.time())
        await pub.publish(full=False)
        cond = (await conditions(admin, node))["GPUXidError"]
        assert (cond["status"], cond["reason"]) == ("False", "GPUHasNoXidError")
        types = sorted((e.type, e.reason) for e in await node_events(admin, node))
        assert types == [("Normal", "GPUHasNoXidError"), ("Warning", "XidCriticalDetected")]
    finally:
        await kube.close()


async def test_resync_repairs_clobbered_condition(admin: client.ApiClient,
                                                  agent_kubeconfig: Path) -> None:
    """If someone overwrites our condition, the next full resync puts ours back."""
    node = await make_node(admin)
    kube = await KubeClient.connect(str(agent_kubeconfig))
    try:
        pub = NodeConditionPublisher(kube, node, FindingBook().active, SystemClock(), 60)
        await pub.publish(full=True)
        await client.CoreV1Api(admin).patch_node_status(node, {"status": {"conditions": [
            {"type": "GPULost", "status": "True", "reason": "Vandalism", "message": "x"}]}})
        await pub.publish(full=True)
    finally:
        await kube.close()
    cond = (await conditions(admin, node))["GPULost"]
    assert (cond["status"], cond["reason"]) == ("False", "AllGPUsPresent")


async def test_agent_process_publishes_xid_condition_to_apiserver(
        admin: client.ApiClient, agent_kubeconfig: Path, tmp_path: Path) -> None:
    """End to end: XID 79 injected into the stand-in → GPUXidError True on the real Node,
    written by the agent process with its own ServiceAccount token."""
    node = await make_node(admin)
    agent = AgentProcess(tmp_path, gpus=4, node_name=node, settings={"kubernetes": {
        "enabled": "true", "kubeconfig": str(agent_kubeconfig),
        "condition_resync_seconds": 30.0}})
    await asyncio.to_thread(agent.start)
    try:
        assert agent.status()["kubernetes"]["writes"] >= 1
        assert (await conditions(admin, node))["GPUXidError"]["status"] == "False"
        agent.control.inject_xid(2, 79)
        deadline = time.monotonic() + 15
        while (cond := (await conditions(admin, node))["GPUXidError"])["status"] != "True":
            assert time.monotonic() < deadline, agent.log()[-3000:]
            await asyncio.sleep(0.1)
        assert cond["reason"] == "XidCriticalDetected"
        assert cond["message"].startswith("GPU 2: ")
        # The Event is recorded after the condition patch lands, so it may trail it.
        while ("Warning", "XidCriticalDetected") not in (
                events := [(e.type, e.reason) for e in await node_events(admin, node)]):
            assert time.monotonic() < deadline, (events, agent.log()[-3000:])
            await asyncio.sleep(0.1)
    finally:
        assert await asyncio.to_thread(agent.stop) == 0


async def label_gpus(admin: client.ApiClient, node: str, capacity: int,
                     labels: dict[str, str]) -> None:
    """The Node as the device plugin and GPU feature discovery leave it."""
    core = client.CoreV1Api(admin)
    await core.patch_node(node, {"metadata": {"labels": labels}})
    await core.patch_node_status(node, {"status": {
        "capacity": {"nvidia.com/gpu": str(capacity)},
        "allocatable": {"nvidia.com/gpu": str(capacity)}}})


async def test_driver_down_and_missing_gpu_reach_the_node(
        admin: client.ApiClient, agent_kubeconfig: Path, tmp_path: Path) -> None:
    """With the driver down the agent still publishes: GPUDriverProblem True on the Node.
    Once NVML answers with 7 GPUs on a Node GPU feature discovery labels with 8, GPUMissing
    is True ("7 of 8 GPUs visible", expected from the label)."""
    node = await make_node(admin)
    await label_gpus(admin, node, 8, {"nvidia.com/gpu.count": "8",
                                      "nvidia.com/gpu.replicas": "1",
                                      "nvidia.com/gpu.sharing-strategy": "none",
                                      "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"})
    agent = AgentProcess(tmp_path, gpus=7, node_name=node, settings={
        "nvml": {"init_retry_max_seconds": 1.0},
        "kubernetes": {"enabled": "true", "kubeconfig": str(agent_kubeconfig)}})
    agent.control.update({"init_error": 9})
    await asyncio.to_thread(agent.start)
    try:
        async def condition(ctype: str) -> dict[str, Any]:
            deadline = time.monotonic() + 15
            while (cond := (await conditions(admin, node)).get(ctype, {})).get(
                    "status") != "True":
                assert time.monotonic() < deadline, agent.log()[-3000:]
                await asyncio.sleep(0.1)
            return cond

        assert (await condition("GPUDriverProblem"))["reason"] == "NVMLUnavailable"
        agent.control.update({"init_error": 0})
        missing = await condition("GPUMissing")
        assert missing["message"].startswith("7 of 8 GPUs visible (expected from Node "
                                             "label nvidia.com/gpu.count)")
        assert (await conditions(admin, node))["GPUDriverProblem"]["status"] == "False"
    finally:
        assert await asyncio.to_thread(agent.stop) == 0


@pytest.mark.parametrize(("capacity", "labels", "expected"), [
    # Time-slicing, replicas 8 (the GPU Operator's labels; capacity counts the replicas).
    (32, {"nvidia.com/gpu.count": "4", "nvidia.com/gpu.replicas": "8",
          "nvidia.com/gpu.sharing-strategy": "time-slicing",
          "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3-SHARED"},
     {"count": 4, "from": "Node label nvidia.com/gpu.count, time-slicing x8"}),
    # MPS, replicas 4.
    (16, {"nvidia.com/gpu.count": "4", "nvidia.com/gpu.replicas": "4",
          "nvidia.com/gpu.sharing-strategy": "mps",
          "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3-SHARED"},
     {"count": 4, "from": "Node label nvidia.com/gpu.count, mps x4"}),
    # MIG single, seven 1g.10gb devices per GPU: capacity and gpu.count both count them.
    (28, {"nvidia.com/gpu.count": "28", "nvidia.com/mig.strategy": "single",
          "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3-MIG-1g.10gb",
          "nvidia.com/gpu.replicas": "1", "nvidia.com/gpu.sharing-strategy": "none"},
     None),
], ids=["time-sliced", "mps", "mig-single"])
async def test_shared_gpus_are_not_counted_as_missing(
        admin: client.ApiClient, agent_kubeconfig: Path, tmp_path: Path, capacity: int,
        labels: dict[str, str], expected: dict[str, Any] | None) -> None:
    """A node whose 4 GPUs are shared advertises more nvidia.com/gpu than it has GPUs: the
    agent expects the physical count from the labels (none under MIG single, where they
    count MIG devices), never the capacity — no gpu_missing, GPUMissing stays False."""
    node = await make_node(admin)
    await label_gpus(admin, node, capacity, labels)
    agent = AgentProcess(tmp_path, gpus=4, node_name=node, settings={"kubernetes": {
        "enabled": "true", "kubeconfig": str(agent_kubeconfig)}})
    await asyncio.to_thread(agent.start)
    try:
        agent.wait_for(lambda: agent.status()["kubernetes"]["writes"] >= 1, what="published")
        if expected is not None:
            agent.wait_for(lambda: agent.status()["driver"]["expected_gpus"] == expected,
                           what="the expected count from the labels")
        else:
            agent.wait_for(lambda: "no physical GPU count" in agent.log(),
                           what="the agent saying the Node states no physical count")
            assert agent.status()["driver"]["expected_gpus"] is None
        assert agent.findings("gpu_missing") == []
        assert (await conditions(admin, node))["GPUMissing"]["status"] == "False"
    finally:
        assert await asyncio.to_thread(agent.stop) == 0
