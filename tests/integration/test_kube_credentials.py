"""Credentials that expire, on the real API server: kubeconfig exec plugins (as EKS and GKE
use) are run again before their credential expires and whenever the API server answers
401; token files are re-read on a 401; files we wrote for inline certificates are deleted
when the client closes."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio import client

from simulator.controlplane.cluster import KubeTestCluster
from supervisor.kube import KubeClient

pytestmark = pytest.mark.kube

PLUGIN = """#!/bin/sh
# An exec credential plugin: the token in $TOKEN_FILE, valid for $VALID_SECONDS.
echo run >> "$RUNS_FILE"
expiry=$(date -u -d "+$VALID_SECONDS seconds" +%Y-%m-%dT%H:%M:%SZ)
printf '{"apiVersion":"client.authentication.k8s.io/v1","kind":"ExecCredential",'
printf '"status":{"token":"%s","expirationTimestamp":"%s"}}' "$(cat "$TOKEN_FILE")" "$expiry"
"""


async def secret_bound_token(cluster: KubeTestCluster, secret: str) -> str:
    """A ServiceAccount token that dies with ``secret``. Any authenticated user may read
    discovery (``/api``), which is what these tests call: 200 with a live token, 401
    without."""
    async with await cluster.api_client() as admin:
        core = client.CoreV1Api(admin)
        created = await core.create_namespaced_secret("default", {
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": secret}})
    return await cluster.service_account_token(
        "default", "creds-test", bound_to={"kind": "Secret", "name": secret,
                                           "uid": created.metadata.uid})


async def delete_secret(cluster: KubeTestCluster, name: str) -> None:
    async with await cluster.api_client() as admin:
        await client.CoreV1Api(admin).delete_namespaced_secret(name, "default")


def exec_kubeconfig(cluster: KubeTestCluster, tmp: Path, valid_seconds: int) -> Path:
    plugin = tmp / "bin" / "cred-plugin"
    plugin.parent.mkdir()
    plugin.write_text(PLUGIN)
    plugin.chmod(0o755)
    path = tmp / "kubeconfig"
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": {"server": cluster.url,
                                               "certificate-authority": str(cluster.ca_file)}}],
        "users": [{"name": "u", "user": {"exec": {
            "apiVersion": "client.authentication.k8s.io/v1", "command": "./bin/cred-plugin",
            "interactionMode": "Never",
            "env": [{"name": "TOKEN_FILE", "value": str(tmp / "token")},
                    {"name": "RUNS_FILE", "value": str(tmp / "runs")},
                    {"name": "VALID_SECONDS", "value": str(valid_seconds)}]}}}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}]}))
    return path


def runs(tmp: Path) -> int:
    path = tmp / "runs"
    return len(path.read_text().splitlines()) if path.exists() else 0


async def test_exec_plugin_runs_again_when_its_credential_expires(
        kube_cluster: KubeTestCluster, tmp_path: Path) -> None:
    """A credential valid for 31 s (30 s are kept as a margin) is reused while fresh and
    renewed by running the plugin again once it is not."""
    (tmp_path / "token").write_text(await secret_bound_token(kube_cluster, "creds-expiry"))
    kube = await KubeClient.connect(str(exec_kubeconfig(kube_cluster, tmp_path, 31)))
    try:
        await kube.request("GET", "/api")
        await kube.request("GET", "/api")
        assert runs(tmp_path) == 1
        await asyncio.sleep(1.5)
        await kube.request("GET", "/api")
        assert runs(tmp_path) == 2
    finally:
        await kube.close()


async def test_exec_plugin_runs_again_on_401(kube_cluster: KubeTestCluster,
                                             tmp_path: Path) -> None:
    """The API server stops accepting the plugin's token (its bound Secret is deleted):
    the next request gets 401, the plugin runs again, hands out the new token, and the
    request succeeds — the caller never sees the 401."""
    token_file = tmp_path / "token"
    token_file.write_text(await secret_bound_token(kube_cluster, "creds-401-a"))
    kube = await KubeClient.connect(str(exec_kubeconfig(kube_cluster, tmp_path, 3600)))
    try:
        await kube.request("GET", "/api")
        token_file.write_text(await secret_bound_token(kube_cluster, "creds-401-b"))
        await delete_secret(kube_cluster, "creds-401-a")
        deadline = time.monotonic() + 10
        while True:  # the API server's token cache may keep the old token valid briefly
            await kube.request("GET", "/api")
            if runs(tmp_path) == 2:
                break
            assert time.monotonic() < deadline, "the old token was never refused"
            await asyncio.sleep(0.2)
    finally:
        await kube.close()


async def test_token_file_is_read_again_on_401(kube_cluster: KubeTestCluster,
                                               tmp_path: Path) -> None:
    """A kubeconfig (or in-cluster config) naming a token file picks up a rotated token as
    soon as the old one is refused, not a minute later."""
    token_file = tmp_path / "token"
    token_file.write_text(await secret_bound_token(kube_cluster, "creds-file-a"))
    path = tmp_path / "kc"
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": {"server": kube_cluster.url,
                                               "certificate-authority":
                                                   str(kube_cluster.ca_file)}}],
        "users": [{"name": "u", "user": {"tokenFile": str(token_file)}}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}]}))
    kube = await KubeClient.connect(str(path))
    try:
        await kube.request("GET", "/api")
        token_file.write_text(await secret_bound_token(kube_cluster, "creds-file-b"))
        await delete_secret(kube_cluster, "creds-file-a")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # succeeds throughout: 401 → re-read → retry
            await kube.request("GET", "/api")
            await asyncio.sleep(0.2)
    finally:
        await kube.close()


def self_signed(tmp: Path) -> tuple[str, str]:
    """A throwaway certificate and key as kubeconfig inline data (base64 PEM)."""
    import base64

    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj", "/CN=x",
                    "-keyout", str(tmp / "k.pem"), "-out", str(tmp / "c.pem")],
                   check=True, capture_output=True)
    return (base64.b64encode((tmp / "c.pem").read_bytes()).decode(),
            base64.b64encode((tmp / "k.pem").read_bytes()).decode())


async def test_inline_certificate_files_are_deleted_on_close(
        kube_cluster: KubeTestCluster, tmp_path: Path) -> None:
    """Inline client certificate data is written to private files for ssl to load; they
    are gone once the client is closed."""
    cert, key = self_signed(tmp_path)
    path = tmp_path / "kc"
    user: dict[str, Any] = {"client-certificate-data": cert, "client-key-data": key}
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": {"server": kube_cluster.url,
                                               "certificate-authority":
                                                   str(kube_cluster.ca_file)}}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}]}))
    kube = await KubeClient.connect(str(path))
    files = list(kube._transport._creds.temp_files)
    assert len(files) == 2 and all(Path(f).exists() for f in files)
    await kube.close()
    assert not any(Path(f).exists() for f in files)
