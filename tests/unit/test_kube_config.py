"""How the Kubernetes adapter finds its credentials, without kubernetes_asyncio."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from supervisor.errors import KubePermanentError
from supervisor.kube import _from_kubeconfig, _in_cluster


def kubeconfig(tmp_path: Path, cluster: dict[str, object], user: dict[str, object]) -> str:
    path = tmp_path / "kc"
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": cluster}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}]}))
    return str(path)


async def test_token_kubeconfig_with_relative_paths(tmp_path: Path) -> None:
    """Relative file paths resolve against the kubeconfig's directory, as kubectl does."""
    creds = await _from_kubeconfig(kubeconfig(
        tmp_path, {"server": "https://127.0.0.1:6443", "certificate-authority": "ca.crt"},
        {"tokenFile": "token"}))
    assert creds.server == "https://127.0.0.1:6443"
    assert creds.ca_file == str(tmp_path / "ca.crt")
    assert creds.token_file == str(tmp_path / "token")


async def test_inline_client_certificate_is_written_privately(tmp_path: Path) -> None:
    """Inline certificate data ends up in 0600 files ssl can load; insecure is honoured."""
    cert = base64.b64encode(b"CERT").decode()
    creds = await _from_kubeconfig(kubeconfig(
        tmp_path, {"server": "https://h", "insecure-skip-tls-verify": True},
        {"client-certificate-data": cert, "client-key-data": cert}))
    assert creds.insecure is True
    assert creds.cert_file is not None and Path(creds.cert_file).read_bytes() == b"CERT"
    assert Path(creds.cert_file).stat().st_mode & 0o777 == 0o600


async def test_broken_kubeconfig_is_a_permanent_error(tmp_path: Path) -> None:
    """A kubeconfig without the current context is reported, not crashed on."""
    path = tmp_path / "kc"
    path.write_text("apiVersion: v1\nclusters: []\n")
    with pytest.raises(KubePermanentError, match="cannot read kubeconfig"):
        await _from_kubeconfig(str(path))


def test_in_cluster_needs_the_service_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside a pod and without a kubeconfig the adapter says so plainly."""
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(KubePermanentError, match="not in a cluster"):
        _in_cluster()
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    creds = _in_cluster()
    assert creds.server == "https://10.0.0.1:443"
    assert creds.token_file == "/var/run/secrets/kubernetes.io/serviceaccount/token"
