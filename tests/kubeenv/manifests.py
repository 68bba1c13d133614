"""Install the project's own Helm chart (deploy/chart/gpu-supervisor) on the test cluster,
as an operator would, and read back what it configures.

Every test that runs a daemon against the API server takes that daemon's RBAC from here, so
the chart's RBAC is what the tests prove sufficient. A test renders its own release (a
unique release name gives unique ClusterRoles, Lease and state ConfigMap names), so tests
sharing the cluster cannot see each other's leader or state.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from kubernetes_asyncio.client import ApiClient
from kubernetes_asyncio.client.exceptions import ApiException

from simulator.world import RESOURCES

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "chart" / "gpu-supervisor"
BUILD_HELM = ROOT / "scripts" / "build-helm.sh"
RBAC_KINDS = frozenset({"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role",
                        "RoleBinding"})
NAMESPACE = "gpu-supervisor"



@functools.cache
def helm() -> str:
    """The helm binary: $HELM, else scripts/build-helm.sh (built once, then cached)."""
    given = os.environ.get("HELM")
    if given:
        return given
    out = subprocess.run(["bash", str(BUILD_HELM)], check=True, stdout=subprocess.PIPE,
                         text=True).stdout
    return out.strip().splitlines()[-1]


def run_helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm(), *args], capture_output=True, text=True, timeout=120,
                          check=False)


def object_path(obj: dict[str, Any], *, collection: bool = False) -> str:
    """The REST path of a rendered object (or of its collection, to create it)."""
    prefix, plural, namespaced = RESOURCES[obj["kind"]]
    base = prefix
    if namespaced:
        base += f"/namespaces/{obj['metadata']['namespace']}"
    base += f"/{plural}"
    return base if collection else f"{base}/{obj['metadata']['name']}"


@dataclass(frozen=True)
class Release:
    """One rendering of the chart: its objects and the names it configured."""

    name: str
    namespace: str
    objects: tuple[dict[str, Any], ...]

    def of(self, kind: str | Iterable[str], component: str | None = None
           ) -> list[dict[str, Any]]:
        kinds = {kind} if isinstance(kind, str) else set(kind)
        return [o for o in self.objects if o["kind"] in kinds and (
            component is None
            or o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component)]

    def one(self, kind: str, component: str | None = None, suffix: str = "") -> dict[str, Any]:
        (obj,) = [o for o in self.of(kind, component) if o["metadata"]["name"].endswith(suffix)]
        return obj

    def config(self, component: str) -> dict[str, Any]:
        """The daemon config the chart writes for ``component`` (agent or controller)."""
        cm = self.one("ConfigMap", component, f"{component}")
        loaded: dict[str, Any] = yaml.safe_load(cm["data"][f"{component}.yaml"])
        return loaded

    def service_account(self, component: str) -> str:
        return str(self.one("ServiceAccount", component)["metadata"]["name"])

    def controller_settings(self, **extra: Any) -> dict[str, Any]:
        """The chart's controller settings a test's controller must run with to be covered
        by this release's RBAC: its Lease, state ConfigMap and agent identity."""
        ctl = self.config("controller")["controller"]
        return {"controller": {k: ctl[k] for k in ("lease_name", "state_configmap",
                                                   "allowed_reporters",
                                                   "agent_pod_selector")} | extra}

    def agent_pod_labels(self) -> dict[str, str]:
        """The labels the chart's DaemonSet gives its agent pods."""
        template = self.one("DaemonSet", "agent")["spec"]["template"]
        return dict(template["metadata"]["labels"])


def render(release: str = NAMESPACE, namespace: str = NAMESPACE,
           values: dict[str, Any] | None = None,
           values_files: Iterable[Path] = ()) -> Release:
    """``helm template`` the chart; raises with helm's message if it does not render."""
    args = ["template", release, str(CHART), "--namespace", namespace]
    for path in values_files:
        args += ["--values", str(path)]
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as extra:
        if values:
            json.dump(values, extra)
            extra.flush()
            args += ["--values", extra.name]
        proc = run_helm(*args)
    if proc.returncode != 0:
        raise AssertionError(f"helm template failed: {proc.stderr.strip()}")
    objects = tuple(d for d in yaml.safe_load_all(proc.stdout) if d)
    return Release(release, namespace, objects)


async def create(api: ApiClient, objects: Iterable[dict[str, Any]], *,
                 strict: bool = True, dry_run: bool = False) -> None:
    """Create each object through the API server — its own validation, and with
    ``strict`` an unknown or duplicated field is an error instead of being dropped without
    a word. Objects that exist already are left as they are; with ``dry_run`` the server
    validates and admits each object but stores none."""
    query = [("fieldValidation", "Strict")] if strict else []
    if dry_run:
        query.append(("dryRun", "All"))
    for obj in objects:
        try:
            await api.call_api(object_path(obj, collection=True), "POST", query_params=query,
                               header_params={"Content-Type": "application/json",
                                              "Accept": "application/json"},
                               body=obj, auth_settings=["BearerToken"],
                               response_types_map={201: "object", 200: "object"})
        except ApiException as exc:
            if exc.status != 409:
                body = exc.body.decode() if isinstance(exc.body, bytes) else exc.body
                raise AssertionError(f"{obj['kind']} {obj['metadata'].get('namespace', '')}/"
                                     f"{obj['metadata']['name']}: {exc.status} {body}"
                                     ) from exc


async def install_rbac(api: ApiClient, release: str = NAMESPACE, *components: str,
                       values: dict[str, Any] | None = None) -> Release:
    """Render a release and create its namespace, ServiceAccounts, roles and bindings (for
    ``components``, default all) — what a daemon needs before it can talk to the API."""
    rel = render(release, values=values)
    wanted = [o for o in rel.of(RBAC_KINDS) if not components or o["metadata"].get(
        "labels", {}).get("app.kubernetes.io/component") in components]
    await create(api, [{"apiVersion": "v1", "kind": "Namespace",
                        "metadata": {"name": rel.namespace}}])
    await create(api, wanted)
    return rel
