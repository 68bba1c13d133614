"""The shipped LWS + vLLM example and its chart values are what the real API server
accepts and what the controller can act on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from policies.schema import load_policy
from simulator.controlplane.cluster import KubeTestCluster
from supervisor.controller.actions import _route_plan
from supervisor.controller.topology import parse_topology
from tests.kubeenv import manifests

EXAMPLES = Path(__file__).parents[2] / "deploy" / "examples"
OBJECTS = [d for d in yaml.safe_load_all(
    (EXAMPLES / "lws-vllm-with-sidecar.yaml").read_text()) if d]
VALUES = EXAMPLES / "values-llama.yaml"


def _one(kind: str, name: str) -> dict[str, Any]:
    (obj,) = [o for o in OBJECTS if o["kind"] == kind and o["metadata"]["name"] == name]
    return obj


@pytest.mark.kube
async def test_every_example_object_is_accepted_by_the_api_server(
        kube_cluster: KubeTestCluster) -> None:
    """Server-side dry run, strict field validation, of the LeaderWorkerSet, Services, the
    fallback Deployment and the HTTPRoute (LWS and Gateway API CRDs as upstream ships them)."""
    assert {o["kind"] for o in OBJECTS} == {"LeaderWorkerSet", "Service", "Deployment",
                                           "HTTPRoute"}
    await kube_cluster.ensure_namespace("serving")
    async with await kube_cluster.api_client() as api:
        await manifests.create(api, OBJECTS, dry_run=True)


def test_the_example_values_wire_degrade_to_the_example_objects() -> None:
    """The chart with values-llama.yaml: the policy degrades llama-70b to llama-8b, the
    topology points at the example's fallback Deployment and HTTPRoute, and that route is
    one the controller will shift (both backends in the rule) and restore."""
    rel = manifests.render(values_files=[VALUES])
    data = rel.one("ConfigMap", "controller", "-policy")["data"]
    policy = load_policy(data["policy.yaml"])
    assert policy.dry_run is True
    (rule,) = policy.degrade
    assert (rule.model, rule.fallback) == ("llama-70b", "llama-8b")
    target = parse_topology(yaml.safe_load(data["topology.yaml"])).degrade["llama-70b"]
    deployment = _one(target.workload.kind, target.workload.name)
    assert deployment["metadata"]["namespace"] == target.workload.namespace
    assert deployment["spec"]["replicas"] == 0  # scaled up only while degraded
    route = _one(target.traffic.kind, target.traffic.name)
    (step,) = _route_plan(route, target.traffic)
    assert step["before"] == {"primary": 100, "fallback": 0}
    assert step["after"] == {"primary": 0, "fallback": 100}
    for service in (target.traffic.primary, target.traffic.fallback):
        assert _one("Service", service)["metadata"]["namespace"] == "serving"


def test_the_example_values_let_the_sidecars_report_and_verify() -> None:
    """The sidecars' ServiceAccount is an allowed pod reporter, the report CA is copied into
    their namespace, and the controller may act only there."""
    rel = manifests.render(values_files=[VALUES])
    ctl = rel.config("controller")["controller"]
    assert "system:serviceaccount:serving:default" in ctl["allowed_pod_reporters"]
    assert [o for o in rel.of("ConfigMap") if o["metadata"].get("namespace") == "serving"]
    bound = {b["metadata"].get("namespace") for b in rel.of("RoleBinding")
             if b["metadata"]["name"].endswith("-act")}
    assert bound == {"serving"}
    assert not [b for b in rel.of("ClusterRoleBinding") if b["metadata"]["name"].endswith("-act")]
