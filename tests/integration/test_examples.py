"""The shipped examples are objects the real API server accepts (with the LWS CRD)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from kubernetes_asyncio import client

from tests.kubeenv.cluster import KubeTestCluster

pytestmark = pytest.mark.kube

EXAMPLES = Path(__file__).parents[2] / "deploy" / "examples"


async def test_lws_vllm_example_is_accepted_by_the_api_server(
        kube_cluster: KubeTestCluster) -> None:
    """Server-side dry run of every object in the LWS + vLLM + sidecar example."""
    docs = [d for d in yaml.safe_load_all(
        (EXAMPLES / "lws-vllm-with-sidecar.yaml").read_text()) if d]
    await kube_cluster.ensure_namespace("serving")
    async with await kube_cluster.api_client() as api:
        for doc in docs:
            if doc["kind"] == "LeaderWorkerSet":
                await client.CustomObjectsApi(api).create_namespaced_custom_object(
                    "leaderworkerset.x-k8s.io", "v1", "serving", "leaderworkersets", doc,
                    dry_run="All")
            else:
                await client.CoreV1Api(api).create_namespaced_service("serving", doc,
                                                                      dry_run="All")
