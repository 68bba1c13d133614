"""Scenarios: a cluster's shape, faults at times, and what must follow.

A scenario is a YAML file, validated like every setting (a mistake is a ``ConfigError``
naming the field, exit 2)::

    name: xid-fatal
    summary: one line, beside the name in --list (default: the description's first sentence)
    description: the story, shown at the start
    cluster: {nodes: 6, gpus_per_node: 8}   # required: nodes; gpus_per_node defaults to 8
    models:
      - name: llama-70b
        replicas: 2            # pipeline groups serving the model
        size: 2                # pods per group, one GPU node each
        kind: lws              # or the name of a group kind from `topology` (below)
        load_seconds: 120s     # a recreated leader's engine loads this long before it serves
                               # (default MODEL_LOAD_SECONDS; `simulate --load-seconds` sets
                               # every stand-in model's). The run starts from a serving
                               # cluster: the first pods are already loaded.
        engine: standin        # or vllm: each group is a real vLLM (CPU build), pipeline
                               # parallel over its pods; it loads as long as it takes, and
                               # load_seconds (default VLLM_LOAD_SECONDS) is only what the
                               # limits allow for it. `simulate --engine vllm` sets the first
                               # model's.
    fallbacks:                 # degrade to a smaller model while too few groups are healthy
      - {name: llama-8b, for: llama-70b, replicas: 2, floor: 2, restore_after: 30s,
         traffic: service}     # or httproute: clients reach the model through an HTTPRoute
    topology:                  # the controller's topology file, for non-LWS group kinds
      group_kinds: [{name: ray-workers, selector: "ray.io/node-type=worker",
                     group_label: "ray.io/group", model: llama-70b}]
    policy: {cooldown: 2m}     # merged over the shipped policy (which runs dry_run: false here)
    settings:                  # merged over the daemons' settings, validated like a config file
      sidecar: {collective: {enabled: true, period_seconds: 3}}
      agent: {detectors: {pcie_width_for_seconds: 10}}
    faults:
      - name: xid-79           # how expectations refer to it
        at: 10s                # after every group serves
        kind: xid              # see FAULT_KINDS
        target: llama-70b/0/1  # model/group/rank: the pod, and for node faults its node
        gpu: 3
        code: 79
        once_serving: false    # true: wait (beyond `at`, up to the group's load_seconds +
                               # 60 s) until the target's group serves, and move the rest of
                               # the run back by as much — for a fault meant to hit a
                               # recovered group, whatever its load took
    expect:
      - fault: xid-79
        detected_within: 2s    # injection → the finding, in the log of the daemon that sees it
        traffic_off_within: 5s # injection → the replica out of its Service's endpoints
        quarantined_within: 5s # injection → the node tainted (or `quarantined: true`, untimed)
        restarted_within: 60s  # injection → the group's pods deleted for recreation
        recovered_within: 120s # injection → the replica back in the endpoints
        capacity_restored_within: 120s  # injection → every group of the model serving again
        quarantined: true      # the node got our taint
        degraded_within: 20s   # injection → the model's Service sends to the fallback
        restored_within: 90s   # injection → back to the model
        crash_loop_within: 60s # injection → the controller names the group's crash loop
        never: [restarted]     # steps that must not happen to this fault's group (also
                               # breaker: the circuit breaker opening, anywhere)
        no_action: false       # true: nothing may happen (a transient that must be ignored)
        keeps_serving: [llama-70b-1]  # groups (<model>-<index>) that must answer requests
                               # throughout: from injection to the end of the run, no 5 s
                               # without an answer from each (the run lasts its duration)
    allow:                     # actions no fault explains that may happen all the same
      - {action: restart, group: llama-70b-1}   # traffic_off/restart: group (<model>-<index>)
      - {action: quarantine}                    # quarantine: node (gpu-N); degrade: model;
                                                # no subject: any
    duration: 180s             # the run stops here at the latest

A recreated group serves again only once its engine has loaded, so ``recovered``,
``capacity_restored`` and ``restored`` limits count the model's ``load_seconds`` on top of
the figure written when the fault's group was recreated, and a run in which a group was
recreated lasts ``load_seconds`` longer: a scenario states what the supervisor controls and
holds at any load time.

Nothing else may happen: every action seen on the API server — a group out of traffic or
restarted, a node quarantined, a model degraded — must be explained by a fault (in that
group, on that node, in a group of that model, injected before it) or allowed by
``allow:``; any other fails the run.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from probes.engine_standin.server import EXECUTE_TIMEOUT_SECONDS
from supervisor.errors import ConfigError

SCENARIOS = Path(__file__).resolve().parent / "scenarios"
# How long a recreated group's engine takes to serve, unless the scenario says: a 70B model
# in BF16 (about 140 GB) split over two H100 nodes by pipeline parallel reads about 70 GB
# per node from local NVMe, about 35 s at 2 GB/s through safetensors; on top of that,
# vLLM's start with warm caches (torch.compile, CUDA graph capture, engine init) took 64 s
# for Llama-3.1-8B on L40S in Tensorfuse's measurements ("Reducing GPU Cold Start Time when
# using vLLM", 2025: weights 18 s, compile 23 s, capture 7 s, init 34 s; 294 s cold). About
# 100 s, rounded up for the larger model's graphs and the NCCL/Gloo rendezvous across nodes.
MODEL_LOAD_SECONDS = 120.0
# What a scenario's limits allow a real vLLM group (the CPU build serving a tiny model,
# pipeline parallel over two pods) to load: 60-150 s measured here, torch.compile of each
# stage included, with the simulated cluster's daemons beside it on two cores.
VLLM_LOAD_SECONDS = 240.0
ENGINES = ("standin", "vllm")
DEFAULT_SCENARIO = "xid-fatal"

# What each fault kind does, and whether it hits the pod's node (agent) or the pod (sidecar).
FAULT_KINDS: dict[str, str] = {
    "xid": "the node's GPU reports an XID event (`code`, default 79: fell off the bus)",
    "gpu_lost": "the node's GPU stops answering NVML as lost",
    "thermal": "the node's GPU runs at `celsius` (default 95) — a thermal slowdown",
    "ecc": "the node's GPU counts `count` (default 1) uncorrectable ECC errors",
    "nvlink_down": "NVLink `link` (default 0) of the node's GPU goes down",
    "nvml_hang": "NVML calls on the node's GPU block for `seconds` (default 60): the GPU "
                 "stops answering",
    "engine_hang": "the pod's part of the engine stops with requests running (an NCCL-style "
                   "hang): the leader's engine stops stepping, or a worker's process is "
                   "stopped (SIGSTOP) and the leader's engine waits for it",
    "engine_crash": "the pod's part of the engine exits: the leader's API server, or a "
                    "worker's process (killed): a lost pipeline stage, for which the "
                    "leader's engine holds its step (a hang, until vLLM's 300 s timeout)",
    "engine_unhealthy": "the leader's engine answers its health check with 503 (target rank "
                        "0: workers have no health endpoint)",
    "engine_resume": "the pod's part of the engine runs again (after engine_hang or "
                     "engine_unhealthy)",
    "clear": "the node's GPU faults stop (the stand-in back to healthy); findings that "
             "last until a reboot stay",
    "node_repair": "the node is repaired and rebooted: GPU faults cleared, agent restarted "
                   "(a new boot); the quarantine is lifted once its findings are gone",
    "partition": "the links between the pod's node and the nodes of the rest of its group "
                 "are cut both ways (iptables on loopback; needs root)",
    "heal": "every cut link works again",
    "kill_leader": "the leading controller replica is killed (SIGKILL)",
    "row_remap": "a row remap on the node's GPU: `state` failure (the default; the GPU needs "
                 "replacing), limit (over the uncorrectable-row limit) or pending (until a "
                 "GPU reset)",
    "retired_pages": "page retirement on the node's GPU: `state` limit (the default; `count` "
                     "pages retired, default 64) or pending (until a GPU reset)",
    "pcie_degraded": "the GPU's PCIe link runs at `width` lanes (default 8) of its 16",
    "pcie_replays": "the GPU's PCIe replay counter climbs `per_minute` (default 600) for as "
                    "long as the fault lasts",
    "ecc_storm": "the GPU counts `per_minute` (default 600) correctable ECC errors for as "
                 "long as the fault lasts",
    "nvlink_errors": "NVLink `link` (default 0) of the GPU counts `per_minute` (default "
                     "60000) CRC errors for as long as the fault lasts",
    "clock_throttle": "the GPU's clocks are held down by `reason` (default hw_slowdown; "
                      "hw_thermal, hw_power_brake, sw_thermal)",
    "driver_error": "the node reboots and its driver does not load: NVML cannot be "
                    "initialised (the agent restarted)",
    "gpu_missing": "the node reboots and its GPU cannot be opened (the agent restarted): "
                   "fewer GPUs than the Node's capacity",
    "collective_hang": "the pod's all-reduce worker stops dead (SIGSTOP): a rank stuck in a "
                       "collective (needs `settings: {sidecar: {collective: {enabled: true}}}`)",
    "collective_slow": "the pod's all-reduce worker runs `share` (default 0.05) of the time "
                       "(stopped and continued every 200 ms): a straggler rank",
    "collective_resume": "the pod's all-reduce worker runs freely again",
    "sidecar_starved": "the pod's sidecar is held to `millicores` (default 50, Kubernetes' "
                       "`50m`) of CPU by a cgroup quota for `seconds` (default 60): a "
                       "container CPU limit beside a busy engine, which must not read as a "
                       "cut (needs root)",
    "app_crash_loop": "the pod's application crashes with XID `code` (default 13) on its GPU "
                      "every `every` seconds (default 10) for `seconds` (default 120), "
                      "wherever it runs: recreated elsewhere, the crashes follow it (an "
                      "application bug in CrashLoopBackOff, not a GPU fault)",
    "gpu_app_xids": "the node's GPU faults whatever application runs on it with XID `code` "
                    "(default 13) every `every` seconds (default 10) for `seconds` (default "
                    "240), while a serving pod is on the node: the XIDs stay with the GPU, "
                    "whichever group it serves",
}
# Faults that go on in the background: their XIDs come every `every` seconds.
REPEATING = frozenset({"app_crash_loop", "gpu_app_xids"})
THROTTLE_BITS = {"hw_slowdown": 0x8, "sw_thermal": 0x20, "hw_thermal": 0x40,
                 "hw_power_brake": 0x80}
# Faults that count an error for as long as they last: (stand-in key, default per minute).
COUNTING = {"pcie_replays": ("pcie.replay", 600.0),
            "ecc_storm": ("ecc.corrected.volatile", 600.0),
            "nvlink_errors": ("nvlink.{link}.crc_flit", 60000.0)}
# Faults found at the agent's start only: the simulator restarts the node's agent.
AT_BOOT = frozenset({"driver_error", "gpu_missing"})
NODE_FAULTS = frozenset({"xid", "gpu_lost", "thermal", "ecc", "nvlink_down", "nvml_hang",
                         "clear", "node_repair", "row_remap", "retired_pages",
                         "pcie_degraded", "clock_throttle", *COUNTING, *AT_BOOT, *REPEATING})
# Faults that stop the replica: a request sent to it before traffic is off is a lost one.
STOPPING = frozenset({"xid", "gpu_lost", "ecc", "nvlink_down", "nvml_hang", "engine_hang",
                      "engine_crash", "engine_unhealthy", "partition", "row_remap",
                      "collective_hang", *AT_BOOT})
COLLECTIVE_FAULTS = frozenset({"collective_hang", "collective_slow", "collective_resume"})
ENGINE_FAULTS = frozenset({"engine_hang", "engine_crash", "engine_unhealthy", "engine_resume"})
POD_FAULTS = frozenset({"engine_hang", "engine_crash", "engine_unhealthy", "engine_resume",
                        "partition", "sidecar_starved",
                        *COLLECTIVE_FAULTS})
# What each fault's parameters may be (beyond name, at, kind, target).
PARAMS = {"gpu", "code", "celsius", "count", "link", "seconds", "state", "width",
          "per_minute", "reason", "share", "every", "millicores"}
STATES = {"row_remap": ("failure", "limit", "pending"), "retired_pages": ("limit", "pending")}
NO_TARGET = frozenset({"kill_leader", "heal"})
# Faults that end earlier ones rather than being faults of their own.
# What a run without the supervisor can play: faults whose effect on the engine is known
# with nothing of ours watching (an XID or a lost GPU as the CUDA error that ends the
# process on it), and the engine's and the network's own.
UNSUPERVISED_FAULTS = frozenset({"xid", "gpu_lost", "engine_hang", "engine_crash",
                                 "engine_resume", "partition", "heal"})
UNSUPERVISED_SLACK_S = 60.0  # after the engine's timeout and a load: restart, scheduling
UNDOING = frozenset({"clear", "node_repair", "heal", "engine_resume", "collective_resume"})
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m)?$")


def seconds(value: Any, where: str) -> float:
    """``10s``, ``2m``, ``500ms`` or a bare number of seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        result = float(value)
    else:
        match = _DURATION.match(str(value).strip())
        if match is None:
            raise ConfigError(where, f"must be a duration like 10s, 2m or 500ms, got {value!r}")
        result = float(match.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}[
            match.group(2)]
    if result < 0:
        raise ConfigError(where, "must not be negative")
    return result


@dataclass(frozen=True, slots=True)
class Model:
    name: str
    replicas: int
    size: int
    kind: str = "lws"
    load_seconds: float = MODEL_LOAD_SECONDS
    engine: str = "standin"  # one of ENGINES


@dataclass(frozen=True, slots=True)
class Fallback:
    """A smaller model served by a Deployment (scaled from 0) while ``for_model`` has
    fewer than ``floor`` healthy groups; back after ``restore_after`` seconds at the floor."""

    name: str
    for_model: str
    replicas: int
    floor: int
    restore_after: float
    # How clients reach the model: "service" (a front Service whose selector the controller
    # moves to the fallback's pods) or "httproute" (a Gateway API HTTPRoute whose backend
    # weights it moves from the model's Service to the fallback's).
    traffic: str = "service"


@dataclass(frozen=True, slots=True)
class Target:
    model: str
    group: int
    rank: int

    def __str__(self) -> str:
        return f"{self.model}/{self.group}/{self.rank}"


@dataclass(frozen=True, slots=True)
class Fault:
    name: str
    at: float
    kind: str
    target: Target | None
    params: dict[str, Any] = field(default_factory=dict)
    once_serving: bool = False  # waits until the target's group serves


TIMED_STEPS = ("detected", "traffic_off", "quarantined", "restarted", "recovered",
               "capacity_restored", "degraded", "restored", "crash_loop")
# Steps that come only once a recreated group has loaded its model: their limits count the
# model's load time on top.
LOADING_STEPS = ("recovered", "capacity_restored", "restored")
# Steps that are only ever expected not to happen (``never:``).
UNTIMED_STEPS = ("breaker",)


@dataclass(frozen=True, slots=True)
class Expectation:
    fault: str
    within: dict[str, float] = field(default_factory=dict)  # step → seconds after injection
    quarantined: bool | None = None
    never: tuple[str, ...] = ()
    no_action: bool = False
    keeps_serving: tuple[str, ...] = ()  # groups that must answer throughout

    def limits(self) -> list[tuple[str, float]]:
        """(step, seconds after injection) for every step this expectation times."""
        return [(step, self.within[step]) for step in TIMED_STEPS if step in self.within]


# What an ``allow:`` entry may name, per action: the kind of thing it is done to.
ALLOWABLE = {"traffic_off": "group", "restart": "group", "quarantine": "node",
             "degrade": "model"}


@dataclass(frozen=True, slots=True)
class Allow:
    """An action the scenario expects although no fault explains it: ``subject`` a group
    (``llama-70b-0``), node (``gpu-3``) or model, or empty for any."""

    action: str
    subject: str = ""

    def covers(self, kind: str, subject: str) -> bool:
        return kind == self.action and self.subject in ("", subject)


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    summary: str  # one line, for --list
    description: str
    nodes: int
    gpus_per_node: int
    models: tuple[Model, ...]
    faults: tuple[Fault, ...]
    expect: tuple[Expectation, ...]
    duration: float
    policy: dict[str, Any] = field(default_factory=dict)
    topology: dict[str, Any] = field(default_factory=dict)
    fallbacks: tuple[Fallback, ...] = ()
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)  # agent/sidecar → mapping
    source: str = ""
    allow: tuple[Allow, ...] = ()

    @property
    def group_names(self) -> list[str]:
        """Every group's name as the simulator prints it: ``<model>-<index>``."""
        return [f"{m.name}-{i}" for m in self.models for i in range(m.replicas)]

    def allows(self, kind: str, subject: str) -> bool:
        return any(a.covers(kind, subject) for a in self.allow)

    @property
    def collective(self) -> bool:
        """Whether the sidecars run the all-reduce checks (which need torch)."""
        sidecar = self.settings.get("sidecar", {})
        return bool(sidecar.get("collective", {}).get("enabled", False))

    def loading(self, load_seconds: float) -> Scenario:
        """This scenario with every stand-in model loading for ``load_seconds`` (a real
        vLLM loads as long as it takes)."""
        return dataclasses.replace(self, models=tuple(
            m if m.engine == "vllm" else dataclasses.replace(m, load_seconds=load_seconds)
            for m in self.models))

    def unsupervised(self) -> Scenario:
        """This scenario, if it can run without the supervisor (``simulate --supervisor
        off``): only faults whose effect without anything of ours watching is known;
        otherwise a ConfigError naming the flag."""
        refused = sorted({f.kind for f in self.faults} - UNSUPERVISED_FAULTS)
        if refused:
            raise ConfigError("--supervisor", "off plays only faults whose effect without a "
                              f"supervisor is known ({', '.join(sorted(UNSUPERVISED_FAULTS))}"
                              f"); {self.name} has {', '.join(refused)}")
        # Long enough to see what today's stack does: its first timer is the engine's own
        # execute-model timeout, then the group's recreation and load.
        load = max(m.load_seconds for m in self.models)
        last = max((f.at for f in self.faults), default=0.0)
        return dataclasses.replace(self, duration=max(
            self.duration, last + EXECUTE_TIMEOUT_SECONDS + load + UNSUPERVISED_SLACK_S))

    def on_engine(self, engine: str) -> Scenario:
        """This scenario with its first model's groups on ``engine`` (``simulate
        --engine``); a ConfigError naming the flag if a fault cannot be done to it."""
        if engine not in ENGINES:
            raise ConfigError("--engine", f"must be one of {', '.join(ENGINES)}, got "
                              f"{engine!r}")
        first = self.models[0]
        if engine == first.engine:
            return self
        load = VLLM_LOAD_SECONDS if engine == "vllm" else MODEL_LOAD_SECONDS
        model = dataclasses.replace(first, engine=engine, load_seconds=load)
        _check_engine(model, self.faults, "--engine")
        return dataclasses.replace(self, models=(model, *self.models[1:]))

    def model(self, name: str) -> Model:
        return next(m for m in self.models if m.name == name)


def _check_engine(model: Model, faults: tuple[Fault, ...], where: str) -> None:
    """Refuse a real-vLLM model that the scenario cannot play on it."""
    if model.engine != "vllm":
        return
    if model.kind != "lws":
        raise ConfigError(where, f"vllm runs LeaderWorkerSet groups only; {model.name} is "
                          f"of kind {model.kind}")
    for fault in faults:
        if fault.target is not None and fault.target.model == model.name and \
                fault.kind == "engine_unhealthy":
            raise ConfigError(where, f"fault {fault.name}: a real vLLM cannot be told to "
                              "answer /health with 503 (engine_unhealthy is the stand-in's)")


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(where, "must be a mapping")
    return value


def _int(obj: dict[str, Any], key: str, where: str, default: int | None = None,
         low: int = 1) -> int:
    value = obj.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}.{key}", f"must be an integer, got {value!r}")
    if value < low:
        raise ConfigError(f"{where}.{key}", f"must be at least {low}")
    return value


def _unknown(obj: dict[str, Any], allowed: set[str], where: str) -> None:
    for key in obj:
        if key not in allowed:
            prefix = f"{where}." if where else ""
            raise ConfigError(f"{prefix}{key}",
                              f"unknown field; known: {', '.join(sorted(allowed))}")


def parse(data: Any, source: str = "<scenario>") -> Scenario:
    """A validated scenario from its parsed YAML."""
    doc = _mapping(data, "<root>")
    _unknown(doc, {"name", "summary", "description", "cluster", "models", "fallbacks", "topology",
                   "policy", "settings", "faults", "expect", "duration", "allow"}, "")
    if "cluster" not in doc:
        raise ConfigError("cluster", "required: the simulated GPU nodes, e.g. {nodes: 6, "
                          "gpus_per_node: 8}")
    cluster = _mapping(doc["cluster"], "cluster")
    _unknown(cluster, {"nodes", "gpus_per_node"}, "cluster")
    if "nodes" not in cluster:
        raise ConfigError("cluster.nodes", "required: how many GPU nodes (one pod each; "
                          "spares for restarts)")
    nodes = _int(cluster, "nodes", "cluster")
    gpus = _int(cluster, "gpus_per_node", "cluster", 8)
    topology = _mapping(doc.get("topology", {}), "topology")
    kinds = {str(k.get("name")) for k in topology.get("group_kinds", []) if isinstance(k, dict)}
    models: list[Model] = []
    raw_models = doc.get("models")
    if not isinstance(raw_models, list) or not raw_models:
        raise ConfigError("models", "must list at least one model")
    for i, raw in enumerate(raw_models):
        where = f"models[{i}]"
        m = _mapping(raw, where)
        _unknown(m, {"name", "replicas", "size", "kind", "load_seconds", "engine"}, where)
        name = str(m.get("name", ""))
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name):
            raise ConfigError(f"{where}.name", "must be a DNS label (lower-case, digits, '-')")
        kind = str(m.get("kind", "lws"))
        if kind != "lws" and kind not in kinds:
            raise ConfigError(f"{where}.kind", f"must be lws or a topology group kind "
                              f"({', '.join(sorted(kinds)) or 'none defined'}), got {kind!r}")
        engine = m.get("engine", "standin")
        if engine not in ENGINES:
            raise ConfigError(f"{where}.engine", f"must be one of {', '.join(ENGINES)}, got "
                              f"{engine!r}")
        default_load = VLLM_LOAD_SECONDS if engine == "vllm" else MODEL_LOAD_SECONDS
        load = seconds(m.get("load_seconds", default_load), f"{where}.load_seconds")
        models.append(Model(name, _int(m, "replicas", where, 2), _int(m, "size", where, 2),
                            kind, load, str(engine)))
    by_name = {m.name: m for m in models}
    fallbacks: list[Fallback] = []
    for i, raw in enumerate(doc.get("fallbacks") or []):
        where = f"fallbacks[{i}]"
        f = _mapping(raw, where)
        _unknown(f, {"name", "for", "replicas", "floor", "restore_after", "traffic"}, where)
        name = str(f.get("name", ""))
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) or name in by_name:
            raise ConfigError(f"{where}.name", "must be a DNS label naming no other model")
        if f.get("for") not in by_name:
            raise ConfigError(f"{where}.for", f"must name a model ({', '.join(by_name)})")
        traffic = f.get("traffic", "service")
        if traffic not in ("service", "httproute"):
            raise ConfigError(f"{where}.traffic", f"must be service or httproute, got "
                              f"{traffic!r}")
        fallbacks.append(Fallback(name, str(f["for"]), _int(f, "replicas", where, 1),
                                  _int(f, "floor", where, 1),
                                  seconds(f.get("restore_after", "1m"),
                                          f"{where}.restore_after"), traffic))
    needed = sum(m.replicas * m.size for m in models) + sum(f.replicas for f in fallbacks)
    if needed > nodes:
        raise ConfigError("cluster.nodes", f"{nodes} nodes cannot hold {needed} pods (one GPU "
                          "node per pod); add nodes, and spares for restarts")
    faults: list[Fault] = []
    for i, raw in enumerate(doc.get("faults") or []):
        where = f"faults[{i}]"
        f = _mapping(raw, where)
        kind = str(f.get("kind"))
        if kind not in FAULT_KINDS:
            raise ConfigError(f"{where}.kind", f"must be one of {', '.join(FAULT_KINDS)}, "
                              f"got {f.get('kind')!r}")
        target: Target | None = None
        if kind not in NO_TARGET:
            target = _target(f.get("target"), f"{where}.target", by_name)
            if kind == "engine_unhealthy" and target.rank != 0:
                raise ConfigError(f"{where}.target", "engine_unhealthy needs a leader (rank "
                                  "0): a worker's engine has no health endpoint")
        params = {k: v for k, v in f.items()
                  if k not in {"name", "at", "kind", "target", "once_serving"}}
        _unknown(params, PARAMS, where)
        _check_params(kind, params, where, gpus)
        once_serving = f.get("once_serving", False)
        if not isinstance(once_serving, bool) or (once_serving and target is None):
            raise ConfigError(f"{where}.once_serving", "must be true or false, and true only "
                              "for a fault with a target")
        faults.append(Fault(str(f.get("name", f"{kind}-{i}")), seconds(f.get("at", 0),
                                                                        f"{where}.at"),
                            str(kind), target, params, once_serving))
    for i, model in enumerate(models):
        _check_engine(model, tuple(faults), f"models[{i}].engine")
    names = [f.name for f in faults]
    if len(set(names)) != len(names):
        raise ConfigError("faults", "fault names must be unique")
    expects: list[Expectation] = []
    for i, raw in enumerate(doc.get("expect") or []):
        where = f"expect[{i}]"
        e = _mapping(raw, where)
        _unknown(e, {"fault", "quarantined", "never", "no_action", "keeps_serving",
                     *(f"{step}_within" for step in TIMED_STEPS)}, where)
        if e.get("fault") not in names:
            raise ConfigError(f"{where}.fault", f"must name a fault ({', '.join(names)})")
        within = {step: seconds(e[f"{step}_within"], f"{where}.{step}_within")
                  for step in TIMED_STEPS if e.get(f"{step}_within") is not None}
        quarantined = e.get("quarantined")
        if quarantined is not None and not isinstance(quarantined, bool):
            raise ConfigError(f"{where}.quarantined", "must be true or false")
        never = e.get("never", [])
        steps = (*TIMED_STEPS, *UNTIMED_STEPS)
        if not isinstance(never, list) or any(s not in steps for s in never):
            raise ConfigError(f"{where}.never", f"must list steps out of {', '.join(steps)}")
        keeps = e.get("keeps_serving", [])
        groups = [f"{m.name}-{g}" for m in models for g in range(m.replicas)]
        if not isinstance(keeps, list) or any(g not in groups for g in keeps):
            raise ConfigError(f"{where}.keeps_serving", f"must list groups out of "
                              f"{', '.join(groups)}, got {keeps!r}")
        expects.append(Expectation(str(e["fault"]), within, quarantined, tuple(never),
                                   bool(e.get("no_action", False)), tuple(keeps)))
    policy = _mapping(doc.get("policy", {}), "policy")
    settings = _settings(doc.get("settings", {}))
    if any(f.kind in COLLECTIVE_FAULTS for f in faults) and not \
            settings.get("sidecar", {}).get("collective", {}).get("enabled"):
        raise ConfigError("settings.sidecar.collective.enabled",
                          "must be true: a collective_* fault needs the all-reduce checks")
    allow = _allow(doc.get("allow", []), models, nodes)
    description = " ".join(str(doc.get("description", "")).split())
    line = doc.get("summary", description.split(". ")[0].rstrip("."))
    if not isinstance(line, str) or "\n" in line.strip():
        raise ConfigError("summary", "must be one line of text")
    return Scenario(
        name=str(doc.get("name", Path(source).stem)), summary=line.strip(),
        description=description, nodes=nodes, gpus_per_node=gpus,
        models=tuple(models), faults=tuple(sorted(faults, key=lambda f: f.at)),
        expect=tuple(expects), duration=seconds(doc.get("duration", "180s"), "duration"),
        policy=policy, topology=topology, fallbacks=tuple(fallbacks), settings=settings,
        source=source, allow=allow)


def _allow(value: Any, models: list[Model], nodes: int) -> tuple[Allow, ...]:
    """``allow: [{action: restart, group: llama-70b-1}, {action: quarantine}]``: actions no
    fault explains that the run may see (an entry without a subject allows any)."""
    if not isinstance(value, list):
        raise ConfigError("allow", "must be a list of {action: ..., group|node|model: ...}")
    subjects = {"group": [f"{m.name}-{i}" for m in models for i in range(m.replicas)],
                "node": [f"gpu-{i}" for i in range(nodes)], "model": [m.name for m in models]}
    out: list[Allow] = []
    for i, raw in enumerate(value):
        where = f"allow[{i}]"
        entry = _mapping(raw, where)
        _unknown(entry, {"action", *subjects}, where)
        action = entry.get("action")
        if action not in ALLOWABLE:
            raise ConfigError(f"{where}.action", f"must be one of {', '.join(ALLOWABLE)}, "
                              f"got {action!r}")
        key = ALLOWABLE[action]
        for other in subjects:
            if other != key and other in entry:
                raise ConfigError(f"{where}.{other}", f"{action} is done to a {key}, not a "
                                  f"{other}")
        subject = entry.get(key, "")
        if key in entry and subject not in subjects[key]:
            raise ConfigError(f"{where}.{key}", f"must be one of "
                              f"{', '.join(subjects[key])}, got {subject!r}")
        out.append(Allow(str(action), str(subject)))
    return tuple(out)


INT_PARAMS = ("gpu", "code", "celsius", "count", "link", "width", "millicores")
NUMBER_PARAMS = ("seconds", "per_minute", "share")


def _check_params(kind: str, params: dict[str, Any], where: str, gpus: int) -> None:
    """Each parameter's value: whole numbers, numbers, names out of a list, fractions; a
    GPU the node has."""
    for key in INT_PARAMS:
        value = params.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 0):
            raise ConfigError(f"{where}.{key}", f"must be a whole number >= 0, got {value!r}")
    for key in NUMBER_PARAMS:
        value = params.get(key)
        if value is not None and (isinstance(value, bool)
                                  or not isinstance(value, int | float) or value < 0):
            raise ConfigError(f"{where}.{key}", f"must be a number >= 0, got {value!r}")
    if params.get("gpu", 0) >= gpus:
        raise ConfigError(f"{where}.gpu", f"the nodes have GPUs 0..{gpus - 1}")
    state = params.get("state")
    if state is not None and kind not in STATES:
        raise ConfigError(f"{where}.state", f"means nothing for {kind}")
    if state is not None and state not in STATES[kind]:
        raise ConfigError(f"{where}.state", f"must be one of {', '.join(STATES[kind])} for "
                          f"{kind}, got {state!r}")
    reason = params.get("reason")
    if reason is not None and reason not in THROTTLE_BITS:
        raise ConfigError(f"{where}.reason", f"must be one of {', '.join(THROTTLE_BITS)}, "
                          f"got {reason!r}")
    every = params.get("every")
    if every is not None and seconds(every, f"{where}.every") <= 0:
        raise ConfigError(f"{where}.every", "must be longer than 0")
    if params.get("millicores") == 0:
        raise ConfigError(f"{where}.millicores", "must be at least 1 (a quota of 0 stops "
                          "the process for good)")
    share = params.get("share")
    if share is not None and not (isinstance(share, int | float) and 0 < share < 1):
        raise ConfigError(f"{where}.share", f"must be a fraction between 0 and 1, got {share!r}")


def _settings(value: Any) -> dict[str, dict[str, Any]]:
    """The scenario's daemon settings, checked now by the same loader the daemons use (a
    mistake exits 2 naming ``settings.<daemon>.<field>``, not a daemon that dies later)."""
    from supervisor import config

    raw = _mapping(value, "settings")
    _unknown(raw, {"agent", "sidecar"}, "settings")
    out: dict[str, dict[str, Any]] = {}
    for daemon, mapping in raw.items():
        out[daemon] = _mapping(mapping, f"settings.{daemon}")
        config.parse(out[daemon], f"settings.{daemon}.")
    return out


def _target(value: Any, where: str, models: dict[str, Model]) -> Target:
    parts = str(value or "").split("/")
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
        raise ConfigError(where, f"must be model/group/rank, e.g. llama-70b/0/1, got {value!r}")
    model = models.get(parts[0])
    if model is None:
        raise ConfigError(where, f"names no model of this scenario ({', '.join(models)})")
    group, rank = int(parts[1]), int(parts[2])
    if group >= model.replicas or rank >= model.size:
        raise ConfigError(where, f"{model.name} has groups 0..{model.replicas - 1} and ranks "
                          f"0..{model.size - 1}")
    return Target(model.name, group, rank)


def load(name_or_path: str) -> Scenario:
    """A shipped scenario by name, or a user's file by path."""
    path = Path(name_or_path)
    if not path.exists():
        shipped = SCENARIOS / f"{name_or_path}.yaml"
        if not shipped.exists():
            raise ConfigError("--scenario", f"no file {name_or_path!r} and no shipped scenario "
                              f"of that name ({', '.join(shipped_names())})")
        path = shipped
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError("--scenario", f"{path} is not valid YAML: {exc}") from None
    except OSError as exc:
        raise ConfigError("--scenario", f"cannot read {path}: {exc.strerror}") from None
    return parse(data, str(path))


def shipped_names() -> list[str]:
    return sorted(p.stem for p in SCENARIOS.glob("*.yaml"))
