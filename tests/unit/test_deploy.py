"""The shipped manifests keep the promises the README makes about them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from supervisor.config import load

DEPLOY = Path(__file__).parents[2] / "deploy" / "manifests"


def docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


def test_agent_daemonset_is_locked_down_and_probed() -> None:
    """Non-root, read-only root filesystem, no capabilities, node-critical, GPU toleration,
    liveness on /livez and readiness on /readyz, NODE_NAME from the downward API."""
    (ds,) = docs("agent-daemonset.yaml")
    pod = ds["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["priorityClassName"] == "system-node-critical"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in \
        pod["tolerations"]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    env = {e["name"]: e for e in container["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert pod["serviceAccountName"] == "gpu-supervisor-agent"


def test_agent_configmap_is_a_valid_config(tmp_path: Path) -> None:
    """The ConfigMap's agent.yaml passes the same validation the daemon runs at start."""
    (cm,) = docs("agent-config.yaml")
    path = tmp_path / "agent.yaml"
    path.write_text(cm["data"]["agent.yaml"])
    settings = load(path, {"NODE_NAME": "n"})
    assert settings.kubernetes.enabled == "true"


def test_agent_role_grants_only_what_the_agent_calls() -> None:
    """The ClusterRole is exactly get nodes, patch nodes/status, create events."""
    role = next(d for d in docs("agent-rbac.yaml") if d["kind"] == "ClusterRole")
    granted = {(r, v) for rule in role["rules"] for r in rule["resources"] for v in rule["verbs"]}
    assert granted == {("nodes", "get"), ("nodes/status", "patch"), ("events", "create")}


def test_agent_reports_over_tls_with_an_audience_bound_token(tmp_path: Path) -> None:
    """The agent's config reports to the controller's TLS port with the projected token of
    audience gpu-supervisor, and the DaemonSet mounts that token and the report CA where
    the config expects them."""
    (cm,) = docs("agent-config.yaml")
    path = tmp_path / "agent.yaml"
    path.write_text(cm["data"]["agent.yaml"])
    settings = load(path, {"NODE_NAME": "n"})
    assert settings.reporting.controller_url.startswith("https://")
    (ds,) = docs("agent-daemonset.yaml")
    pod = ds["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    (source,) = volumes["report-token"]["projected"]["sources"]
    assert source["serviceAccountToken"]["audience"] == "gpu-supervisor"
    assert settings.reporting.token_file == \
        f"{mounts['report-token']}/{source['serviceAccountToken']['path']}"
    assert settings.reporting.ca_file.startswith(mounts["report-ca"] + "/")


def test_controller_serves_reports_on_tls_from_its_secret(tmp_path: Path) -> None:
    """The controller's config points at the mounted TLS Secret and asks for our
    audience; its Service exposes the report port."""
    cm, deployment, service = docs("controller-deployment.yaml")
    path = tmp_path / "controller.yaml"
    path.write_text(cm["data"]["controller.yaml"])
    settings = load(path, {"NODE_NAME": "n"})
    pod = deployment["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert settings.controller.tls_cert_file == f"{mounts['report-tls']}/tls.crt"
    assert settings.controller.token_audiences == ["gpu-supervisor"]
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]}["reports"] == 8443
