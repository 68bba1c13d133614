"""Smoke test of the real etcd + kube-apiserver test cluster (simulator/controlplane/cluster.py).

Self-contained: its own module-scoped cluster, stopped and checked for leftover
processes at the end.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from simulator.controlplane.cluster import KubeTestCluster, KubeTestClusterError

pytestmark = pytest.mark.kube

NS = "smoke"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeTestCluster]:
    workdir = tmp_path_factory.mktemp("kubeenv")
    c = KubeTestCluster.start(workdir)
    print(f"\nkube test cluster ready in {c.startup_seconds:.2f} s at {c.url}")
    try:
        yield c
    finally:
        pids = c.pids
        t0 = time.monotonic()
        c.stop()
        print(f"kube test cluster stopped in {time.monotonic() - t0:.2f} s")
        c.stop()  # idempotent
        assert not [p for p in pids if _alive(p)], "a server process outlived stop()"
        left = subprocess.run(
            ["pgrep", "-f", str(workdir)], capture_output=True, text=True, check=False
        )
        assert left.stdout.strip() == "", f"processes left behind: {left.stdout}"


async def test_namespace_and_pending_pod(cluster: KubeTestCluster) -> None:
    async with await cluster.api_client() as api:
        core = client.CoreV1Api(api)
        await core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=NS)))
        pod = client.V1Pod(
            metadata=client.V1ObjectMeta(name="p0", labels={"app": "smoke"}),
            spec=client.V1PodSpec(
                containers=[client.V1Container(name="c", image="registry.invalid/none:1")]
            ),
        )
        await core.create_namespaced_pod(NS, pod)
        got = await core.read_namespaced_pod("p0", NS)
        assert got.status.phase == "Pending"
        assert got.spec.node_name is None
        # Real admission ran: DefaultTolerationSeconds added its tolerations.
        keys = {t.key for t in got.spec.tolerations or []}
        assert "node.kubernetes.io/not-ready" in keys
        listed = await core.list_namespaced_pod(NS, label_selector="app=smoke")
        assert [p.metadata.name for p in listed.items] == ["p0"]


async def test_node_status_conditions_patch(cluster: KubeTestCluster) -> None:
    async with await cluster.api_client() as api:
        core = client.CoreV1Api(api)
        await core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name="gpu-node-0")))
        patch = {
            "status": {
                "conditions": [
                    {
                        "type": "GPUHealthy",
                        "status": "False",
                        "reason": "XID79",
                        "message": "GPU fell off the bus",
                        "lastHeartbeatTime": "2025-01-01T00:00:00Z",
                        "lastTransitionTime": "2025-01-01T00:00:00Z",
                    }
                ]
            }
        }
        await core.patch_node_status("gpu-node-0", patch)
        node = await core.read_node_status("gpu-node-0")
        conds = {c.type: c for c in node.status.conditions}
        assert conds["GPUHealthy"].status == "False"
        assert conds["GPUHealthy"].reason == "XID79"


async def test_service_account_token_review_and_rbac(cluster: KubeTestCluster) -> None:
    token = await cluster.service_account_token(NS, "nobody")
    async with await cluster.api_client() as api:
        review = await client.AuthenticationV1Api(api).create_token_review(
            client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token))
        )
    assert review.status.authenticated is True
    assert review.status.user.username == f"system:serviceaccount:{NS}:nobody"
    assert cluster.audience in review.status.audiences

    async with await cluster.api_client(token) as sa_api:
        with pytest.raises(ApiException) as exc:
            await client.CoreV1Api(sa_api).list_namespaced_pod(NS)
        assert exc.value.status == 403
        with pytest.raises(ApiException) as exc:
            await client.CoreV1Api(sa_api).delete_namespaced_pod("p0", NS)
        assert exc.value.status == 403

    # A bad token is rejected with 401.
    async with await cluster.api_client("not-a-token") as bad:
        with pytest.raises(ApiException) as exc:
            await client.CoreV1Api(bad).list_namespace()
        assert exc.value.status == 401


async def test_rbac_grant_takes_effect(cluster: KubeTestCluster) -> None:
    async with await cluster.api_client() as api:
        rbac = client.RbacAuthorizationV1Api(api)
        await rbac.create_namespaced_role(
            NS,
            client.V1Role(
                metadata=client.V1ObjectMeta(name="pod-reader"),
                rules=[
                    client.V1PolicyRule(api_groups=[""], resources=["pods"], verbs=["get", "list"])
                ],
            ),
        )
        await rbac.create_namespaced_role_binding(
            NS,
            client.V1RoleBinding(
                metadata=client.V1ObjectMeta(name="reader"),
                role_ref=client.V1RoleRef(
                    api_group="rbac.authorization.k8s.io", kind="Role", name="pod-reader"
                ),
                subjects=[client.RbacV1Subject(kind="ServiceAccount", name="reader", namespace=NS)],
            ),
        )
    async with await cluster.service_account_client(NS, "reader") as sa_api:
        core = client.CoreV1Api(sa_api)
        pods = await core.list_namespaced_pod(NS)
        assert [p.metadata.name for p in pods.items] == ["p0"]
        with pytest.raises(ApiException) as exc:
            await core.delete_namespaced_pod("p0", NS)
        assert exc.value.status == 403


async def test_crds_lws_and_httproute(cluster: KubeTestCluster) -> None:
    await cluster.install_crds()
    await cluster.install_crds()  # idempotent
    lws: dict[str, Any] = {
        "apiVersion": "leaderworkerset.x-k8s.io/v1",
        "kind": "LeaderWorkerSet",
        "metadata": {"name": "llm"},
        "spec": {
            "replicas": 2,
            "leaderWorkerTemplate": {
                "size": 4,
                "restartPolicy": "RecreateGroupOnPodRestart",
                "leaderTemplate": {
                    "metadata": {"labels": {"role": "leader"}},
                    "spec": {"containers": [{"name": "vllm", "image": "vllm:x"}]},
                },
                "workerTemplate": {
                    "spec": {
                        "containers": [
                            {
                                "name": "vllm",
                                "image": "vllm:x",
                                "resources": {"limits": {"nvidia.com/gpu": "8"}},
                            }
                        ]
                    }
                },
            },
        },
    }
    async with await cluster.api_client() as api:
        co = client.CustomObjectsApi(api)
        await co.create_namespaced_custom_object(
            "leaderworkerset.x-k8s.io", "v1", NS, "leaderworkersets", lws
        )
        got = await co.get_namespaced_custom_object(
            "leaderworkerset.x-k8s.io", "v1", NS, "leaderworkersets", "llm"
        )
        tmpl = got["spec"]["leaderWorkerTemplate"]
        assert tmpl["size"] == 4
        limits = tmpl["workerTemplate"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits == {"nvidia.com/gpu": "8"}
        # status subresource, then the scale subresource reads .status.replicas.
        # (kubernetes_asyncio sends custom-object patches as JSON Patch unless told.)
        await co.patch_namespaced_custom_object_status(
            "leaderworkerset.x-k8s.io",
            "v1",
            NS,
            "leaderworkersets",
            "llm",
            {"status": {"replicas": 2, "readyReplicas": 1}},
            _content_type="application/merge-patch+json",
        )
        await co.patch_namespaced_custom_object_scale(
            "leaderworkerset.x-k8s.io",
            "v1",
            NS,
            "leaderworkersets",
            "llm",
            {"spec": {"replicas": 3}},
            _content_type="application/merge-patch+json",
        )
        scale = await co.get_namespaced_custom_object_scale(
            "leaderworkerset.x-k8s.io", "v1", NS, "leaderworkersets", "llm"
        )
        assert scale["spec"]["replicas"] == 3
        assert scale["status"]["replicas"] == 2
        # Schema validation is real: replicas must be >= 0. (Upstream's schema has no
        # minimum for size; LWS's webhook checks size >= 1, and no webhook runs here.)
        bad = {**lws, "metadata": {"name": "bad"}}
        bad["spec"] = {**lws["spec"], "replicas": -1}
        with pytest.raises(ApiException) as exc:
            await co.create_namespaced_custom_object(
                "leaderworkerset.x-k8s.io", "v1", NS, "leaderworkersets", bad
            )
        assert exc.value.status == 422

        route = {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": {"name": "llm"},
            "spec": {
                "parentRefs": [{"name": "gw"}],
                "rules": [
                    {
                        "matches": [{"path": {"type": "PathPrefix", "value": "/v1"}}],
                        "backendRefs": [
                            {"name": "primary", "port": 8000, "weight": 100},
                            {"name": "fallback", "port": 8000},
                        ],
                    }
                ],
            },
        }
        await co.create_namespaced_custom_object(
            "gateway.networking.k8s.io", "v1", NS, "httproutes", route
        )
        got = await co.get_namespaced_custom_object(
            "gateway.networking.k8s.io", "v1", NS, "httproutes", "llm"
        )
        refs = got["spec"]["rules"][0]["backendRefs"]
        assert [r.get("weight") for r in refs] == [100, 1]  # weight defaults to 1
        assert got["spec"]["rules"][0]["matches"][0]["path"]["value"] == "/v1"


def test_kubeconfig_written(cluster: KubeTestCluster, tmp_path: Path) -> None:
    path = cluster.write_kubeconfig(tmp_path / "kubeconfig", cluster.admin_token)
    text = path.read_text()
    assert cluster.url in text
    assert str(cluster.ca_file) in text


def test_start_failure_is_reported(tmp_path: Path) -> None:
    with pytest.raises(KubeTestClusterError, match="certs failed"):
        KubeTestCluster.start(tmp_path, binary=Path("/bin/false"))
