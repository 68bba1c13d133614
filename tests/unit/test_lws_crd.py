"""Our LeaderWorkerSet CRD (simulator/controlplane/crds/leaderworkerset.yaml) keeps the facts of
upstream's v1 schema that the controller and its tests rely on: the scale subresource's
paths, the restartPolicy and startupPolicy enums and defaults, the bounds and defaults of
replicas and size, and pod templates kept whole."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

CRD_PATH = (Path(__file__).parents[2] / "simulator" / "controlplane" / "crds"
            / "leaderworkerset.yaml")


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(CRD_PATH.read_text()) if d]
    assert len(docs) == 1
    doc: dict[str, Any] = docs[0]
    return doc


@pytest.fixture(scope="module")
def v1(crd: dict[str, Any]) -> dict[str, Any]:
    versions = crd["spec"]["versions"]
    assert [v["name"] for v in versions] == ["v1"]
    version: dict[str, Any] = versions[0]
    return version


@pytest.fixture(scope="module")
def spec(v1: dict[str, Any]) -> dict[str, Any]:
    props: dict[str, Any] = v1["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return props


@pytest.fixture(scope="module")
def template(spec: dict[str, Any]) -> dict[str, Any]:
    props: dict[str, Any] = spec["properties"]["leaderWorkerTemplate"]
    return props


def test_crd_is_the_namespaced_v1_leaderworkerset_served_and_stored(
        crd: dict[str, Any], v1: dict[str, Any]) -> None:
    assert crd["metadata"]["name"] == "leaderworkersets.leaderworkerset.x-k8s.io"
    assert crd["spec"]["scope"] == "Namespaced"
    names = crd["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == (
        "LeaderWorkerSet", "leaderworkersets", ["lws"])
    assert v1["served"] is True and v1["storage"] is True


def test_scale_subresource_reads_replicas_and_the_hpa_selector(v1: dict[str, Any]) -> None:
    assert v1["subresources"]["status"] == {}
    assert v1["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.hpaPodSelector",
    }


def test_restart_policy_enum_and_default_are_upstreams(template: dict[str, Any]) -> None:
    policy = template["properties"]["restartPolicy"]
    assert policy["enum"] == ["Default", "RecreateGroupOnPodRestart",
                              "RecreateGroupAfterStart", "None"]
    assert policy["default"] == "RecreateGroupOnPodRestart"


def test_startup_policy_enum_and_default_are_upstreams(spec: dict[str, Any]) -> None:
    policy = spec["properties"]["startupPolicy"]
    assert policy["enum"] == ["LeaderCreated", "LeaderReady"]
    assert policy["default"] == "LeaderCreated"


def test_size_defaults_to_one_with_no_schema_minimum(template: dict[str, Any]) -> None:
    """Upstream checks size >= 1 in its admission webhook, not in the schema."""
    size = template["properties"]["size"]
    assert (size["type"], size["format"], size["default"]) == ("integer", "int32", 1)
    assert "minimum" not in size


def test_replicas_default_to_one_within_zero_and_a_million(spec: dict[str, Any]) -> None:
    replicas = spec["properties"]["replicas"]
    assert (replicas["default"], replicas["minimum"], replicas["maximum"]) == (1, 0, 1000000)


def test_only_the_worker_template_is_required(
        spec: dict[str, Any], template: dict[str, Any]) -> None:
    assert spec["required"] == ["leaderWorkerTemplate"]
    assert template["required"] == ["workerTemplate"]


@pytest.mark.parametrize("name", ["leaderTemplate", "workerTemplate"])
def test_pod_templates_are_kept_whole(template: dict[str, Any], name: str) -> None:
    pod_template = template["properties"][name]
    assert pod_template == {"description": pod_template.get("description"),
                            "type": "object", "x-kubernetes-preserve-unknown-fields": True}


def test_rollout_strategy_defaults_to_a_rolling_update_of_one_unavailable(
        spec: dict[str, Any]) -> None:
    rollout = spec["properties"]["rolloutStrategy"]
    assert rollout["required"] == ["type"]
    assert rollout["properties"]["type"]["enum"] == ["RollingUpdate"]
    config = rollout["properties"]["rollingUpdateConfiguration"]["properties"]
    assert {k: v["default"] for k, v in config.items()} == {
        "partition": 0, "maxUnavailable": 1, "maxSurge": 0}
    assert config["maxUnavailable"]["x-kubernetes-int-or-string"] is True
    assert config["maxSurge"]["x-kubernetes-int-or-string"] is True


def test_status_has_upstreams_fields(v1: dict[str, Any]) -> None:
    status = v1["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    assert set(status) == {"conditions", "readyReplicas", "updatedReplicas", "replicas",
                           "hpaPodSelector", "observedGeneration"}
    assert status["conditions"]["x-kubernetes-list-map-keys"] == ["type"]
