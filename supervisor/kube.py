"""The Kubernetes adapter — the only module that touches the Kubernetes API.

Everything the supervisor does to a cluster goes through ``KubeClient``: each request runs
under the one deadline helper and the one retry policy, and failures come out as
``KubeTemporaryError`` (unreachable, 5xx, 409, 429: worth retrying) or
``KubePermanentError`` (any other 4xx) with the cause chained.

The daemons speak JSON to the API server over their own aiohttp session (``_Transport``)
instead of through kubernetes_asyncio's generated client. Importing that client loads a
model class for every API type — enough on its own to put the node agent over its memory
budget — and its per-request machinery (model sanitising, proxy and netrc
look-ups in executor threads) costs CPU the controller needs at 400 reports per second.
The agent and the controller read a handful of fields; plain JSON is all they need.
kubernetes_asyncio (imported lazily, only here) still loads kubeconfigs whose user entry
needs an exec or auth-provider plugin; in-cluster credentials and plain token or
certificate kubeconfigs are read directly.

Node conditions are written with a strategic-merge patch on ``nodes/{name}/status``: the
API server merges ``status.conditions`` by ``type``, so only the types we send change and
conditions owned by the kubelet, NPD or anyone else are left alone.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import ssl
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import yaml

from supervisor.errors import DeadlineExceeded, KubeError, KubePermanentError, KubeTemporaryError
from supervisor.runtime.deadline import with_deadline
from supervisor.runtime.retry import call_with_retry

T = TypeVar("T")

_TEMPORARY_STATUSES = {409, 429, 500, 502, 503, 504}
STRATEGIC_MERGE = "application/strategic-merge-patch+json"
SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
TOKEN_REREAD_SECONDS = 60.0  # the kubelet rotates bound tokens well before they expire


def rfc3339(ts: float) -> str:
    """A wall-clock time as Kubernetes writes it in conditions and Events."""
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class _HttpStatus(Exception):
    """A non-2xx answer; mapped to a Kube error by ``KubeClient._call``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status} {message}")
        self.status = status


@dataclass
class _Credentials:
    server: str
    ca_file: str | None = None
    ca_data: str | None = None
    insecure: bool = False
    token: str | None = None
    token_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


def _in_cluster() -> _Credentials:
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get(
        "KUBERNETES_SERVICE_PORT", "443")
    if not host:
        raise KubePermanentError("not in a cluster (KUBERNETES_SERVICE_HOST unset) and no "
                                 "kubeconfig given")
    host = f"[{host}]" if ":" in host else host
    return _Credentials(server=f"https://{host}:{port}", ca_file=str(SA_DIR / "ca.crt"),
                        token_file=str(SA_DIR / "token"))


def _data_file(data: str, suffix: str) -> str:
    """ssl wants certificate and key *files*; keep inline ones in a private temp file."""
    with tempfile.NamedTemporaryFile(prefix="gpusup-", suffix=suffix, delete=False) as handle:
        handle.write(base64.b64decode(data))
    os.chmod(handle.name, 0o600)
    return handle.name


async def _from_kubeconfig(path: str) -> _Credentials:
    try:
        # A small local file read once at start-up: blocking is fine here.
        raw = yaml.safe_load(Path(path).read_text())  # noqa: ASYNC240
        contexts = {c["name"]: c["context"] for c in raw.get("contexts") or []}
        context = contexts[raw["current-context"]]
        cluster = {c["name"]: c["cluster"] for c in raw["clusters"]}[context["cluster"]]
        user = {u["name"]: u.get("user") or {} for u in raw.get("users") or []}.get(
            context.get("user", ""), {})
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError) as exc:
        raise KubePermanentError(f"cannot read kubeconfig {path}: {exc!r}") from exc
    base = Path(path).parent

    def rel(value: str | None) -> str | None:
        return None if value is None else str(base / value)

    if "exec" in user or "auth-provider" in user:
        return await _from_plugin_kubeconfig(path, cluster)
    return _Credentials(
        server=cluster["server"], ca_file=rel(cluster.get("certificate-authority")),
        ca_data=cluster.get("certificate-authority-data"),
        insecure=bool(cluster.get("insecure-skip-tls-verify")),
        token=user.get("token"), token_file=rel(user.get("tokenFile")),
        cert_file=rel(user.get("client-certificate")) or (
            _data_file(user["client-certificate-data"], ".crt")
            if "client-certificate-data" in user else None),
        key_file=rel(user.get("client-key")) or (
            _data_file(user["client-key-data"], ".key") if "client-key-data" in user
            else None))


async def _from_plugin_kubeconfig(path: str, cluster: Mapping[str, Any]) -> _Credentials:
    """Credential plugins (exec, auth-provider) are kubernetes_asyncio's job: let it run
    them once and hand us the token. (Imported here only: see the module docstring.)"""
    from kubernetes_asyncio import client, config

    cfg = client.Configuration()
    await config.load_kube_config(config_file=path, client_configuration=cfg)
    header = (cfg.api_key or {}).get("authorization") or (cfg.api_key or {}).get(
        "BearerToken", "")
    token = str(header).removeprefix("Bearer ").strip() or None
    return _Credentials(server=str(cfg.host), ca_file=cfg.ssl_ca_cert,
                        insecure=not cfg.verify_ssl, token=token,
                        cert_file=cfg.cert_file, key_file=cfg.key_file,
                        ca_data=cluster.get("certificate-authority-data"))


class _Transport:
    """One aiohttp session to the API server with the credentials applied."""

    def __init__(self, creds: _Credentials) -> None:
        self._creds = creds
        self.server = creds.server.rstrip("/")
        if creds.insecure:
            ctx: ssl.SSLContext | bool = False
        else:
            ctx = ssl.create_default_context(
                cafile=creds.ca_file,
                cadata=base64.b64decode(creds.ca_data).decode() if creds.ca_data else None)
            if creds.cert_file and creds.key_file:
                ctx.load_cert_chain(creds.cert_file, creds.key_file)
        # trust_env=False: no proxy or netrc look-ups per request (they run in threads).
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=ctx, limit=100), trust_env=False)
        self._token: str | None = creds.token
        self._token_read_at = 0.0

    def _bearer(self) -> str | None:
        if self._creds.token_file and time.monotonic() - self._token_read_at > \
                TOKEN_REREAD_SECONDS:
            try:
                self._token = Path(self._creds.token_file).read_text().strip()
                self._token_read_at = time.monotonic()
            except OSError as exc:
                raise KubePermanentError(f"cannot read token {self._creds.token_file}: "
                                         f"{exc.strerror}") from exc
        return self._token

    def headers(self, content_type: str | None) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        token = self._bearer()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    async def request(self, method: str, path: str, query: Sequence[tuple[str, str]],
                      body: Any, content_type: str) -> tuple[int, bytes]:
        data = None if body is None else json.dumps(body).encode()
        async with self._session.request(
                method, self.server + path, params=list(query), data=data,
                headers=self.headers(content_type if data is not None else None)) as resp:
            return resp.status, await resp.read()

    def stream(self, path: str, query: Sequence[tuple[str, str]], read_timeout: float
               ) -> Any:
        return self._session.get(self.server + path, params=list(query),
                                 headers=self.headers(None),
                                 timeout=aiohttp.ClientTimeout(total=None,
                                                               sock_read=read_timeout))

    async def close(self) -> None:
        await self._session.close()


class KubeClient:
    """A thin, typed, deadline-bound JSON client for the calls the supervisor makes."""

    def __init__(self, transport: _Transport, timeout: float = 10.0) -> None:
        self._transport = transport
        self.timeout = timeout

    @classmethod
    async def connect(cls, kubeconfig: str = "", timeout: float = 10.0) -> KubeClient:
        """From a kubeconfig file, or the pod's in-cluster ServiceAccount when empty."""
        creds = await _from_kubeconfig(kubeconfig) if kubeconfig else _in_cluster()
        try:
            return cls(_Transport(creds), timeout)
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise KubePermanentError(f"cannot set up TLS to {creds.server}: {exc}") from exc

    async def close(self) -> None:
        await self._transport.close()

    async def _call(self, what: str, fn: Callable[[], Awaitable[T]], *,
                    retry: bool = True) -> T:
        async def once() -> T:
            try:
                return await with_deadline(f"kubernetes {what}", fn(), self.timeout)
            except _HttpStatus as exc:
                raise _classify(exc.status, f"kubernetes {what}: {exc}") from exc
            except (aiohttp.ClientError, OSError) as exc:
                raise KubeTemporaryError(f"kubernetes {what}: {exc!r}") from exc

        if not retry:
            return await once()
        try:
            return await call_with_retry(once)
        except KubeError:
            raise
        except Exception as exc:  # DeadlineExceeded after the last attempt
            raise KubeTemporaryError(f"kubernetes {what}: {exc}") from exc

    # --- nodes ----------------------------------------------------------------------------

    async def read_node(self, name: str) -> dict[str, Any]:
        return await self.request("GET", f"/api/v1/nodes/{name}")

    async def patch_node_conditions(self, name: str,
                                    conditions: Sequence[Mapping[str, Any]]) -> None:
        """Strategic-merge our conditions into ``status.conditions`` (merged by ``type``)."""
        body = {"status": {"conditions": [dict(c) for c in conditions]}}
        await self.request("PATCH", f"/api/v1/nodes/{name}/status", body=body,
                           content_type=STRATEGIC_MERGE)

    @staticmethod
    def condition(ctype: str, status: bool, reason: str, message: str,
                  transition: float, heartbeat: float) -> dict[str, Any]:
        return {
            "type": ctype,
            "status": "True" if status else "False",
            "reason": reason,
            "message": message,
            "lastTransitionTime": rfc3339(transition),
            "lastHeartbeatTime": rfc3339(heartbeat),
        }

    # --- events ---------------------------------------------------------------------------

    async def node_event(self, node: str, node_uid: str | None, *, warning: bool,
                         reason: str, message: str, component: str, now: float,
                         namespace: str = "default") -> None:
        """Record a core/v1 Event on the Node, as NPD and the kubelet do."""
        stamp = rfc3339(now)
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{node}.", "namespace": namespace},
            "involvedObject": {"apiVersion": "v1", "kind": "Node", "name": node,
                               **({"uid": node_uid} if node_uid else {})},
            "type": "Warning" if warning else "Normal",
            "reason": reason,
            "message": message[:1024],
            "source": {"component": component, "host": node},
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
            "reportingComponent": component,
            "reportingInstance": node,
        }
        # Events are best effort and not idempotent: no retry, so a slow API server never
        # turns one transition into several identical events.
        await self.request("POST", f"/api/v1/namespaces/{namespace}/events", body=body,
                           retry=False)

    # --- JSON requests ---------------------------------------------------------------------

    async def request(self, method: str, path: str, *, query: Mapping[str, str] | None = None,
                      body: Any = None, content_type: str = "application/json",
                      retry: bool = True, ok_statuses: frozenset[int] = frozenset()
                      ) -> dict[str, Any]:
        """One API request with JSON in and out. Statuses in ``ok_statuses`` return {}."""
        async def call() -> dict[str, Any]:
            status, data = await self._transport.request(
                method, path, list((query or {}).items()), body, content_type)
            if status in ok_statuses:
                return {}
            if not 200 <= status < 300:
                raise _HttpStatus(status, _status_reason(data))
            result: dict[str, Any] = json.loads(data) if data else {}
            return result

        return await self._call(f"{method} {path}", call, retry=retry)

    async def watch(self, path: str, resource_version: str, *, selector: str = "",
                    timeout_seconds: int = 300) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """Stream (type, object) watch events from ``resource_version``.

        Raises ``KubeTemporaryError`` with status 410 when the version is too old; the
        caller relists. Ends normally when the server closes the watch.
        """
        query = [("watch", "true"), ("resourceVersion", resource_version),
                 ("allowWatchBookmarks", "true"), ("timeoutSeconds", str(timeout_seconds))]
        if selector:
            query.append(("labelSelector", selector))
        try:
            # The deadline covers opening the watch; the stream itself may stay quiet for
            # up to timeout_seconds (sock_read covers that).
            resp = await with_deadline(f"watch {path}",
                                       self._transport.stream(path, query, timeout_seconds + 30),
                                       self.timeout)
        except (aiohttp.ClientError, OSError, DeadlineExceeded) as exc:
            raise KubeTemporaryError(f"watch {path}: {exc!r}") from exc
        try:
            if resp.status != 200:
                data = await resp.read()
                status = resp.status
                if status == 410:
                    raise KubeTemporaryError(f"watch {path}: 410 Gone", status=410)
                raise _classify(status, f"watch {path}: {status} {_status_reason(data)}")
            while True:
                try:
                    line = await resp.content.readline()
                except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                    raise KubeTemporaryError(f"watch {path}: {exc!r}") from exc
                if not line:
                    return
                event = json.loads(line)
                obj = event.get("object") or {}
                if event.get("type") == "ERROR":
                    code = obj.get("code")
                    if code == 410:
                        raise KubeTemporaryError(f"watch {path}: 410 Gone", status=410)
                    raise KubeTemporaryError(f"watch {path}: {obj.get('message')}", status=code)
                yield event["type"], obj
        finally:
            resp.release()

    # --- authentication -------------------------------------------------------------------

    async def review_token(self, token: str, audiences: Sequence[str] = ()) -> tuple[
            bool, str, dict[str, list[str]]]:
        """TokenReview: (authenticated, username, extra) for a bearer token.

        ``extra`` carries what the token is bound to; for a pod-bound ServiceAccount token
        that includes ``authentication.kubernetes.io/node-name``.
        """
        spec: dict[str, Any] = {"token": token}
        if audiences:
            spec["audiences"] = list(audiences)
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec}
        result = await self.request("POST", "/apis/authentication.k8s.io/v1/tokenreviews",
                                    body=body)
        status = result.get("status", {})
        user = status.get("user", {})
        extra = {str(k): [str(v) for v in vs] for k, vs in (user.get("extra") or {}).items()}
        return bool(status.get("authenticated")), user.get("username", ""), extra


def _status_reason(data: bytes) -> str:
    try:
        return str(json.loads(data).get("message", ""))[:300]
    except (ValueError, AttributeError):
        return data[:300].decode(errors="replace")


def _classify(status: int, message: str) -> KubeError:
    if status in _TEMPORARY_STATUSES:
        return KubeTemporaryError(message, status=status)
    return KubePermanentError(message, status=status)
