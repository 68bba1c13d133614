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

import asyncio
import base64
import contextlib
import datetime as dt
import json
import os
import ssl
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import aiohttp
import yaml

from supervisor.errors import (
    DeadlineExceeded,
    Fenced,
    KubeError,
    KubePermanentError,
    KubeTemporaryError,
)
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


METADATA_ONLY = ("application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1, "
                 "application/json")


class Fence(Protocol):
    """How long the caller may still write to the cluster. ``remaining() <= 0`` means not
    at all: the controller's Lease is gone or about to be (see ``LeaseElector``)."""

    def remaining(self) -> float: ...


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
    # A credential plugin to (re)run: kubectl's exec protocol, run by us.
    exec_plugin: _ExecPlugin | None = None
    # A legacy auth-provider kubeconfig, re-read through kubernetes_asyncio on a 401.
    auth_provider_kubeconfig: str | None = None
    # Files we wrote (inline certificate data): deleted when the client closes.
    temp_files: list[str] = field(default_factory=list)


def _in_cluster() -> _Credentials:
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get(
        "KUBERNETES_SERVICE_PORT", "443")
    if not host:
        raise KubePermanentError("not in a cluster (KUBERNETES_SERVICE_HOST unset) and no "
                                 "kubeconfig given")
    host = f"[{host}]" if ":" in host else host
    return _Credentials(server=f"https://{host}:{port}", ca_file=str(SA_DIR / "ca.crt"),
                        token_file=str(SA_DIR / "token"))


def _private_file(data: bytes, suffix: str, keep: list[str]) -> str:
    """ssl wants certificate and key *files*; keep inline ones in a private temp file that
    the client deletes when it closes."""
    with tempfile.NamedTemporaryFile(prefix="gpusup-", suffix=suffix, delete=False) as handle:
        os.chmod(handle.name, 0o600)
        handle.write(data)
    keep.append(handle.name)
    return handle.name


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line for a YAML error (its repr drags in ``Mark`` objects)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"not valid YAML: {problem}{where}"


def check_kubeconfig(path: str) -> None:
    """Raise ``KubePermanentError`` saying what is wrong with the kubeconfig at ``path``
    (unreadable, not YAML, no such context or cluster), before anything connects."""
    _read_kubeconfig(path)


def _read_kubeconfig(path: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    """(cluster, user, server) of the current context."""
    try:
        # A small local file read once at start-up: blocking is fine here.
        raw = yaml.safe_load(Path(path).read_text())
        contexts = {c["name"]: c["context"] for c in raw.get("contexts") or []}
        current = raw.get("current-context")
        if current not in contexts:
            raise KubePermanentError(f"cannot read kubeconfig {path}: current-context "
                                     f"{current!r} is not among its contexts")
        context = contexts[current]
        clusters = {c["name"]: c["cluster"] for c in raw.get("clusters") or []}
        if context.get("cluster") not in clusters:
            raise KubePermanentError(f"cannot read kubeconfig {path}: cluster "
                                     f"{context.get('cluster')!r} is not among its clusters")
        cluster = clusters[context["cluster"]]
        user = {u["name"]: u.get("user") or {} for u in raw.get("users") or []}.get(
            context.get("user", ""), {})
        server = cluster["server"]
    except OSError as exc:
        raise KubePermanentError(f"cannot read kubeconfig {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise KubePermanentError(f"cannot read kubeconfig {path}: {_yaml_problem(exc)}"
                                 ) from exc
    except (KeyError, TypeError, AttributeError) as exc:
        raise KubePermanentError(f"cannot read kubeconfig {path}: missing or malformed "
                                 f"entry {exc}") from exc
    return cluster, user, server


async def _from_kubeconfig(path: str) -> _Credentials:
    cluster, user, server = _read_kubeconfig(path)
    base = Path(path).parent

    def rel(value: str | None) -> str | None:
        return None if value is None else str(base / value)

    creds = _Credentials(
        server=server, ca_file=rel(cluster.get("certificate-authority")),
        ca_data=cluster.get("certificate-authority-data"),
        insecure=bool(cluster.get("insecure-skip-tls-verify")),
        token=user.get("token"), token_file=rel(user.get("tokenFile")),
        cert_file=rel(user.get("client-certificate")),
        key_file=rel(user.get("client-key")))
    if "client-certificate-data" in user:
        creds.cert_file = _private_file(base64.b64decode(user["client-certificate-data"]),
                                        ".crt", creds.temp_files)
    if "client-key-data" in user:
        creds.key_file = _private_file(base64.b64decode(user["client-key-data"]), ".key",
                                       creds.temp_files)
    if "exec" in user:
        creds.exec_plugin = _ExecPlugin.from_kubeconfig(user["exec"], base, cluster)
    elif "auth-provider" in user:
        creds.auth_provider_kubeconfig = path
        await _apply_auth_provider(creds)
    return creds


async def _apply_auth_provider(creds: _Credentials) -> None:
    """Legacy auth-provider plugins (gcp, oidc, azure) are kubernetes_asyncio's job: let it
    run the provider and hand us the token. (Imported here only: see the module docstring.)
    """
    from kubernetes_asyncio import client, config

    cfg = client.Configuration()
    try:
        await config.load_kube_config(config_file=creds.auth_provider_kubeconfig,
                                      client_configuration=cfg)
    except Exception as exc:  # the loader raises its own zoo; say which kubeconfig failed
        raise KubeTemporaryError(f"auth-provider of {creds.auth_provider_kubeconfig} "
                                 f"failed: {exc}") from exc
    header = (cfg.api_key or {}).get("authorization") or (cfg.api_key or {}).get(
        "BearerToken", "")
    creds.token = str(header).removeprefix("Bearer ").strip() or None


class _ExecPlugin:
    """A kubeconfig ``exec`` credential plugin (EKS's ``aws eks get-token``, GKE's
    ``gke-gcloud-auth-plugin``, ...), run the way kubectl runs it: the command prints an
    ``ExecCredential`` whose token (or client certificate) is used until its
    ``expirationTimestamp``; then, or on a 401, the command runs again."""

    EXPIRY_MARGIN_SECONDS = 30.0
    TIMEOUT_SECONDS = 60.0

    def __init__(self, command: list[str], env: dict[str, str], api_version: str,
                 cluster: Mapping[str, Any] | None) -> None:
        self.command = command
        self.env = env
        self.api_version = api_version
        self.cluster = cluster
        self.token: str | None = None
        self.cert_pem: bytes | None = None
        self.key_pem: bytes | None = None
        self.expires_at: float | None = None  # wall clock; None = until a 401
        self.runs = 0

    @classmethod
    def from_kubeconfig(cls, spec: Mapping[str, Any], base: Path,
                        cluster: Mapping[str, Any]) -> _ExecPlugin:
        command = str(spec["command"])
        # As kubectl: a relative path with a separator is relative to the kubeconfig.
        if os.sep in command and not os.path.isabs(command):
            command = str(base / command)
        env = {str(e["name"]): str(e["value"]) for e in spec.get("env") or []}
        return cls([command, *[str(a) for a in spec.get("args") or []]], env,
                   str(spec.get("apiVersion") or "client.authentication.k8s.io/v1"),
                   dict(cluster) if spec.get("provideClusterInfo") else None)

    def fresh(self) -> bool:
        if self.token is None and self.cert_pem is None:
            return False
        return self.expires_at is None or \
            time.time() < self.expires_at - self.EXPIRY_MARGIN_SECONDS

    async def run(self) -> None:
        spec: dict[str, Any] = {"interactive": False}
        if self.cluster is not None:
            spec["cluster"] = {k: v for k, v in self.cluster.items()
                               if k in ("server", "certificate-authority-data",
                                        "insecure-skip-tls-verify")}
        info = {"apiVersion": self.api_version, "kind": "ExecCredential", "spec": spec}
        env = {**os.environ, **self.env, "KUBERNETES_EXEC_INFO": json.dumps(info)}
        what = f"credential plugin {self.command[0]}"
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.command, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
        except OSError as exc:
            raise KubePermanentError(f"{what} cannot run: {exc.strerror}") from exc
        try:
            out, err = await with_deadline(what, proc.communicate(), self.TIMEOUT_SECONDS)
        except DeadlineExceeded as exc:
            proc.kill()
            await proc.wait()
            raise KubeTemporaryError(str(exc)) from exc
        self.runs += 1
        if proc.returncode != 0:
            raise KubeTemporaryError(f"{what} exited with {proc.returncode}: "
                                     f"{err.decode(errors='replace').strip()[:300]}")
        try:
            status = json.loads(out)["status"]
            expiry = status.get("expirationTimestamp")
            self.expires_at = None if not expiry else dt.datetime.fromisoformat(
                str(expiry).replace("Z", "+00:00")).timestamp()
        except (ValueError, KeyError, TypeError) as exc:
            raise KubePermanentError(f"{what} printed no ExecCredential status: {exc}"
                                     ) from exc
        self.token = status.get("token") or None
        cert, key = status.get("clientCertificateData"), status.get("clientKeyData")
        self.cert_pem = cert.encode() if cert else None
        self.key_pem = key.encode() if key else None
        if self.token is None and self.cert_pem is None:
            raise KubePermanentError(f"{what} returned neither a token nor a certificate")


class _Transport:
    """One aiohttp session to the API server with the credentials applied.

    Credentials that can go stale are renewed: a token file is re-read every minute (the
    kubelet rotates bound tokens), an exec plugin runs again before its credential
    expires, and any of them is renewed at once when the API server answers 401 — after
    which the request is sent once more.
    """

    def __init__(self, creds: _Credentials) -> None:
        self._creds = creds
        self.server = creds.server.rstrip("/")
        self._token: str | None = creds.token
        self._token_read_at = -TOKEN_REREAD_SECONDS
        self._session = self._new_session()
        self._refresh_lock = asyncio.Lock()

    def _new_session(self) -> aiohttp.ClientSession:
        creds = self._creds
        if creds.insecure:
            ctx: ssl.SSLContext | bool = False
        else:
            try:
                ctx = ssl.create_default_context(
                    cafile=creds.ca_file,
                    cadata=base64.b64decode(creds.ca_data).decode() if creds.ca_data else None)
                plugin = creds.exec_plugin
                if plugin is not None and plugin.cert_pem and plugin.key_pem:
                    creds.cert_file = _private_file(plugin.cert_pem, ".crt", creds.temp_files)
                    creds.key_file = _private_file(plugin.key_pem, ".key", creds.temp_files)
                if creds.cert_file and creds.key_file:
                    ctx.load_cert_chain(creds.cert_file, creds.key_file)
            except (OSError, ssl.SSLError, ValueError) as exc:
                raise KubePermanentError(f"cannot set up TLS to {creds.server}: {exc}"
                                         ) from exc
        # trust_env=False: no proxy or netrc look-ups per request (they run in threads).
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx, limit=100),
                                     trust_env=False)

    async def _bearer(self) -> str | None:
        creds = self._creds
        plugin = creds.exec_plugin
        if plugin is not None:
            if not plugin.fresh():
                await self.refresh()
            return plugin.token
        if creds.token_file and time.monotonic() - self._token_read_at > \
                TOKEN_REREAD_SECONDS:
            self._read_token_file()
        return self._token

    def _read_token_file(self) -> None:
        path = self._creds.token_file
        assert path is not None
        try:
            self._token = Path(path).read_text().strip()
            self._token_read_at = time.monotonic()
        except OSError as exc:
            raise KubePermanentError(f"cannot read token {path}: {exc.strerror}") from exc

    async def refresh(self) -> None:
        """Renew the credential now (it expired, or the API server answered 401)."""
        async with self._refresh_lock:
            creds = self._creds
            if creds.exec_plugin is not None:
                had_cert = creds.exec_plugin.cert_pem
                await creds.exec_plugin.run()
                if creds.exec_plugin.cert_pem != had_cert:
                    old, self._session = self._session, self._new_session()
                    await old.close()
            elif creds.auth_provider_kubeconfig is not None:
                await _apply_auth_provider(creds)
                self._token = creds.token
            elif creds.token_file:
                self._read_token_file()

    async def headers(self, content_type: str | None) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        token = await self._bearer()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    @property
    def renewable(self) -> bool:
        creds = self._creds
        return bool(creds.exec_plugin or creds.auth_provider_kubeconfig or creds.token_file)

    async def request(self, method: str, path: str, query: Sequence[tuple[str, str]],
                      body: Any, content_type: str, accept: str | None = None
                      ) -> tuple[int, bytes]:
        data = None if body is None else json.dumps(body).encode()
        for attempt in (1, 2):
            headers = await self.headers(content_type if data is not None else None)
            if accept:
                headers["Accept"] = accept
            async with self._session.request(method, self.server + path, params=list(query),
                                             data=data, headers=headers) as resp:
                status, payload = resp.status, await resp.read()
            if status != 401 or attempt == 2 or not self.renewable:
                return status, payload
            await self.refresh()
        raise AssertionError("unreachable")  # pragma: no cover

    async def stream(self, path: str, query: Sequence[tuple[str, str]], read_timeout: float
                     ) -> aiohttp.ClientResponse:
        for attempt in (1, 2):
            resp = await self._session.get(
                self.server + path, params=list(query), headers=await self.headers(None),
                timeout=aiohttp.ClientTimeout(total=None, sock_read=read_timeout))
            if resp.status != 401 or attempt == 2 or not self.renewable:
                return resp
            resp.release()
            await self.refresh()
        raise AssertionError("unreachable")  # pragma: no cover

    async def close(self) -> None:
        await self._session.close()
        for name in self._creds.temp_files:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)
        self._creds.temp_files.clear()


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
            if creds.exec_plugin is not None:
                await creds.exec_plugin.run()
            return cls(_Transport(creds), timeout)
        except BaseException:
            for name in creds.temp_files:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name)
            raise

    async def close(self) -> None:
        await self._transport.close()

    async def _call(self, what: str, fn: Callable[[], Awaitable[T]], *,
                    retry: bool = True, fence: Fence | None = None) -> T:
        """One request under the deadline and (unless ``retry`` is off) the retry policy.

        With a ``fence``, every attempt first asks how long the caller may still write and
        gives up (``Fenced``) when the answer is no time at all; the attempt's deadline is
        cut to that time, so no attempt — first or retried — outlives the caller's Lease.
        """
        async def once() -> T:
            timeout = self.timeout
            if fence is not None:
                left = fence.remaining()
                if left <= 0:
                    raise Fenced(f"kubernetes {what}: not sent, this replica may no longer "
                                 "write")
                timeout = min(timeout, left)
            try:
                return await with_deadline(f"kubernetes {what}", fn(), timeout)
            except _HttpStatus as exc:
                raise _classify(exc.status, f"kubernetes {what}: {exc}") from exc
            except (aiohttp.ClientError, OSError) as exc:
                raise KubeTemporaryError(f"kubernetes {what}: {exc!r}") from exc

        try:
            return await (call_with_retry(once) if retry else once())
        except DeadlineExceeded as exc:  # not retried: the call may still be under way
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
                      retry: bool = True, ok_statuses: frozenset[int] = frozenset(),
                      fence: Fence | None = None, discard_body: bool = False,
                      accept: str | None = None) -> dict[str, Any]:
        """One API request with JSON in and out. Statuses in ``ok_statuses`` return {}.

        Writes of the controller pass its ``fence`` (see ``_call``). With ``discard_body``
        a success is not parsed — the answer to a pod status patch is the whole Pod, JSON
        the caller never reads and, in a burst of fail-overs, a large share of the CPU — and
        returns a minimal Status instead. ``accept``: a media type other than JSON's
        that the answer comes as (still JSON text, e.g. ``application/jwk-set+json``)."""
        # Asked to discard the answer, ask the API server for the object's metadata only
        # (it transforms write responses as it does reads); plain JSON if it cannot.
        accept = METADATA_ONLY if discard_body else accept

        async def call() -> dict[str, Any]:
            status, data = await self._transport.request(
                method, path, list((query or {}).items()), body, content_type, accept)
            if status in ok_statuses:
                return {}
            if not 200 <= status < 300:
                raise _HttpStatus(status, _status_reason(data))
            if discard_body:
                return {"kind": "Status", "status": "Success", "code": status}
            result: dict[str, Any] = json.loads(data) if data else {}
            return result

        return await self._call(f"{method} {path}", call, retry=retry, fence=fence)

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
            bool, str, dict[str, list[str]], list[str]]:
        """TokenReview: (authenticated, username, extra, audiences) for a bearer token.

        ``extra`` carries what the token is bound to; for a pod-bound ServiceAccount token
        that includes ``authentication.kubernetes.io/node-name``. ``audiences`` are those
        the API server confirmed of the ones asked for (empty if it ignores audiences).
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
        return (bool(status.get("authenticated")), user.get("username", ""), extra,
                [str(a) for a in status.get("audiences") or []])


def _status_reason(data: bytes) -> str:
    try:
        return str(json.loads(data).get("message", ""))[:300]
    except (ValueError, AttributeError):
        return data[:300].decode(errors="replace")


def _classify(status: int, message: str) -> KubeError:
    if status in _TEMPORARY_STATUSES:
        return KubeTemporaryError(message, status=status)
    return KubePermanentError(message, status=status)
