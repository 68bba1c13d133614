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


def test_example_sidecar_knows_its_group_from_lws_environment() -> None:
    """The example LWS's sidecar containers, given the environment LWS and the downward API
    give them, identify the group as the controller keys it, and the leader's probes
    its engine while the workers' watch the group only."""
    from supervisor.config import load as load_settings
    from supervisor.sidecar.identity import identify

    lws = yaml.safe_load_all((DEPLOY.parent / "examples" / "lws-vllm-with-sidecar.yaml")
                             .read_text())
    lws_doc = next(d for d in lws if d["kind"] == "LeaderWorkerSet")
    tmpl = lws_doc["spec"]["leaderWorkerTemplate"]
    for role, template, rank in (("leader", tmpl["leaderTemplate"], 0),
                                 ("worker", tmpl["workerTemplate"], 1)):
        (sidecar,) = template["spec"]["initContainers"]
        assert sidecar["restartPolicy"] == "Always", role  # a native sidecar
        assert sidecar["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert template["spec"]["readinessGates"] == [
            {"conditionType": "gpu-supervisor.io/serving"}]
        env = {e["name"]: e.get("value", "from-downward-api") for e in sidecar["env"]}
        env.update({"POD_NAME": f"llama-0{'' if rank == 0 else f'-{rank}'}",
                    "POD_NAMESPACE": "serving", "NODE_NAME": "gpu-1",
                    "LWS_LEADER_ADDRESS": "llama-0.llama.serving", "LWS_GROUP_SIZE": "2",
                    "LWS_WORKER_INDEX": str(rank)})
        settings = load_settings(None, env)
        ident = identify(settings, env)
        assert (ident.group, ident.rank, ident.size) == ("serving/llama/0", rank, 2)
        assert ident.peers[1][0] == "llama-0-1.llama.serving"
        assert settings.engine.enabled is (role == "leader")
