"""Settings: a YAML file, then environment overrides, then validation — before anything starts.

Two phases, as in node-problem-detector: every field has a default (with its unit and the
reason for the value in ``metadata["doc"]``); ``load`` applies the file and the environment on
top, checks each value's type and bounds, then runs the cross-field rules in ``validate``.
Every failure is a ``ConfigError`` naming the dotted field and the rule it broke; the CLI
turns it into exit code 2.

Environment overrides use ``GPUSUP_<SECTION>__<FIELD>``
(e.g. ``GPUSUP_NVML__PROBE_INTERVAL_SECONDS=2``); list values are comma-separated.
``NODE_NAME`` (the downward-API convention) sets ``node_name``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from supervisor.errors import ConfigError

ENV_PREFIX = "GPUSUP_"

THROTTLE_REASONS = ("sw_power_cap", "hw_slowdown", "sw_thermal", "hw_thermal", "hw_power_brake")


def setting(default: Any, doc: str, unit: str = "", **rules: Any) -> Any:
    """A dataclass field carrying its documentation and bounds (``gt``, ``ge``, ``choices``)."""
    meta = {"doc": doc, "unit": unit, **rules}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class HttpSettings:
    listen: str = setting("0.0.0.0:8085", "address of /livez, /readyz, /metrics, /status",
                          "host:port")


@dataclass
class NvmlSettings:
    probe_interval_seconds: float = setting(
        1.0, "how often every GPU is sampled; XIDs do not wait for it (event-driven)", "s", gt=0)
    call_timeout_seconds: float = setting(
        5.0, "deadline for one GPU's sample; a miss is a GPUUnresponsive finding", "s", gt=0)
    detail_every: int = setting(
        5, "read slow-moving fields (NVLink state and counters, lifetime ECC, retired pages, "
        "thresholds, rated PCIe limits) every Nth sample; NVLink alone is 20 calls per H100 "
        "(19 link states, one for every link's error totals; 91 where the driver has no "
        "field values)",
        "samples", ge=1)
    event_wait_ms: int = setting(
        500, "how long one XID event wait blocks; bounds how fast the event thread stops",
        "ms", gt=0)
    expected_gpus: int = setting(
        0, "physical GPUs this node should have; fewer visible is a critical gpu_missing "
        "finding. 0 = the Node's GPU feature discovery label nvidia.com/gpu.count (physical "
        "GPUs, shared or not), except under MIG's single strategy; never the "
        "nvidia.com/gpu capacity, which counts time-slicing replicas and MIG devices",
        "GPUs", ge=0)
    init_retry_max_seconds: float = setting(
        60.0, "NVML initialisation is retried with doubling waits up to this long while the "
        "driver is down (the agent stays up and reports it)", "s", gt=0)


@dataclass
class DetectorSettings:
    ecc_uncorrectable_max: int = setting(
        0, "volatile uncorrectable ECC errors tolerated since driver load", "errors", ge=0)
    ecc_correctable_storm_per_minute: float = setting(
        100.0, "correctable ECC errors per minute that count as a storm", "errors/min", gt=0)
    ecc_correctable_storm_for_seconds: float = setting(
        60.0, "how long the storm rate must hold before a finding", "s", ge=0)
    retired_pages_max: int = setting(
        60, "retired pages (SBE+DBE) before a warning; NVIDIA's hard limit is 64", "pages", ge=0)
    row_remap_uncorrectable_max: int = setting(
        512, "uncorrectable remapped rows before the GPU needs replacement", "rows", ge=0)
    thermal_margin_celsius: float = setting(
        5.0, "raise a thermal finding this far below the GPU's own slowdown threshold",
        "°C", ge=0)
    thermal_hysteresis_celsius: float = setting(
        3.0, "the temperature must fall this far below the raise point to clear", "°C", ge=0)
    thermal_for_seconds: float = setting(
        30.0, "how long the temperature must stay high before a finding", "s", ge=0)
    throttle_reasons: list[str] = setting(
        ["hw_slowdown", "hw_thermal", "hw_power_brake", "sw_thermal"],
        "clock event reasons that count as a slowdown fault; sw_power_cap is normal at full "
        "load so it is only a metric by default", "", choices=THROTTLE_REASONS)
    throttle_for_seconds: float = setting(
        15.0, "how long a throttle reason must stay active before a finding", "s", ge=0)
    nvlink_errors_per_second: float = setting(
        100.0, "NVLink CRC+replay+recovery errors per second that count as a storm "
        "(DCGM's CRC limit)", "errors/s", gt=0)
    nvlink_errors_for_seconds: float = setting(
        10.0, "how long the NVLink error rate must hold before a finding", "s", ge=0)
    pcie_width_for_seconds: float = setting(
        30.0, "how long a PCIe link must run below its rated width before a finding", "s", ge=0)
    pcie_generation_check: bool = setting(
        False, "also flag a link below its rated generation; off by default because idle GPUs "
        "legitimately drop to a low generation to save power")
    pcie_generation_for_seconds: float = setting(
        300.0, "how long a link must run below its rated generation before a finding", "s", ge=0)
    pcie_replays_per_minute: float = setting(
        100.0, "PCIe replay counter increments per minute that count as a storm",
        "replays/min", gt=0)
    xid_clear_after_seconds: float = setting(
        600.0, "an XID finding clears after this long without a repeat", "s", gt=0)
    xid_escalation_incidents: int = setting(
        3, "an application-class XID (restart the application, or not in the catalog) that "
        "recurs on one GPU in this many separate incidents within the clear window escalates "
        "to critical (the controller then tells the GPU's fault from the application's by "
        "where it recurs); one burst, however many events, is one incident", "incidents",
        ge=2)
    xid_incident_gap_seconds: float = setting(
        30.0, "XIDs of one code on one GPU closer together than this belong to one incident "
        "(one crashing application emits a burst within a second; restarting it takes "
        "longer)", "s", gt=0)
    xid_ignore: list[int] = setting(
        [], "extra XID codes to ignore on top of NVIDIA's catalog 'ignore' rows", "")


@dataclass
class KubernetesSettings:
    enabled: str = setting(
        "auto", "publish NodeConditions and Events: auto = when running in a cluster or a "
        "kubeconfig is set", "", choices=("auto", "true", "false"))
    kubeconfig: str = setting("", "kubeconfig path; empty = in-cluster config", "path")
    request_timeout_seconds: float = setting(
        10.0, "deadline for one Kubernetes API request", "s", gt=0)
    condition_resync_seconds: float = setting(
        60.0, "re-assert our NodeConditions this often even without a change", "s", gt=0)


@dataclass
class ReportingSettings:
    controller_url: str = setting("", "controller base URL; empty = do not report", "URL")
    controller_addresses: list[str] = setting(
        [], "the controller replicas' IP addresses, each sent its own stream on the URL's "
        "port with the URL's host as the TLS name; empty = every address the URL's host "
        "resolves to (a headless Service lists every replica; outside a cluster, where no "
        "name does, list them here)")
    token_file: str = setting(
        "/var/run/secrets/gpu-supervisor/token",
        "projected ServiceAccount token with the controller's audience, sent as the bearer "
        "token; re-read on every report (the kubelet rotates it)", "path")
    ca_file: str = setting(
        "/etc/gpu-supervisor/report-ca/ca.crt",
        "CA bundle the controller's report certificate is verified with (https URLs); empty "
        "= the system's trust store", "path")
    heartbeat_seconds: float = setting(
        10.0, "send the full state at least this often even without a change", "s", gt=0)
    timeout_seconds: float = setting(5.0, "deadline for one report", "s", gt=0)


ENGINE_PRESETS = ("vllm", "sglang", "trtllm", "nim", "custom")


@dataclass
class EngineSettings:
    enabled: bool = setting(True, "probe the inference engine beside this sidecar")
    preset: str = setting(
        "vllm", "which engine: its health and metrics paths and progress metrics (custom = "
        "the paths and metric lists below, nothing preset)", "", choices=ENGINE_PRESETS)
    url: str = setting("http://127.0.0.1:8000", "the engine's base URL (same pod)", "URL")
    health_path: str = setting("", "override the preset's health path", "path")
    metrics_path: str = setting("", "override the preset's Prometheus metrics path", "path")
    completions_path: str = setting("", "override the preset's completions path", "path")
    inflight_path: str = setting(
        "", "override the preset's path of the API server's own in-flight count (vLLM: "
        "/load, kept with --enable-server-load-tracking), which does not freeze when the "
        "engine does; off = read none", "path")
    running_metrics: list[str] = setting(
        [], "override: metric samples summed as requests running")
    waiting_metrics: list[str] = setting(
        [], "override: metric samples summed as requests waiting")
    progress_metrics: list[str] = setting(
        [], "override: metric samples whose change means the engine made progress")
    probe_seconds: float = setting(
        1.0, "how often /health and the metrics are read", "s", gt=0)
    timeout_seconds: float = setting(
        2.0, "deadline for one /health or metrics request", "s", gt=0)
    failure_threshold: int = setting(
        2, "consecutive failed /health answers before engine_crash or engine_unhealthy",
        "probes", ge=1)
    startup_seconds: float = setting(
        1800.0, "an engine that has never answered /health is loading its model, not "
        "crashed, for this long from the sidecar's first probe (/readyz false meanwhile); "
        "then engine_unhealthy (EngineNeverStarted)", "s", gt=0)
    stall_seconds: float = setting(
        5.0, "requests running (or waiting) while no progress metric moves for this long is "
        "engine_hang; a 200 from /health does not clear it", "s", gt=0)
    stall_step_multiple: float = setting(
        3.0, "the stall window widens to this many times the longest of the engine's last "
        "8 waits between progress moves while busy (a long prefill's chunks slow down as its "
        "context grows)", "x", ge=1)
    canary: bool = setting(
        True, "when idle, send a 1-token completion (token ids, no tokenizer) now and then: "
        "a hang with no requests running has no stall to see")
    canary_idle_seconds: float = setting(
        30.0, "idle this long before a canary is sent", "s", gt=0)
    canary_interval_seconds: float = setting(
        60.0, "at most one canary this often: one 1-token completion a minute while idle",
        "s", gt=0)
    canary_timeout_seconds: float = setting(
        10.0, "a canary that has not answered within this long is engine_hang", "s", gt=0)
    canary_prompt: list[int] = setting([1, 2, 3], "token ids of the canary prompt")
    model: str = setting("", "model name for the canary; empty = the first of /v1/models")


@dataclass
class CollectiveSettings:
    enabled: bool = setting(
        False, "run all-reduce checks across the group (needs torch: the "
        "gpu-supervisor[collective] extra, or collective.python)")
    python: str = setting(
        "", "interpreter of the collective worker (needs torch); empty = the sidecar's own",
        "path")
    backend: str = setting("auto", "auto = NCCL when a GPU is visible, gloo otherwise", "",
                           choices=("auto", "gloo", "nccl"))
    port: int = setting(8089, "TCP port of the rendezvous store on the group's leader", "",
                        gt=0)
    interface: str = setting(
        "", "network interface the collectives use (GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME); "
        "empty = the one the pod's host name resolves to")
    deadline_seconds: float = setting(
        5.0, "deadline of every step: the rendezvous of a check's process group and each "
        "all-reduce; a miss is collective_hang naming the ranks that never finished", "s",
        gt=0)
    sizes_bytes: list[int] = setting(
        [65536, 1048576, 16777216], "message sizes of a full check, from latency-bound to "
        "bandwidth-bound; the largest is compared with the baseline", "bytes")
    periodic_size_bytes: int = setting(
        65536, "message size of the periodic check (cheap: hang and latency only)", "bytes",
        gt=0)
    period_seconds: float = setting(
        60.0, "a periodic check this often (its cost, the duty cycle, is in the README)",
        "s", gt=0)
    full_every: int = setting(
        10, "every Nth periodic check is a full one (every size), which keeps the learned "
        "bandwidth baseline current", "checks", ge=1)
    preflight: bool = setting(
        True, "a full check when the group (re)starts; /readyz is false until it passes")
    baseline_busbw_gbps: float = setting(
        0.0, "expected bus bandwidth at the largest size (e.g. 460 for 8xH100 NVLink); 0 = "
        "learn it from the group's own healthy checks", "GB/s", ge=0)
    learn_checks: int = setting(
        3, "healthy full checks to learn from before the learned baseline is used", "",
        ge=1)
    slow_fraction: float = setting(
        0.5, "a check below this fraction of the baseline is slow (and localized); also "
        "how much slower one half must be than the other to be blamed", "", gt=0)
    clear_after_checks: int = setting(
        2, "healthy full checks in a row before a slow finding clears (a straggler that "
        "passes one check now and then keeps its finding, and the policy's `for:` clock)",
        "", ge=1)
    localize: bool = setting(True, "after a slow or failed full check, find the member "
                             "in O(log n) rounds of sub-group all-reduces")
    on_demand_min_interval_seconds: float = setting(
        30.0, "at most one check on demand (another detector suspecting the group) this "
        "often", "s", gt=0)


@dataclass
class SidecarSettings:
    pod_name: str = setting("", "this pod (env POD_NAME)")
    pod_namespace: str = setting("", "this pod's namespace (env POD_NAMESPACE)")
    group_name: str = setting(
        "", "the group's name; empty = from LeaderWorkerSet's environment or labels")
    group_index: str = setting("", "which group of group_name (LWS group-index)")
    group_size: int = setting(0, "members of the group; 0 = LWS_GROUP_SIZE", "pods", ge=0)
    rank: int = setting(-1, "this member's index in the group; -1 = LWS_WORKER_INDEX", "",
                        ge=-1)
    peers: list[str] = setting(
        [], "every member's address (host or host:port), index = rank; empty = derived from "
        "LWS_LEADER_ADDRESS (the group's headless-service DNS names)")
    leader_address: str = setting("", "the leader's address; empty = LWS_LEADER_ADDRESS")
    peer_listen: str = setting("0.0.0.0:8088", "UDP address of the group heartbeats",
                               "host:port")
    peer_port: int = setting(8088, "UDP port the peers listen on (when peers carry none)",
                             "", gt=0)
    heartbeat_seconds: float = setting(
        0.25, "interval of the UDP heartbeats to every peer", "s", gt=0)
    phi_threshold: float = setting(
        8.0, "accrual failure detector: suspect a peer when phi reaches this (8 = a delay "
        "this long has a 1e-8 chance under the observed heartbeat intervals)", "", gt=0)
    min_std_seconds: float = setting(
        0.05, "floor of the heartbeat-interval deviation the detector assumes", "s", gt=0)
    acceptable_pause_seconds: float = setting(
        0.25, "pause tolerated on top of the observed intervals (GC, scheduling)", "s", ge=0)
    join_seconds: float = setting(
        300.0, "a member never heard since this sidecar started is still joining: the pod "
        "is not ready, but it is no partition finding until this long after the start (the "
        "pods of a group start minutes apart while images pull; a finding would restart a "
        "group still forming)", "s", gt=0)
    confirm_seconds: float = setting(
        1.25, "a suspicion must last this long (while indirect probes run) before it is "
        "a finding: single lost heartbeats never are, nor a sidecar stopped for 1.5 s (a "
        "long GC, a throttled container): ~2 s of silence in all with phi", "s", ge=0)
    indirect_probes: int = setting(
        3, "members asked to probe a suspected peer for us (SWIM ping-req)", "", ge=0)
    local_health_max: int = setting(
        4, "highest local health score: a member that woke late (starved, throttled, "
        "stopped) this many times lately waits 1 + this many times confirm_seconds before "
        "judging peers, and so do the others before judging it", "", ge=0)
    local_health_decay_seconds: float = setting(
        10.0, "the local health score drops by one after this long without a pause", "s",
        gt=0)
    resolve_seconds: float = setting(
        5.0, "re-resolve the peers' DNS names this often (pods restart with new IPs)", "s",
        gt=0)


@dataclass
class ControllerSettings:
    namespace: str = setting("gpu-supervisor", "namespace of the Lease and the state ConfigMap "
                             "(env POD_NAMESPACE)")
    identity: str = setting("", "this replica's name in the Lease; defaults to POD_NAME or the "
                            "hostname")
    lease_name: str = setting("gpu-supervisor-controller", "the Lease the replicas compete for")
    lease_duration_seconds: float = setting(
        15.0, "a standby takes over after the Lease went unrenewed this long", "s", gt=0)
    renew_deadline_seconds: float = setting(
        10.0, "the leader stops acting when it could not renew for this long", "s", gt=0)
    retry_period_seconds: float = setting(2.0, "how often the Lease is renewed or tried", "s",
                                          gt=0)
    state_configmap: str = setting("gpu-supervisor-state",
                                   "ConfigMap holding incidents and action intents")
    state_save_seconds: float = setting(
        5.0, "save the incident state this often when it changed (and at once after an "
        "action), so a new leader's timers continue where the old one's stood", "s", gt=0)
    policy_file: str = setting("", "policy YAML; empty = the shipped policies/default.yaml",
                               "path")
    policy_reload_seconds: float = setting(
        10.0, "check the policy file for changes this often; a bad file keeps the last good "
        "policy", "s", gt=0)
    topology_file: str = setting(
        "", "generic group kinds and degrade targets (YAML); empty = LWS groups only", "path")
    report_listen: str = setting(
        "0.0.0.0:8443", "address of the report endpoint (/v1/reports/*), TLS unless "
        "tls_cert_file is empty", "host:port")
    tls_cert_file: str = setting(
        "/etc/gpu-supervisor/tls/tls.crt", "report endpoint certificate (PEM, from a Secret; "
        "re-read when it changes); empty = plain HTTP, for local experiments only", "path")
    tls_key_file: str = setting("/etc/gpu-supervisor/tls/tls.key",
                                "private key of tls_cert_file (PEM)", "path")
    tls_reload_seconds: float = setting(
        30.0, "check the certificate files for a change (a rotated Secret) this often", "s",
        gt=0)
    allowed_reporters: list[str] = setting(
        ["system:serviceaccount:gpu-supervisor:gpu-supervisor-agent"],
        "identities (from TokenReview; shell patterns) allowed to POST node reports")
    allowed_pod_reporters: list[str] = setting(
        ["system:serviceaccount:*"],
        "identities (shell patterns) allowed to POST pod reports (sidecars run as their "
        "inference pod's ServiceAccount); each may report only for its own pod (the token "
        "must be bound to it)")
    agent_pod_selector: str = setting(
        "", "label selector of the agent pods (in the controller's namespace); set, a node "
        "report's token must be bound to a live agent pod on the node it reports for, and "
        "its stream closes when that pod is deleted. The chart sets its DaemonSet's labels; "
        "empty = any token bound to the node (through a pod, or to the Node itself)")
    token_audiences: list[str] = setting(
        ["gpu-supervisor"], "audiences a report token must carry, checked through "
        "TokenReview; a token for the API server's own audience is refused. Empty = the API "
        "server's audience (not recommended: a stolen report token would then open the API)")
    token_cache_seconds: float = setting(
        300.0, "how long a TokenReview answer is reused (±10 % jitter): 16,384 agents cost "
        "~55 reviews/s", "s", gt=0)
    report_stream_seconds: float = setting(
        1800.0, "a report stream is authenticated once, when it opens, and closed after this "
        "long (±10 %) or when its token expires, whichever comes first; the reporter then "
        "reconnects with its current token (the API server likewise authenticates a watch "
        "once and holds it for up to --min-request-timeout, 1800 s)", "s", gt=0)
    token_reviews_per_second: float = setting(
        100.0, "TokenReviews of tokens not in the cache, per second (bursts of twice that); "
        "over it a report gets 429 and its sender retries later", "1/s", gt=0)
    source_failures_per_second: float = setting(
        5.0, "tokens from one source address that may fail authentication (forged, expired, "
        "for a deleted pod), per second, bursts of twice that; over it the source gets 429 "
        "before any signature is checked, and no one else is slowed", "1/s", gt=0)
    source_reviews_per_second: float = setting(
        20.0, "TokenReviews one source address may cost per second (bursts of twice that), "
        "out of token_reviews_per_second", "1/s", gt=0)
    report_max_bytes: int = setting(1048576, "largest report body accepted", "bytes", gt=0)
    report_read_timeout_seconds: float = setting(
        10.0, "a report body must arrive within this long (408 else)", "s", gt=0)
    report_max_skew_seconds: float = setting(
        30.0, "a report whose sent_at is further than this from the controller's clock is "
        "refused (409): bounds how old a replayed report can be", "s", gt=0)
    crash_loop_window_seconds: float = setting(
        3600.0, "application-class XIDs (13, 31, 43, 45, ...) that follow one group to another "
        "node within this long are the workload's crash loop (workload_crash_loop: no "
        "quarantine, no restart); seen on one GPU under two groups within it, the GPU's",
        "s", gt=0)
    silence_seconds: float = setting(
        35.0, "an agent is silent after this long without a report (3 heartbeats + slack)",
        "s", gt=0)
    quorum_silent_fraction: float = setting(
        0.5, "if more than this fraction of reporting nodes go silent at once, suspect "
        "ourselves (partitioned) and do not act", "", gt=0)
    quorum_min_nodes: int = setting(
        3, "the silent-fraction guard applies from this many reporting nodes", "nodes", ge=1)
    evaluation_interval_seconds: float = setting(
        1.0, "re-evaluate policy at least this often (for: and after: timers)", "s", gt=0)
    wakeup_window_seconds: float = setting(
        0.1, "while busy, the event loop holds I/O after a wake-up for up to this long and "
        "then serves what arrived meanwhile in one pass (an isolated event, a timer or "
        "queued work is never held); 0 = a wake-up per event. ~100 heartbeats a second "
        "(1,024 nodes) cost about three times the CPU served one wake-up each", "s", ge=0)
    wakeup_batch: int = setting(
        10, "events per wake-up the hold aims at, at the measured event rate (so a larger "
        "fleet is held for less than wakeup_window_seconds)", "events", ge=1)
    max_concurrent_actions: int = setting(
        256, "actions carried out at once; a burst of failed groups should all leave traffic "
        "now, the circuit breaker is what limits a storm", "", ge=1)


@dataclass
class Settings:
    node_name: str = setting("", "this node's name (env NODE_NAME); defaults to the hostname")
    log_level: str = setting("info", "log level", "", choices=("debug", "info", "warning",
                                                               "error"))
    shutdown_grace_seconds: float = setting(
        5.0, "how long tasks get to finish after SIGTERM before they are abandoned", "s", gt=0)
    http: HttpSettings = field(default_factory=HttpSettings)
    nvml: NvmlSettings = field(default_factory=NvmlSettings)
    detectors: DetectorSettings = field(default_factory=DetectorSettings)
    kubernetes: KubernetesSettings = field(default_factory=KubernetesSettings)
    reporting: ReportingSettings = field(default_factory=ReportingSettings)
    engine: EngineSettings = field(default_factory=EngineSettings)
    sidecar: SidecarSettings = field(default_factory=SidecarSettings)
    collective: CollectiveSettings = field(default_factory=CollectiveSettings)
    controller: ControllerSettings = field(default_factory=ControllerSettings)

    def validate(self) -> None:
        """Cross-field rules; single-field bounds are checked while loading."""
        for name, value in (("http.listen", self.http.listen),
                            ("controller.report_listen", self.controller.report_listen),
                            ("sidecar.peer_listen", self.sidecar.peer_listen)):
            host, sep, port = value.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
                raise ConfigError(name, f"must be host:port, got {value!r}")
        if bool(self.controller.tls_cert_file) != bool(self.controller.tls_key_file):
            raise ConfigError("controller.tls_key_file",
                              "tls_cert_file and tls_key_file are set together or not at all")
        if self.nvml.call_timeout_seconds > 60:
            raise ConfigError("nvml.call_timeout_seconds", "must be at most 60")
        if self.nvml.event_wait_ms / 1000 > self.shutdown_grace_seconds:
            raise ConfigError("nvml.event_wait_ms",
                              "must be shorter than shutdown_grace_seconds, or the XID "
                              "thread cannot stop in time")
        url = self.reporting.controller_url
        if url and not url.startswith(("http://", "https://")):
            raise ConfigError("reporting.controller_url", f"must be an http(s) URL, got {url!r}")
        for i, address in enumerate(self.reporting.controller_addresses):
            try:
                ipaddress.ip_address(address)
            except ValueError:
                raise ConfigError(f"reporting.controller_addresses[{i}]",
                                  f"must be an IP address, got {address!r}") from None
        c = self.controller
        if not c.lease_duration_seconds > c.renew_deadline_seconds > c.retry_period_seconds:
            raise ConfigError("controller.renew_deadline_seconds",
                              "need lease_duration_seconds > renew_deadline_seconds > "
                              "retry_period_seconds")
        if self.reporting.timeout_seconds > self.reporting.heartbeat_seconds:
            raise ConfigError("reporting.timeout_seconds",
                              "must not exceed reporting.heartbeat_seconds")


def load(path: Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Defaults ← YAML file ← environment, then validation. Raises ``ConfigError``."""
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError("--config", f"cannot read {path}: {exc.strerror}") from exc
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError("--config", f"{path} is not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError("<root>", "the config file must be a mapping of settings")
        raw = loaded
    settings: Settings = _build(Settings, raw, "")
    _apply_env(settings, env)
    if not settings.node_name:
        settings.node_name = os.uname().nodename
    settings.validate()
    return settings


def parse(raw: Mapping[str, Any], prefix: str = "") -> Settings:
    """Settings from an already parsed mapping (no file, no environment), validated; a
    mistake is a ``ConfigError`` naming the field under ``prefix``."""
    settings: Settings = _build(Settings, raw, prefix)
    settings.validate()
    return settings


def _build(cls: type[Any], raw: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            where = f"{prefix}{key}"
            raise ConfigError(where, f"unknown setting (known here: {', '.join(sorted(known))})")
    values: dict[str, Any] = {}
    for name, f in known.items():
        path = f"{prefix}{name}"
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            sub = raw.get(name, {})
            if sub is None:
                sub = {}
            if not isinstance(sub, Mapping):
                raise ConfigError(path, "must be a mapping of settings")
            values[name] = _build(typing.cast(type[Any], hint), sub, f"{path}.")
        elif name in raw:
            values[name] = _coerce(path, raw[name], hint, f.metadata)
    return cls(**values)


def _coerce(path: str, value: Any, hint: Any, meta: Mapping[str, Any]) -> Any:
    origin = typing.get_origin(hint)
    if origin in (list, types.GenericAlias) or origin is list:
        (item_type,) = typing.get_args(hint)
        if isinstance(value, str):  # from the environment: comma-separated
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(path, f"must be a list, got {type(value).__name__}")
        items = [_scalar(f"{path}[{i}]", v, item_type) for i, v in enumerate(value)]
        choices = meta.get("choices")
        for i, item in enumerate(items):
            if choices is not None and item not in choices:
                raise ConfigError(f"{path}[{i}]", f"must be one of {list(choices)}, got {item!r}")
        return items
    result = _scalar(path, value, hint)
    _check_bounds(path, result, meta)
    return result


def _scalar(path: str, value: Any, hint: Any) -> Any:
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(path, f"must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(path, f"must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(path, f"must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(path, f"must be a number, got {value!r}")
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(path, f"must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(path, f"must be a string, got {value!r}")
    raise ConfigError(path, f"unsupported setting type {hint!r}")  # pragma: no cover


def _check_bounds(path: str, value: Any, meta: Mapping[str, Any]) -> None:
    if "gt" in meta and not value > meta["gt"]:
        raise ConfigError(path, f"must be greater than {meta['gt']}, got {value!r}")
    if "ge" in meta and not value >= meta["ge"]:
        raise ConfigError(path, f"must be at least {meta['ge']}, got {value!r}")
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(path, f"must be one of {list(meta['choices'])}, got {value!r}")


def _apply_env(settings: Settings, env: Mapping[str, str]) -> None:
    if env.get("NODE_NAME"):
        settings.node_name = env["NODE_NAME"]
    if env.get("POD_NAMESPACE"):
        settings.controller.namespace = env["POD_NAMESPACE"]
    if env.get("POD_NAME"):
        settings.controller.identity = env["POD_NAME"]
        settings.sidecar.pod_name = env["POD_NAME"]
    if env.get("POD_NAMESPACE"):
        settings.sidecar.pod_namespace = env["POD_NAMESPACE"]
    for key, value in sorted(env.items()):
        if not key.startswith(ENV_PREFIX):
            continue
        parts = key[len(ENV_PREFIX):].lower().split("__")
        target: Any = settings
        path = ""
        for part in parts[:-1]:
            path += f"{part}."
            sub = getattr(target, part, None)
            if sub is None or not dataclasses.is_dataclass(sub):
                raise ConfigError(f"{key}", f"names no settings section ({path.rstrip('.')})")
            target = sub
        name = parts[-1]
        fields = {f.name: f for f in dataclasses.fields(target)}
        if name not in fields or dataclasses.is_dataclass(getattr(target, name)):
            raise ConfigError(key, f"names no setting ({path}{name})")
        hint = typing.get_type_hints(type(target))[name]
        setattr(target, name, _coerce(f"{path}{name} (from {key})", value, hint,
                                      fields[name].metadata))


def reference() -> list[tuple[str, str, str, str]]:
    """Every setting as (dotted name, default, unit, doc), for the README and ``--help``."""
    rows: list[tuple[str, str, str, str]] = []

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                shown = yaml.safe_dump(value, default_flow_style=True).strip()
                shown = shown.removesuffix("...").strip()
                rows.append((f"{prefix}{f.name}", shown, f.metadata.get("unit", ""),
                             f.metadata.get("doc", "")))

    walk(Settings(), "")
    return rows
