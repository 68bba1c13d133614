"""A real Kubernetes control plane for the test suite: etcd + kube-apiserver on loopback.

Both servers are the real code, built from the ``k8s.io/kubernetes`` and
``go.etcd.io/etcd/server/v3`` Go modules into one binary, ``kube-testenv`` (see
``main.go`` and ``build.sh`` beside this file). :meth:`KubeTestCluster.start` builds it
once (cached under ``$XDG_CACHE_HOME/gpu-supervisor/kube-testenv/``), writes throwaway
certificates, starts etcd and then kube-apiserver on free 127.0.0.1 ports and waits for
``/readyz``. Set ``KUBE_TESTENV_BINARY`` to use a binary built elsewhere.

What the apiserver is configured with, and what that means for tests:

* Authentication: a static bearer token for ``admin`` in group ``system:masters``
  (:attr:`KubeTestCluster.admin_token`), ServiceAccount tokens from the TokenRequest
  API (:meth:`KubeTestCluster.service_account_token`), client certificates signed by
  the cluster CA. TokenReview works, with audience :attr:`KubeTestCluster.audience`.
* Authorization: ``Node,RBAC``. A ServiceAccount has exactly the roles a test binds.
* Admission: the default plugin set **minus ServiceAccount**. No controller-manager
  runs, so nothing creates a namespace's ``default`` ServiceAccount or its tokens; with
  the plugin on, every Pod create would fail with "serviceaccount default not found".
  Consequences: Pods get no service-account token volume injected, and a Pod may name
  a ServiceAccount that does not exist. Everything else (NamespaceLifecycle,
  DefaultTolerationSeconds, TaintNodesByCondition, Priority, ResourceQuota, PodSecurity,
  webhooks, ValidatingAdmissionPolicy, ...) is on, as in a real cluster.
* ``--allow-privileged=true`` as on real clusters, so privileged DaemonSet pods validate.
* No kubelet, scheduler or controllers: Pods stay Pending and unscheduled, Node objects
  exist only if a test creates them (and their status is whatever the test patches),
  Deployments/DaemonSets/LWS create no Pods, deleted namespaces stay Terminating and
  ownerReferences are never garbage-collected (foreground deletion never finishes).
  A test that needs a controller's effect makes it itself.
* etcd runs without fsync (test data is throwaway); its data lives in ``workdir``.

Logs: ``workdir/etcd.log`` and ``workdir/apiserver.log``. Both servers are started in
their own session (Ctrl-C on the test run does not hit them; :meth:`stop` does) and
shut themselves down if the Python process that started them dies.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kubernetes_asyncio.client import ApiClient

HERE = Path(__file__).resolve().parent
BUILD_SCRIPT = HERE / "build.sh"
CRD_DIR = HERE / "crds"  # ours: LeaderWorkerSet (its module is not served here)
UPSTREAM_CRDS_SCRIPT = HERE / "upstream-crds.sh"  # Gateway API, prometheus-operator
KWOK_SCRIPT = HERE / "build-kwok.sh"  # the simulator's kubelets

STARTUP_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
ISSUER = "https://kubernetes.default.svc.cluster.local"
ADMIN_USER = "kube-testenv-admin"
REPORT_AUDIENCE = "gpu-supervisor"  # what the controller asks of report tokens by default
LOG_TAIL_LINES = 40


class KubeTestClusterError(RuntimeError):
    """The test cluster could not be built, started or used."""


def build_binary() -> Path:
    """Run build.sh (a no-op when the binary is cached) and return the binary's path.

    build.sh's progress goes to our stderr; a cold build takes minutes.
    """
    env_bin = os.environ.get("KUBE_TESTENV_BINARY")
    if env_bin:
        path = Path(env_bin)
        if not os.access(path, os.X_OK):
            raise KubeTestClusterError(f"KUBE_TESTENV_BINARY={env_bin} is not an executable")
        return path.resolve()
    try:
        proc = subprocess.run(
            ["bash", str(BUILD_SCRIPT)],
            stdout=subprocess.PIPE,
            stderr=None,
            text=True,
            check=False,
        )
    except OSError as exc:
        raise KubeTestClusterError(f"cannot run {BUILD_SCRIPT}: {exc}") from exc
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise KubeTestClusterError(
            f"{BUILD_SCRIPT} failed with exit code {proc.returncode}; see its output above"
        )
    path = Path(lines[-1])
    if not os.access(path, os.X_OK):
        raise KubeTestClusterError(f"{BUILD_SCRIPT} printed {path}, which is not executable")
    return path


def _script_output(script: Path, env_override: str) -> Path:
    """Run one of our cached-fetch scripts (or take ``env_override``'s path) and return
    the path it printed last."""
    given = os.environ.get(env_override)
    if given:
        return Path(given).resolve()
    try:
        proc = subprocess.run(["bash", str(script)], stdout=subprocess.PIPE, stderr=None,
                              text=True, check=False)
    except OSError as exc:
        raise KubeTestClusterError(f"cannot run {script}: {exc}") from exc
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise KubeTestClusterError(
            f"{script} failed with exit code {proc.returncode}; see its output above")
    return Path(lines[-1])


def build_kwok() -> Path:
    """kwok's binary: built once by build-kwok.sh and cached, or ``KWOK_BINARY``."""
    return _script_output(KWOK_SCRIPT, "KWOK_BINARY")


def crd_files() -> list[Path]:
    """Every CRD the test cluster installs: upstream's Gateway API and prometheus-operator
    CRDs as their Go modules ship them (fetched and cached by upstream-crds.sh, or from
    ``KUBE_TESTENV_CRDS``), and our LeaderWorkerSet."""
    upstream = _script_output(UPSTREAM_CRDS_SCRIPT, "KUBE_TESTENV_CRDS")
    return sorted(upstream.glob("*.yaml")) + sorted(CRD_DIR.glob("*.yaml"))


def _free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held open together so they differ)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"(cannot read {path}: {exc})"
    return "\n".join(data.splitlines()[-lines:])


# Started and not yet stopped; stopped at interpreter exit if a caller forgot.
_live: set[KubeTestCluster] = set()
_live_lock = threading.Lock()


@atexit.register
def _stop_leftovers() -> None:
    with _live_lock:
        clusters = list(_live)
    for cluster in clusters:
        cluster.stop()


class KubeTestCluster:
    """A running etcd + kube-apiserver pair. Use :meth:`start`; always :meth:`stop`."""

    url: str
    ca_file: Path
    admin_token: str
    audience: str
    workdir: Path
    binary: Path
    startup_seconds: float

    def __init__(
        self,
        *,
        workdir: Path,
        binary: Path,
        url: str,
        ca_file: Path,
        admin_token: str,
        etcd: subprocess.Popen[bytes],
        apiserver: subprocess.Popen[bytes] | None,
        logs: list[IO[bytes]],
    ) -> None:
        self.workdir = workdir
        self.binary = binary
        self.url = url
        self.ca_file = ca_file
        self.admin_token = admin_token
        self.audience = ISSUER
        self.startup_seconds = 0.0
        self._etcd = etcd
        self._apiserver = apiserver
        self._logs = logs
        self._components: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._stopped = False
        self._stop_lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def start(cls, workdir: Path, binary: Path | None = None) -> KubeTestCluster:
        """Start etcd then kube-apiserver under ``workdir`` and wait until ready.

        Builds the binary first when ``binary`` is None (see :func:`build_binary`).
        Raises :class:`KubeTestClusterError`, with the last log lines, when a server
        exits or the apiserver is not ready within 60 s (the build is not counted).
        """
        if binary is None:
            binary = build_binary()
        binary = Path(binary).resolve()
        workdir = Path(workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()

        pki = workdir / "pki"
        certs = subprocess.run(
            [str(binary), "certs", str(pki)], capture_output=True, text=True, check=False
        )
        if certs.returncode != 0:
            raise KubeTestClusterError(
                f"{binary} certs failed ({certs.returncode}): {certs.stderr.strip()}"
            )
        admin_token = secrets.token_urlsafe(32)
        tokens = workdir / "tokens.csv"
        tokens.write_text(f'{admin_token},{ADMIN_USER},{ADMIN_USER},"system:masters"\n')
        tokens.chmod(0o600)

        etcd_data = workdir / "etcd-data"
        shutil.rmtree(etcd_data, ignore_errors=True)
        etcd_client, etcd_peer, api_port = _free_ports(3)
        etcd_url = f"http://127.0.0.1:{etcd_client}"
        url = f"https://127.0.0.1:{api_port}"

        env = dict(os.environ)
        env["KUBE_TESTENV_PARENT_PID"] = str(os.getpid())
        etcd_log_path = workdir / "etcd.log"
        api_log_path = workdir / "apiserver.log"
        etcd, etcd_log = _server(
            [str(binary), "etcd", f"--data-dir={etcd_data}",
             f"--listen-client-url={etcd_url}",
             f"--listen-peer-url=http://127.0.0.1:{etcd_peer}"], etcd_log_path, env)
        logs: list[IO[bytes]] = [etcd_log]
        cluster = cls(
            workdir=workdir,
            binary=binary,
            url=url,
            ca_file=pki / "ca.crt",
            admin_token=admin_token,
            etcd=etcd,
            apiserver=None,
            logs=logs,
        )
        with _live_lock:
            _live.add(cluster)
        deadline = t0 + STARTUP_TIMEOUT_S
        try:
            cluster._wait_etcd(etcd_url, deadline)
            cluster._apiserver, api_log = _server(
                [str(binary), "apiserver", *cluster._apiserver_flags(etcd_url, api_port)],
                api_log_path, env)
            logs.append(api_log)
            cluster._wait_apiserver(deadline)
        except BaseException:
            cluster.stop()
            raise
        cluster.startup_seconds = time.monotonic() - t0
        return cluster

    def _apiserver_flags(self, etcd_url: str, port: int) -> list[str]:
        pki = self.workdir / "pki"
        return [
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={port}",
            f"--tls-cert-file={pki / 'server.crt'}",
            f"--tls-private-key-file={pki / 'server.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--etcd-servers={etcd_url}",
            "--authorization-mode=Node,RBAC",
            f"--token-auth-file={self.workdir / 'tokens.csv'}",
            f"--service-account-issuer={ISSUER}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--api-audiences={ISSUER}",
            "--service-cluster-ip-range=10.96.0.0/16",
            "--disable-admission-plugins=ServiceAccount",
            "--allow-privileged=true",
            # The "kubernetes" Service's endpoints would be 127.0.0.1, which Endpoints
            # validation rejects; nothing here routes to it anyway.
            "--endpoint-reconciler-type=none",
            "--profiling=false",
            f"--cert-dir={pki}",
        ]

    def _wait_etcd(self, etcd_url: str, deadline: float) -> None:
        while True:
            self._check_alive()
            try:
                with urllib.request.urlopen(f"{etcd_url}/health", timeout=1) as resp:
                    if json.loads(resp.read()).get("health") == "true":
                        return
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                self._fail(f"etcd not healthy after {STARTUP_TIMEOUT_S:.0f} s")
            time.sleep(0.05)

    def _wait_apiserver(self, deadline: float) -> None:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        req = urllib.request.Request(
            f"{self.url}/readyz", headers={"Authorization": f"Bearer {self.admin_token}"}
        )
        last = "no answer yet"
        while True:
            self._check_alive()
            try:
                with urllib.request.urlopen(req, timeout=2, context=ctx) as resp:
                    body = resp.read().decode("utf-8", "replace")
                    if resp.status == 200 and body.strip() == "ok":
                        return
                    last = f"HTTP {resp.status}: {body[:200]}"
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code}: {exc.read()[:500].decode('utf-8', 'replace')}"
                exc.close()
            except (OSError, ValueError) as exc:
                last = repr(exc)
            if time.monotonic() > deadline:
                self._fail(
                    f"kube-apiserver not ready after {STARTUP_TIMEOUT_S:.0f} s; "
                    f"last /readyz: {last}"
                )
            time.sleep(0.1)

    def run_component(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        """Start one more control-plane process beside the API server (kube-scheduler,
        kube-controller-manager, kwok): its own session, its log at ``workdir/<name>.log``,
        told to exit with us, stopped before the API server by :meth:`stop`."""
        env = dict(os.environ)
        env["KUBE_TESTENV_PARENT_PID"] = str(os.getpid())
        proc, log = _server(args, self.workdir / f"{name}.log", env)
        self._logs.append(log)
        self._components.append((name, proc))
        return proc

    def check_components(self) -> None:
        """Raise :class:`KubeTestClusterError`, with its last log lines, if a component
        started by :meth:`run_component` has exited."""
        for name, proc in self._components:
            if proc.poll() is not None:
                raise KubeTestClusterError(
                    f"{name} exited with code {proc.returncode}\n--- last lines of "
                    f"{self.workdir / (name + '.log')} ---\n"
                    f"{_tail(self.workdir / (name + '.log'))}")

    def _check_alive(self) -> None:
        for name, proc in (("etcd", self._etcd), ("kube-apiserver", self._apiserver)):
            if proc is not None and proc.poll() is not None:
                self._fail(f"{name} exited with code {proc.returncode} during startup")

    def _fail(self, what: str) -> None:
        msg = [f"kube test cluster failed to start: {what}"]
        for name in ("etcd.log", "apiserver.log"):
            path = self.workdir / name
            if path.exists():
                msg.append(f"--- last lines of {path} ---\n{_tail(path)}")
        raise KubeTestClusterError("\n".join(msg))

    def stop(self) -> None:
        """Stop the apiserver, then etcd: SIGTERM, wait, SIGKILL what is left. Idempotent."""
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
            for _, component in reversed(self._components):
                _terminate(component, STOP_TIMEOUT_S)
            for proc in (self._apiserver, self._etcd):
                if proc is not None:
                    _terminate(proc, STOP_TIMEOUT_S)
            for f in self._logs:
                with contextlib.suppress(OSError):
                    f.close()
        with _live_lock:
            _live.discard(self)

    @property
    def running(self) -> bool:
        return not self._stopped

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in (self._etcd, self._apiserver) if p is not None]

    def __enter__(self) -> KubeTestCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ clients

    def write_kubeconfig(self, path: Path, token: str) -> Path:
        """Write a kubeconfig (JSON, which is YAML) for ``token`` against this cluster."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "kube-testenv",
                    "cluster": {
                        "server": self.url,
                        "certificate-authority": str(self.ca_file),
                    },
                }
            ],
            "users": [{"name": "kube-testenv-user", "user": {"token": token}}],
            "contexts": [
                {
                    "name": "kube-testenv",
                    "context": {"cluster": "kube-testenv", "user": "kube-testenv-user"},
                }
            ],
            "current-context": "kube-testenv",
        }
        path.write_text(json.dumps(config, indent=2) + "\n")
        path.chmod(0o600)
        return path

    def client_configuration(self, token: str | None = None) -> Any:
        """A ``kubernetes_asyncio.client.Configuration`` for ``token`` (admin when None)."""
        from kubernetes_asyncio import client

        cfg = client.Configuration()
        cfg.host = self.url
        cfg.ssl_ca_cert = str(self.ca_file)
        cfg.verify_ssl = True
        cfg.api_key = {"BearerToken": token if token is not None else self.admin_token}
        cfg.api_key_prefix = {"BearerToken": "Bearer"}
        return cfg

    async def api_client(self, token: str | None = None) -> ApiClient:
        """A kubernetes_asyncio ApiClient as ``token`` (admin when None). Caller closes it:
        ``async with await cluster.api_client() as api: ...``."""
        from kubernetes_asyncio import client

        return client.ApiClient(configuration=self.client_configuration(token))

    async def ensure_namespace(
        self, namespace: str, *, default_service_account: bool = True
    ) -> None:
        """Create ``namespace`` if missing, and (like the controller-manager would) its
        ``default`` ServiceAccount."""
        from kubernetes_asyncio import client

        async with await self.api_client() as api:
            core = client.CoreV1Api(api)
            await _create_if_missing(
                core.create_namespace(
                    client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace))
                )
            )
            if default_service_account:
                await _create_if_missing(
                    core.create_namespaced_service_account(
                        namespace,
                        client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="default")),
                    )
                )

    async def service_account_token(
        self, namespace: str, name: str, expiration_seconds: int = 3600,
        audiences: list[str] | None = None, bound_to: dict[str, str] | None = None,
    ) -> str:
        """A bound token for ServiceAccount ``namespace/name`` from the TokenRequest API.

        Creates the namespace and the ServiceAccount first if missing (as admin). The
        token's audience is :attr:`audience` (the API server's) unless ``audiences`` says
        otherwise — a report token has ``REPORT_AUDIENCE``, as the kubelet projects it.
        ``bound_to`` is a ``boundObjectRef`` (kind, name, uid; a Pod or a Secret): the
        token dies with that object. The apiserver requires ``expiration_seconds`` >= 600.
        """
        from kubernetes_asyncio import client

        await self.ensure_namespace(namespace)
        async with await self.api_client() as api:
            core = client.CoreV1Api(api)
            await _create_if_missing(
                core.create_namespaced_service_account(
                    namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=name))
                )
            )
            spec: dict[str, Any] = {
                "audiences": audiences or [self.audience],
                "expirationSeconds": expiration_seconds,
            }
            if bound_to is not None:
                spec["boundObjectRef"] = {"apiVersion": "v1", **bound_to}
            body: Any = {"spec": spec}  # a plain dict is sent as it is
            resp = await core.create_namespaced_service_account_token(name, namespace, body)
            token: str = resp.status.token
            return token

    async def service_account_client(
        self, namespace: str, name: str, expiration_seconds: int = 3600
    ) -> ApiClient:
        """An ApiClient acting as ServiceAccount ``namespace/name`` (created if missing)."""
        token = await self.service_account_token(namespace, name, expiration_seconds)
        return await self.api_client(token)

    async def install_crds(self, timeout: float = 30.0) -> None:
        """Create (or update) the CRDs of :func:`crd_files` and wait until they are
        Established."""
        import yaml
        from kubernetes_asyncio import client
        from kubernetes_asyncio.client.exceptions import ApiException

        # Plain dicts are sent as they are (the generated models would drop nothing
        # here, but the YAML is the source of truth).
        docs: list[Any] = []
        for path in crd_files():
            docs.extend(d for d in yaml.safe_load_all(path.read_text())
                        if d and d.get("kind") == "CustomResourceDefinition")
        async with await self.api_client() as api:
            ext = client.ApiextensionsV1Api(api)
            for doc in docs:
                name = doc["metadata"]["name"]
                try:
                    await ext.create_custom_resource_definition(doc)
                except ApiException as exc:
                    if exc.status != 409:
                        raise
                    current = await ext.read_custom_resource_definition(name)
                    meta = {**doc["metadata"], "resourceVersion": current.metadata.resource_version}
                    body: Any = {**doc, "metadata": meta}
                    await ext.replace_custom_resource_definition(name, body)
            deadline = time.monotonic() + timeout
            for doc in docs:
                name = doc["metadata"]["name"]
                while True:
                    crd = await ext.read_custom_resource_definition(name)
                    conds = (crd.status.conditions if crd.status else None) or []
                    if any(c.type == "Established" and c.status == "True" for c in conds):
                        break
                    if time.monotonic() > deadline:
                        raise KubeTestClusterError(
                            f"CRD {name} not Established after {timeout} s: {conds}"
                        )
                    await asyncio.sleep(0.05)


async def _create_if_missing(call: Any) -> None:
    """Await a create call, treating 409 AlreadyExists as success."""
    from kubernetes_asyncio.client.exceptions import ApiException

    try:
        await call
    except ApiException as exc:
        if exc.status != 409:
            raise


def _server(args: list[str], log_path: Path, env: dict[str, str]
            ) -> tuple[subprocess.Popen[bytes], IO[bytes]]:
    """One control-plane process: output to ``log_path``, working directory beside it, in
    its own session (Ctrl-C on the caller does not reach it; stop() does)."""
    log = log_path.open("wb")
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT, env=env, cwd=log_path.parent,
                            start_new_session=True)
    return proc, log


def _terminate(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM the process (and its process group), wait, then SIGKILL."""
    if proc.poll() is not None:
        return
    _signal_group(proc, signal.SIGTERM)
    try:
        proc.wait(timeout)
        return
    except subprocess.TimeoutExpired:
        pass
    print(
        f"kube-testenv: pid {proc.pid} ignored SIGTERM for {timeout:.0f} s, killing",
        file=sys.stderr,
    )
    _signal_group(proc, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)
    # Anything else left in its group (it starts none, but be sure).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    # Each server leads its own session/process group (start_new_session=True).
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
