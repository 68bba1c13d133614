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
    """The ClusterRole is exactly get nodes, patch nodes/status, create/patch events."""
    role = next(d for d in docs("agent-rbac.yaml") if d["kind"] == "ClusterRole")
    granted = {(r, v) for rule in role["rules"] for r in rule["resources"] for v in rule["verbs"]}
    assert granted == {("nodes", "get"), ("nodes/status", "patch"), ("events", "create"),
                       ("events", "patch")}
