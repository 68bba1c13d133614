"""The Helm chart (deploy/chart/gpu-supervisor) as an operator meets it: it lints, renders
with its defaults and with every option on, every object it renders passes the real API
server's validation (strict: no unknown field dropped without a word) and is installed by
`helm install` on the real test cluster, upstream CRDs included; what it configures is what
the daemons accept; the TLS it generates is one the controller serves and agents verify,
and an upgrade keeps it; the plain manifests are the chart rendered.

RBAC is proven in test_chart_rbac.py; the security posture of the rendered workloads in
tests/unit/test_deploy.py.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_asyncio import client

from policies.schema import load_policy
from simulator.controlplane.cluster import KubeTestCluster
from simulator.processes import ControllerProcess
from supervisor.config import load
from supervisor.controller.topology import parse_topology
from tests.integration.cluster_objects import unique
from tests.kubeenv import manifests

ROOT = Path(__file__).resolve().parents[2]
ALL_OPTIONS = manifests.CHART / "ci" / "all-options-values.yaml"
RULES = ROOT / "deploy" / "prometheus" / "gpu-supervisor.rules.yaml"


def test_helm_lint_passes_with_defaults_and_with_every_option() -> None:
    """`helm lint --strict` (warnings are errors) with the defaults and with the values
    file that switches every option on."""
    for extra in ([], ["--values", str(ALL_OPTIONS)]):
        proc = manifests.run_helm("lint", "--strict", str(manifests.CHART), *extra)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "1 chart(s) linted, 0 chart(s) failed" in proc.stdout


def test_a_misspelt_or_invalid_value_is_refused_naming_it() -> None:
    """values.schema.json: a typo in a key or a value outside its choices fails the render
    with the path of the bad value, instead of being silently ignored."""
    for flag, path in (("controler.replicas=2", "controler"),
                       ("monitoring.mode=prometheus", "/monitoring/mode"),
                       ("reportTLS.mode=none", "/reportTLS/mode"),
                       ("controller.replicas=0", "/controller/replicas")):
        proc = manifests.run_helm("template", "x", str(manifests.CHART), "--set", flag)
        assert proc.returncode != 0, flag
        assert path in proc.stderr, proc.stderr


def test_degrade_entries_from_values_never_silently_meet_a_policy_that_has_its_own(
        tmp_path: Path) -> None:
    """controller.degrade fills the shipped policy's empty degrade list; with a custom
    policy that already has a degrade: section the render fails naming the value rather
    than leaving two sections of which YAML would keep one."""
    entry = "controller.degrade[0].model=a,controller.degrade[0].fallback=b"
    proc = manifests.run_helm("template", "x", str(manifests.CHART), "--set", entry,
                              "--set", "controller.degrade[0].floor=1",
                              "--show-only", "templates/controller/configmap.yaml")
    assert proc.returncode == 0, proc.stderr
    (policy,) = [d["data"]["policy.yaml"] for d in yaml.safe_load_all(proc.stdout)
                 if d["metadata"]["name"].endswith("-policy")]
    assert [(r.model, r.fallback) for r in load_policy(policy).degrade] == [("a", "b")]
    own = tmp_path / "policy.yaml"
    own.write_text("degrade: [{model: c, fallback: d, floor: 1}]\n")
    proc = manifests.run_helm("template", "x", str(manifests.CHART), "--set", entry,
                              "--set", "controller.degrade[0].floor=1",
                              "--set-file", f"controller.policy={own}")
    assert proc.returncode != 0
    assert "controller.degrade" in proc.stderr


def test_the_plain_manifests_are_the_chart_rendered() -> None:
    """deploy/manifests/gpu-supervisor.yaml and the chart's copies of the policy, the alert
    rules and the dashboard are up to date (`python deploy/render.py` rewrites them)."""
    proc = subprocess.run([sys.executable, str(ROOT / "deploy" / "render.py"), "--check"],
                          capture_output=True, text=True, timeout=120, check=False,
                          env={"HELM": manifests.helm(), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_plain_manifests_create_the_namespace_before_anything_in_it() -> None:
    """`kubectl apply -f` applies in file order: Namespace first, then RBAC and config,
    then the workloads that use them."""
    docs = [d for d in yaml.safe_load_all(
        (ROOT / "deploy" / "manifests" / "gpu-supervisor.yaml").read_text()) if d]
    kinds = [d["kind"] for d in docs]
    assert kinds[0] == "Namespace"
    for before, after in (("ServiceAccount", "DaemonSet"), ("ConfigMap", "Deployment"),
                          ("ClusterRoleBinding", "Deployment")):
        assert kinds.index(before) < kinds.index(after)


class TestConfiguredDaemons:
    """What the chart writes into ConfigMaps is accepted by the daemons' own loaders."""

    @pytest.mark.parametrize("values", [None, ALL_OPTIONS], ids=["defaults", "all-options"])
    def test_the_configs_load_as_the_daemons_load_them(self, values: Path | None,
                                                       tmp_path: Path) -> None:
        """agent.yaml and controller.yaml pass the daemons' validation; the agent reports
        over TLS to the controller's Service with our audience's token; the controller
        serves TLS from the mounted Secret and admits the chart's agent identity."""
        rel = manifests.render(values_files=[values] if values else [])
        for role in ("agent", "controller"):
            path = tmp_path / f"{role}.yaml"
            path.write_text(yaml.safe_dump(rel.config(role)))
            load(path, {"NODE_NAME": "n"})
        agent, ctl = rel.config("agent"), rel.config("controller")["controller"]
        host = f"{rel.one('Service', 'controller')['metadata']['name']}.{rel.namespace}.svc"
        assert agent["reporting"]["controller_url"] == \
            f"https://{host}:{ctl['report_listen'].rsplit(':', 1)[1]}"
        assert ctl["allowed_reporters"] == [
            f"system:serviceaccount:{rel.namespace}:{rel.service_account('agent')}"]
        assert ctl["token_audiences"] == ["gpu-supervisor"]

    def test_the_shipped_policy_starts_in_dry_run_until_switched_off(self) -> None:
        """controller.dryRun (default true) decides dry_run of the shipped policy, which is
        otherwise policies/default.yaml; a custom policy and topology pass validation."""
        for values, dry in (({}, True), ({"controller": {"dryRun": False}}, False)):
            rel = manifests.render(values=values)
            text = rel.one("ConfigMap", "controller", "-policy")["data"]["policy.yaml"]
            assert load_policy(text).dry_run is dry
            shipped = (ROOT / "policies" / "default.yaml").read_text()
            assert text.replace(f"dry_run: {str(dry).lower()}", "dry_run: false").strip() == \
                shipped.strip()
        rel = manifests.render(values_files=[ALL_OPTIONS])
        data = rel.one("ConfigMap", "controller", "-policy")["data"]
        assert load_policy(data["policy.yaml"]).dry_run is False
        assert load_policy(data["policy.yaml"]).degrade[0].fallback == "llama-8b"
        topo = parse_topology(yaml.safe_load(data["topology.yaml"]))
        assert topo.kinds[0].name == "ray-workers"

    def test_the_prometheus_rule_is_the_rules_file_with_this_installs_jobs(self) -> None:
        """The PrometheusRule's groups are deploy/prometheus/gpu-supervisor.rules.yaml, its
        job matchers renamed to monitoring.jobs and runbook links to runbookBaseUrl."""
        rel = manifests.render(values_files=[ALL_OPTIONS])
        groups = rel.one("PrometheusRule")["spec"]["groups"]
        expected = RULES.read_text()
        for role in ("agent", "controller", "sidecar"):
            expected = expected.replace(f'job="gpu-supervisor-{role}"', f'job="gpu-{role}"')
        expected = expected.replace(
            "runbook_url: README.md#",
            "runbook_url: https://git.example.com/platform/gpu-supervisor/blob/main/README.md#")
        assert groups == yaml.safe_load(expected)["groups"]
        rendered = yaml.safe_dump(groups)
        assert 'job="gpu-supervisor-' not in rendered
        for monitor in rel.of(("ServiceMonitor", "PodMonitor")):
            endpoints = monitor["spec"].get("endpoints") or monitor["spec"][
                "podMetricsEndpoints"]
            jobs = [r["replacement"] for r in endpoints[0]["relabelings"]
                    if r["targetLabel"] == "job"]
            assert jobs and jobs[0] in {"gpu-agent", "gpu-controller", "gpu-sidecar"}


async def _namespaces(cluster: KubeTestCluster, *names: str) -> None:
    for name in names:
        await cluster.ensure_namespace(name)


@pytest.mark.kube
class TestOnTheApiServer:
    @pytest.mark.parametrize("variant", ["defaults", "all-options", "pod-monitors",
                                         "agent-only"])
    async def test_every_rendered_object_passes_strict_validation(
            self, kube_cluster: KubeTestCluster, variant: str) -> None:
        """Each object `helm template` renders is created on the real API server with
        fieldValidation=Strict (prometheus-operator's and Gateway API's CRDs installed as
        upstream ships them): a misspelt field fails instead of vanishing."""
        files = {"defaults": [], "all-options": [ALL_OPTIONS],
                 "pod-monitors": [ALL_OPTIONS], "agent-only": []}[variant]
        values: dict[str, Any] = {
            "pod-monitors": {"monitoring": {"mode": "podMonitor"}},
            "agent-only": {"controller": {"enabled": False},
                           "monitoring": {"mode": "none"}},
        }.get(variant, {})
        ns = unique("gsns")
        rel = manifests.render(unique("gs"), ns, values=values, values_files=files)
        await _namespaces(kube_cluster, ns, "serving-a", "serving-b")
        async with await kube_cluster.api_client() as api:
            await manifests.create(api, rel.objects)
        kinds = {o["kind"] for o in rel.objects}
        if variant == "all-options":
            assert {"ServiceMonitor", "PodMonitor", "PrometheusRule", "Secret"} <= kinds
        if variant == "agent-only":
            assert "Deployment" not in kinds and "DaemonSet" in kinds

    async def test_helm_installs_and_upgrades_the_chart_keeping_its_certificate(
            self, kube_cluster: KubeTestCluster, tmp_path: Path) -> None:
        """`helm install` with every option on, against the real API server, then `helm
        upgrade`: both succeed without a warning about unknown fields, and the upgrade
        keeps the generated report certificate and CA (agents keep trusting it)."""
        kubeconfig = kube_cluster.write_kubeconfig(tmp_path / "kc", kube_cluster.admin_token)
        ns, release = unique("gsns"), unique("gs")
        serving = [unique("serving"), unique("serving")]
        await _namespaces(kube_cluster, *serving)
        own = tmp_path / "namespaces.yaml"
        own.write_text(yaml.safe_dump({"sidecar": {"namespaces": serving},
                                       "controller": {"rbac": {"namespaces": serving}}}))
        common = ["--kubeconfig", str(kubeconfig), "--namespace", ns,
                  "--values", str(ALL_OPTIONS), "--values", str(own)]

        def helm(*args: str) -> str:
            proc = manifests.run_helm(*args, *common)
            assert proc.returncode == 0, proc.stderr
            assert "unknown field" not in proc.stderr, proc.stderr
            return proc.stdout

        await asyncio.to_thread(helm, "install", release, str(manifests.CHART),
                                "--create-namespace")
        async with await kube_cluster.api_client() as api:
            core = client.CoreV1Api(api)
            first = (await core.read_namespaced_secret("gs-report-tls", ns)).data
            ca_a = (await core.read_namespaced_config_map("gs-report-ca", serving[0])).data
            await asyncio.to_thread(helm, "upgrade", release, str(manifests.CHART),
                                    "--set", "logLevel=info")
            second = (await core.read_namespaced_secret("gs-report-tls", ns)).data
            cm = await core.read_namespaced_config_map(f"{release}-gpu-supervisor-agent", ns)
        assert second == first
        assert ca_a["ca.crt"] == base64.b64decode(first["ca.crt"]).decode()
        assert "log_level: info" in cm.data["agent.yaml"]

    async def test_the_generated_certificate_is_served_and_verified_by_service_name(
            self, kube_cluster: KubeTestCluster, tmp_path: Path) -> None:
        """The controller, started on the certificate the chart generated, completes a TLS
        handshake with a client that trusts only the chart's CA and checks the Service's
        DNS name, as an agent does."""
        rel = manifests.render(unique("gs"))
        secret = rel.one("Secret")
        tls_dir = tmp_path / "tls"
        tls_dir.mkdir()
        for key in ("tls.crt", "tls.key", "ca.crt"):
            (tls_dir / key).write_bytes(base64.b64decode(secret["data"][key]))
        async with await kube_cluster.api_client() as api:
            release = await manifests.install_rbac(api, rel.name)
        token = await kube_cluster.service_account_token(
            release.namespace, release.service_account("controller"))
        ctl = ControllerProcess(tmp_path, kube_cluster.write_kubeconfig(tmp_path / "kc", token),
                                "chart-tls", tls_dir=tls_dir,
                                settings=release.controller_settings())
        await asyncio.to_thread(ctl.start)
        try:
            port = int(ctl.report_url.rsplit(":", 1)[1])
            ca = rel.one("ConfigMap", suffix="-report-ca")
            ctx = ssl.create_default_context(cadata=ca["data"]["ca.crt"])
            service = rel.one("Service", "controller")["metadata"]["name"]
            name = f"{service}.{rel.namespace}.svc"

            def handshake(server_name: str) -> str:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                        ctx.wrap_socket(raw, server_hostname=server_name) as tls:
                    return str(tls.version())
            assert (await asyncio.to_thread(handshake, name)).startswith("TLS")
            with pytest.raises(ssl.SSLCertVerificationError):
                await asyncio.to_thread(handshake, "someone-else.example.com")
        finally:
            ctl.stop()
