"""The plain manifests (the Helm chart rendered with its defaults, see deploy/render.py)
keep the promises the README makes about a deployment: locked-down containers, GPU node
placement, probes, TLS and tokens where the configs expect them, and resources set."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from supervisor.config import load

DEPLOY = Path(__file__).parents[2] / "deploy"
OBJECTS = [d for d in yaml.safe_load_all((DEPLOY / "manifests" / "gpu-supervisor.yaml")
                                         .read_text()) if d]


def one(kind: str, name: str = "") -> dict[str, Any]:
    (obj,) = [o for o in OBJECTS if o["kind"] == kind and o["metadata"]["name"].endswith(name)]
    return obj


def config(component: str, tmp_path: Path) -> Any:
    path = tmp_path / f"{component}.yaml"
    path.write_text(one("ConfigMap", f"-{component}")["data"][f"{component}.yaml"])
    return load(path, {"NODE_NAME": "n"})


def test_every_container_is_locked_down_and_sized() -> None:
    """Both workloads: non-root with the image's UID, RuntimeDefault seccomp, read-only
    root filesystem, no capabilities, no privilege escalation; requests and a memory
    limit on every container."""
    for kind in ("DaemonSet", "Deployment"):
        pod = one(kind)["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 65532
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for container in pod["containers"]:
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert container["resources"]["requests"]["cpu"]
            assert container["resources"]["requests"]["memory"]
            assert container["resources"]["limits"]["memory"]
            assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
            assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_agents_run_on_every_gpu_node_and_see_every_gpu() -> None:
    """Tolerates the nvidia.com/gpu taint and our quarantine taint, node affinity on the GPU
    operator's or NFD's label, system-node-critical, NVML through the NVIDIA runtime's
    utility capability on all GPUs, NODE_NAME from the downward API, no RuntimeClass
    unless asked."""
    pod = one("DaemonSet")["spec"]["template"]["spec"]
    assert pod["priorityClassName"] == "system-node-critical"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in \
        pod["tolerations"]
    assert {"key": "gpu-supervisor.io/quarantine", "operator": "Exists"} in pod["tolerations"]
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"]
    keys = {t["matchExpressions"][0]["key"] for t in terms}
    assert keys == {"nvidia.com/gpu.present", "feature.node.kubernetes.io/pci-10de.present"}
    assert "runtimeClassName" not in pod
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["NVIDIA_VISIBLE_DEVICES"]["value"] == "all"
    assert env["NVIDIA_DRIVER_CAPABILITIES"]["value"] == "utility"
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert pod["serviceAccountName"] == "gpu-supervisor-agent"


def test_the_controller_has_a_standby_a_budget_and_spreads_over_nodes() -> None:
    """Two replicas, never both down in a rollout, a PodDisruptionBudget keeping one,
    anti-affinity on the hostname, the Lease name in its config."""
    deployment = one("Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pdb = one("PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]
    anti = deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    (term,) = anti["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"


def test_agent_reports_over_tls_with_an_audience_bound_token(tmp_path: Path) -> None:
    """The agent's config reports to the controller's TLS port with the projected token of
    audience gpu-supervisor, and the DaemonSet mounts that token and the report CA where
    the config expects them."""
    settings = config("agent", tmp_path)
    assert settings.reporting.controller_url == \
        "https://gpu-supervisor-controller.gpu-supervisor.svc:8443"
    pod = one("DaemonSet")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    (source,) = volumes["report-token"]["projected"]["sources"]
    assert source["serviceAccountToken"]["audience"] == "gpu-supervisor"
    assert settings.reporting.token_file == \
        f"{mounts['report-token']}/{source['serviceAccountToken']['path']}"
    assert settings.reporting.ca_file.startswith(mounts["report-ca"] + "/")
    assert volumes["report-ca"]["configMap"]["name"] == "gpu-supervisor-report-ca"


def test_controller_serves_reports_on_tls_from_its_secret(tmp_path: Path) -> None:
    """The controller's config points at the mounted TLS Secret and asks for our audience;
    the policy is mounted as a directory (edits reach it without a restart); its headless
    Service exposes the report port."""
    settings = config("controller", tmp_path)
    pod = one("Deployment")["spec"]["template"]["spec"]
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert settings.controller.tls_cert_file == f"{mounts['report-tls']['mountPath']}/tls.crt"
    assert settings.controller.token_audiences == ["gpu-supervisor"]
    assert settings.controller.policy_file.startswith(mounts["policy"]["mountPath"] + "/")
    assert "subPath" not in mounts["policy"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["report-tls"]["secret"]["secretName"] == "gpu-supervisor-report-tls"
    service = one("Service", "-controller")
    assert service["spec"]["clusterIP"] == "None"
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]}["reports"] == 8443


def test_the_plain_manifests_expect_the_tls_material_from_the_documented_script() -> None:
    """Rendered for `kubectl apply`, the manifests carry no key of their own: the Secret and
    CA ConfigMap come from deploy/tls/make-report-cert.sh, whose kubectl lines name them."""
    assert not [o for o in OBJECTS if o["kind"] == "Secret"]
    script = (DEPLOY / "tls" / "make-report-cert.sh").read_text()
    assert "gpu-supervisor-report-tls" in script and "gpu-supervisor-report-ca" in script


def test_example_sidecar_knows_its_group_from_lws_environment() -> None:
    """The example LWS's sidecar containers, given the environment LWS and the downward API
    give them, identify the group as the controller keys it, and the leader's probes
    its engine while the workers' watch the group only."""
    from supervisor.config import load as load_settings
    from supervisor.sidecar.identity import identify

    lws = yaml.safe_load_all((DEPLOY / "examples" / "lws-vllm-with-sidecar.yaml")
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
