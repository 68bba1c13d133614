"""The Grafana dashboard (deploy/grafana/gpu-supervisor.json) against what really runs.

What this pins down:

* The file is an importable dashboard: valid JSON, ``uid: gpu-supervisor``, a
  ``datasource`` variable every panel and query uses, the ``node`` and ``model`` variables,
  unique panel ids and titles, every query parsed by ``promtool``, every selector naming its
  scrape job, per-node series filtered on the ``node`` target label (never ``instance``),
  rates over ``$__rate_interval``.
* Against real daemons — an agent on the NVML stand-in, a controller on the test
  kube-apiserver, a two-member sidecar group beside a stand-in engine, with all-reduce
  checks — scraped by a real Prometheus with the deployment's scrape jobs and target
  labels: every panel query evaluates and returns series, its legend only names labels the
  query keeps, every metric it names is on the real ``/metrics`` of the job it selects, the
  template variables list the agent's node and the model, and the injected faults show up
  under their node.

Every metric name is checked against a real scrape; none is taken on trust from the source.
Several families exist only under some conditions, so the scenario makes each of them
appear (and waits for it at the daemon before Prometheus is asked):

==========================================  ================================================
family                                      made to appear by
==========================================  ================================================
``findings_raised_total``, ``node_condition``  ECC and thermal faults injected on the agent
``gpu_*`` per-sample gauges and counters    the agent's first NVML sample
``actions_total``, ``decision_latency_*``   the controller failing over / quarantining
``node_silent``                             a node that reported once, then went quiet
``model_degraded``                          a ``degrade`` entry in the policy
``model_*groups``                           LeaderWorkerSet pods labelled with the model
``peer_*``                                  a sidecar group of two
``engine_*``                                a stand-in engine: a canary while idle, then load
``collective_*``                            all-reduce checks (gloo, torch from the cached
                                            vLLM venv) with a configured baseline
==========================================  ================================================

``up`` is made by Prometheus, not exposed by a daemon: it is checked against Prometheus.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from simulator.controlplane.cluster import KubeTestCluster
from simulator.processes import (
    AgentProcess,
    ControllerProcess,
    DaemonProcess,
    EngineProcess,
    SidecarProcess,
    free_port,
    node_report,
    vllm_python,
)
from tests.integration.cluster_objects import agent_token, make_lws_group, make_nodes, unique
from tests.kubeenv import manifests

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "gpu-supervisor.json"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"

AGENT_JOB = "gpu-supervisor-agent"
CONTROLLER_JOB = "gpu-supervisor-controller"
SIDECAR_JOB = "gpu-supervisor-sidecar"
JOBS = (AGENT_JOB, CONTROLLER_JOB, SIDECAR_JOB)
PER_NODE_JOBS = (AGENT_JOB, SIDECAR_JOB)  # targets carry a node label
SUPERVISOR_NS = "gpu-supervisor"
MODEL = "llama-70b"

# What Grafana puts in place of its variables when the test evaluates a query: every node
# and model (the "All" option's allValue), and a rate window wide enough for a 1 s scrape.
GRAFANA_VARIABLES = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h",
                     "__range_s": "3600", "node": ".*", "model": ".*"}
VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")
STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
METRIC = re.compile(r"\b(gpusupervisor_[a-zA-Z0-9_]+|process_[a-zA-Z0-9_]+|up)\b")
SELECTOR = re.compile(r"\b(gpusupervisor_[a-zA-Z0-9_]+|process_[a-zA-Z0-9_]+|up)\b"
                      r"\s*(\{[^}]*\})?")
MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
RANGE_FUNCTION = re.compile(r"\b(rate|irate|increase|delta|deriv)\s*\(")
LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")
# Made by Prometheus for every target, not exposed by any daemon.
SCRAPE_SYNTHETIC = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})
# The one rate that deliberately spans more than $__rate_interval: checks run every
# collective.period_seconds (60 s by default), so a short window shows only spikes.
FIXED_WINDOW_PANELS = {"Collective check duty cycle": "5m"}


# --- reading the dashboard -----------------------------------------------------------------

@dataclass(frozen=True)
class Query:
    panel_id: int
    panel: str
    ref: str
    expr: str
    legend: str

    def __str__(self) -> str:
        return f"panel {self.panel_id} {self.panel!r} query {self.ref}: {self.expr}"


def load_dashboard() -> dict[str, Any]:
    result: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return result


def walk_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, rows included, and the panels nested in collapsed rows."""
    for panel in panels:
        yield panel
        yield from walk_panels(panel.get("panels", []))


def dashboard_queries(dashboard: dict[str, Any]) -> list[Query]:
    return [Query(p["id"], p["title"], t["refId"], t["expr"], t.get("legendFormat", ""))
            for p in walk_panels(dashboard["panels"]) for t in p.get("targets", [])]


def concrete(expr: str, **values: str) -> str:
    """The query as Grafana would send it, with ``values`` overriding the defaults."""
    env = {**GRAFANA_VARIABLES, **values}

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in env, f"unknown dashboard variable ${name} in {expr}"
        return env[name]
    return VARIABLE.sub(substitute, expr)


def metric_names(expr: str) -> set[str]:
    """Metric names a query selects (label values and legends are not looked at)."""
    return set(METRIC.findall(STRING.sub('""', expr)))


def selectors(expr: str) -> list[tuple[str, dict[str, tuple[str, str]]]]:
    """(metric name, {label: (operator, value)}) for every metric a query selects."""
    out = []
    for match in SELECTOR.finditer(expr):
        # Names inside a label value ("...") are not selectors: skip matches in strings.
        if any(s.start() < match.start() < s.end() for s in STRING.finditer(expr)):
            continue
        matchers = {m.group(1): (m.group(2), m.group(3))
                    for m in MATCHER.finditer(match.group(2) or "")}
        out.append((match.group(1), matchers))
    return out


def legend_labels(legend: str) -> set[str]:
    return set(LEGEND_LABEL.findall(legend))


# --- the dashboard file alone -------------------------------------------------------------------

class TestDashboardFile:
    def test_it_is_an_importable_dashboard_with_its_uid_and_variables(self) -> None:
        """Valid JSON with the fixed uid, a modern schema version, and the datasource, node
        and model variables the queries use (node and model multi-valued with All)."""
        dashboard = load_dashboard()
        assert dashboard["uid"] == "gpu-supervisor"
        assert dashboard["schemaVersion"] >= 39
        assert dashboard["title"]
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        assert set(variables) == {"datasource", "node", "model"}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"
        assert variables["node"]["query"] == (
            f'label_values(gpusupervisor_build_info{{job="{AGENT_JOB}"}}, node)')
        assert variables["model"]["query"].startswith("label_values(gpusupervisor_model_groups")
        for name in ("node", "model"):
            var = variables[name]
            assert var["type"] == "query" and var["multi"] and var["includeAll"], name
            assert var["datasource"]["uid"] == "${datasource}", name

    def test_every_panel_has_a_unique_id_a_title_and_the_datasource_variable(self) -> None:
        """Rows and panels (nested ones too) have unique ids and titles; every panel and
        every query reads from ``${datasource}``, so the dashboard works on any Prometheus."""
        panels = list(walk_panels(load_dashboard()["panels"]))
        ids = [p["id"] for p in panels]
        assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(ids)}"
        titles = [p["title"] for p in panels]
        assert all(titles), "a panel without a title"
        assert len(titles) == len(set(titles)), "two panels with the same title"
        for panel in panels:
            if panel["type"] == "row":
                assert not panel.get("targets"), panel["title"]
                continue
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, \
                panel["title"]
            assert panel["targets"], f"{panel['title']} has no query"
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == "${datasource}", panel["title"]
                assert target["expr"].strip(), panel["title"]

    def test_every_selector_names_its_job_and_per_node_ones_filter_on_node(self) -> None:
        """``gpusupervisor_findings`` exists on agents and sidecars alike, so every
        selector names its scrape job. Agent and sidecar series are filtered with
        ``node=~"$node"`` (the target label from the pod's node name) — never by
        ``instance``, which is a pod IP; a controller series may only filter on ``node``
        where that is its own label (``gpusupervisor_node_silent``)."""
        for query in dashboard_queries(load_dashboard()):
            assert "instance" not in query.expr, str(query)
            found = selectors(query.expr)
            assert found, str(query)
            for name, matchers in found:
                assert "job" in matchers and matchers["job"][0] == "=", \
                    f"{name} selected without its job in {query}"
                job = matchers["job"][1]
                assert job in JOBS, f"unknown job {job} in {query}"
                if job in PER_NODE_JOBS:
                    assert matchers.get("node") == ("=~", "$node"), \
                        f"{name} not filtered by node in {query}"
                elif "node" in matchers:
                    assert name == "gpusupervisor_node_silent", str(query)
            if "$node" in query.expr:
                assert query.expr.count("$node") == query.expr.count('node=~"$node"'), \
                    str(query)

    def test_rates_use_the_rate_interval(self) -> None:
        """Every rate-like function spans ``$__rate_interval`` (which Grafana keeps at four
        scrape intervals or more), except the collective duty cycle's deliberate 5m."""
        for query in dashboard_queries(load_dashboard()):
            bare = STRING.sub('""', query.expr)  # label values may hold [...] too
            windows = re.findall(r"\[([^\]]+)\]", bare)
            assert len(windows) == len(RANGE_FUNCTION.findall(bare)), str(query)
            expected = FIXED_WINDOW_PANELS.get(query.panel, "$__rate_interval")
            assert all(w == expected for w in windows), str(query)

    def test_every_query_parses_under_promtool(self, tmp_path: Path) -> None:
        """All queries, with Grafana's variables filled in, as recording rules that
        ``promtool check rules`` accepts: PromQL syntax and types, without a server."""
        queries = dashboard_queries(load_dashboard())
        rules = [{"record": f"dashboard:panel_{q.panel_id}:{q.ref}", "expr": concrete(q.expr)}
                 for q in queries]
        path = tmp_path / "dashboard.rules.yaml"
        path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
        done = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True,
                              text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"SUCCESS: {len(queries)} rules found" in done.stdout


# --- a real Prometheus ----------------------------------------------------------------------------

class PrometheusServer:
    """``/usr/bin/prometheus`` on a loopback port with static scrape jobs."""

    def __init__(self, workdir: Path, scrape_configs: list[dict[str, Any]]) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "prometheus.yml"
        self.config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                       "evaluation_interval": "1s"},
            "scrape_configs": scrape_configs}))
        self.log_path = workdir / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def start(self, timeout: float = 60.0) -> PrometheusServer:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [PROMETHEUS, f"--config.file={self.config}",
                 f"--storage.tsdb.path={self.workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{port}"],
                stdout=log, stderr=subprocess.STDOUT)
        self.wait_for(lambda: self._get("/-/ready")[0] == 200, timeout, "Prometheus ready")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def _get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, exc.read().decode()

    def api(self, path: str, **params: str | list[str]) -> Any:
        """``data`` of a successful API answer; the error otherwise fails the test."""
        code, body = self._get(f"/api/v1/{path}?{urllib.parse.urlencode(params, doseq=True)}")
        answer = json.loads(body)
        assert code == 200 and answer["status"] == "success", \
            f"{path} {params}: HTTP {code} {answer.get('errorType')}: {answer.get('error')}"
        return answer["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's series (vector or scalar answers)."""
        data = self.api("query", query=expr)
        if data["resultType"] == "vector":
            result: list[dict[str, Any]] = data["result"]
            return result
        return [{"metric": {}, "value": data["result"]}]

    def series(self, match: str) -> list[dict[str, str]]:
        result: list[dict[str, str]] = self.api("series", **{"match[]": match})
        return result

    def targets(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.api("targets", state="active")["activeTargets"]
        return result

    def wait_for(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n"
                                   f"{self.log()}")
            with contextlib.suppress(urllib.error.URLError, ConnectionError):
                result = predicate()
                if result:
                    return result
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}:\n{self.log()}")
            time.sleep(0.2)

    def wait_scraped_after(self, started: float, jobs: tuple[str, ...], timeout: float = 60.0
                           ) -> None:
        """Every target of ``jobs`` up, and scraped at least twice since ``started`` (wall
        clock); names the targets that are not, with Prometheus's own error."""
        def fresh() -> bool:
            targets = [t for t in self.targets() if t["labels"]["job"] in jobs]
            if {t["labels"]["job"] for t in targets} != set(jobs):
                return False
            return all(t["health"] == "up" and
                       _rfc3339(t["lastScrape"]) >= started + 2.0 for t in targets)
        try:
            self.wait_for(fresh, timeout, "every target up and scraped")
        except TimeoutError:
            state = [(t["labels"], t["health"], t["lastScrape"], t["lastError"])
                     for t in self.targets()]
            raise TimeoutError(f"targets not up and fresh within {timeout:.0f}s "
                               f"(since {started:.1f}): {state}") from None


def _rfc3339(stamp: str) -> float:
    """Prometheus's lastScrape (RFC 3339 with nanoseconds) as a Unix time."""
    head, _, rest = stamp.partition(".")
    digits = "".join(c for c in rest if c.isdigit())
    zone = rest[len(digits):] or "Z"
    parsed = datetime.fromisoformat(f"{head}.{digits[:6].ljust(6, '0')}"
                                    f"{'+00:00' if zone == 'Z' else zone}")
    return parsed.timestamp()


# --- the daemons ---------------------------------------------------------------------------------

POLICY = f"""
cooldown: 10m
budgets: {{max_groups_disrupted: 4, min_healthy_groups: 0}}
circuit_breaker: {{max_actions: 50, window: 5m}}
rules:
  - name: gpu-fatal
    when: {{fault_classes: [ecc_uncorrectable], min_severity: critical, scope: group, for: 0s}}
    then: [{{action: fail_over}}]
  - name: node-degraded
    when: {{fault_classes: [thermal, clock_throttle], min_severity: warning, scope: node,
           for: 0s}}
    then: [{{action: quarantine}}]
    lift_quarantine: true
degrade:
  - {{model: {MODEL}, fallback: llama-8b, floor: 1, restore_after: 5m}}
"""
# GPU 0: uncorrectable ECC (critical: the group fails over); GPU 1: hot and thermally
# throttled (warnings: the node is quarantined).
AGENT_FAULTS: dict[str, int | str] = {
    "gpu.0.ecc.uncorrected.volatile": 3, "gpu.0.ecc.uncorrected.aggregate": 3,
    "gpu.1.temp": 90, "gpu.1.clocks_event_reasons": 0x40,
}
AGENT_FAULT_CLASSES = {"ecc_uncorrectable", "thermal", "clock_throttle"}


@dataclass
class Cluster:
    controller_kubeconfig: Path
    agent_tokens: dict[str, str]  # node → the report token of an agent pod there
    namespace: str
    nodes: list[str]  # [agent's node, the group's second node, a node that goes silent]
    release: manifests.Release  # the chart's RBAC and names the daemons run with


async def prepare_cluster(cluster: KubeTestCluster, workdir: Path) -> Cluster:
    """The chart's RBAC for agent and controller (their own release), three nodes, two LWS
    groups of the model: group 0 on the agent's node and a second one (the sidecars'
    pods), group 1 on the third node."""
    ns = unique("serving")
    await cluster.ensure_namespace(ns)
    async with await cluster.api_client() as admin:
        release = await manifests.install_rbac(admin, unique("gs"))
        nodes = await make_nodes(admin, 3, prefix="dash")
        await make_lws_group(admin, ns, "llama", 0, nodes[:2], model=MODEL)
        await make_lws_group(admin, ns, "llama", 1, nodes[2:], model=MODEL)
        agent_tokens = {node: await agent_token(admin, release, node)
                        for node in (nodes[0], nodes[2])}
    controller_token = await cluster.service_account_token(
        release.namespace, release.service_account("controller"))
    return Cluster(cluster.write_kubeconfig(workdir / "kubeconfig", controller_token),
                   agent_tokens, ns, nodes, release)


@dataclass
class Stack:
    """The daemons, the Prometheus scraping them, and what the scenario made happen."""

    prometheus: PrometheusServer
    agent: AgentProcess
    controller: ControllerProcess
    sidecars: list[SidecarProcess]
    cluster: Cluster
    exposed: dict[str, set[str]] = field(default_factory=dict)  # job → sample names

    @property
    def agent_node(self) -> str:
        return self.cluster.nodes[0]

    def daemons(self) -> dict[str, list[DaemonProcess]]:
        return {AGENT_JOB: [self.agent], CONTROLLER_JOB: [self.controller],
                SIDECAR_JOB: list(self.sidecars)}


def sample_names(exposition: str) -> set[str]:
    """Every sample name on a /metrics page (``_total``, ``_sum``, ``_count``, ``_bucket``,
    ``_info``, ``_created`` included, as Prometheus stores them)."""
    return {s.name for family in text_string_to_metric_families(exposition)
            for s in family.samples}


def metric(daemon: DaemonProcess, name: str, **labels: str) -> list[float]:
    """Values of ``name``'s samples on the daemon's /metrics whose labels include ``labels``."""
    return [s.value for family in text_string_to_metric_families(daemon.metrics())
            for s in family.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]


def sidecar_settings(rank: int, node: str, pod: str, ns: str, peers: list[str], store: int,
                     torch_python: str, engine: dict[str, Any]) -> dict[str, Any]:
    return {"node_name": node,
            "sidecar": {"pod_name": pod, "pod_namespace": ns, "group_name": "llama",
                        "group_index": "0", "group_size": len(peers), "rank": rank,
                        "peers": peers, "peer_listen": peers[rank]},
            "engine": engine,
            # One full check (the preflight) stays the last one for the whole test, so the
            # leader keeps exporting its bus bandwidth; the configured baseline is exported
            # by every member.
            "collective": {"enabled": True, "python": torch_python, "port": store,
                           "sizes_bytes": [65536, 1048576], "period_seconds": 3600.0,
                           "baseline_busbw_gbps": 0.001, "deadline_seconds": 10.0}}


def run_scenario(stack: Stack, engine: EngineProcess) -> None:
    """Make every family the dashboard reads appear, checking each at the daemon."""
    agent, ctl = stack.agent, stack.controller
    leader, member = stack.sidecars
    ctl.wait_for(lambda: ctl.status()["leader"], what="the controller's leadership")
    ctl.wait_for(lambda: ctl.status()["reports"].get("accepted", 0) >= 1,
                 what="a report from the agent")
    # The third node reports once and then never again: silent after silence_seconds.
    code, body = ctl.post_report(stack.cluster.agent_tokens[stack.cluster.nodes[2]],
                                 node_report(stack.cluster.nodes[2], [], gpus=2))
    assert code == 202, body

    agent.control.update(AGENT_FAULTS)
    for fault_class, gpu in (("ecc_uncorrectable", 0), ("thermal", 1), ("clock_throttle", 1)):
        agent.wait_finding(fault_class, gpu)
    ctl.wait_for(lambda: {"fail_over/done", "quarantine/done"} <= set(ctl.status()["actions"]),
                 timeout=30, what="fail-over and quarantine done")
    ctl.wait_for(lambda: ctl.status()["silent_nodes"] >= 1, what="a silent node")

    leader.wait_for(lambda: leader.status()["engine"]["canaries"].get("ok", 0) >= 1,
                    what="a canary while the engine is idle")
    engine.control(load=2)
    leader.wait_for(lambda: leader.status()["engine"]["seconds_since_progress"] is not None,
                    what="engine progress")
    leader.wait_for(lambda: leader.status()["collective"]["preflight_passed"], timeout=180,
                    what="the preflight all-reduce check")
    assert leader.status()["collective"]["last"]["kind"] == "full"
    member.wait_for(lambda: member.status()["collective"]["preflight_passed"], timeout=60,
                    what="the member's part in the preflight")
    engine.control(unhealthy=True)
    leader.wait_for(lambda: leader.findings("engine_unhealthy"), what="engine_unhealthy")
    for car in (leader, member):
        car.wait_for(functools.partial(metric, car, "gpusupervisor_peer_reachable"),
                     what="the reachability matrix")


@pytest.fixture(scope="module", name="stack")
def _stack(kube_cluster: KubeTestCluster, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("dashboard")
    torch_python = vllm_python()
    cluster = asyncio.run(prepare_cluster(kube_cluster, workdir))
    node_a, node_b, _ = cluster.nodes
    with contextlib.ExitStack() as cleanup:
        ctl = ControllerProcess(workdir / "controller", cluster.controller_kubeconfig,
                                "ctl-dash", policy=POLICY,
                                settings=cluster.release.controller_settings(
                                    silence_seconds=3.0))
        cleanup.callback(ctl.stop)
        ctl.start()

        token_file = workdir / "agent-token"
        token_file.write_text(cluster.agent_tokens[cluster.nodes[0]])
        (workdir / "agent").mkdir()
        agent = AgentProcess(workdir / "agent", gpus=4, node_name=node_a, settings={
            "reporting": {"controller_url": ctl.report_url, "token_file": str(token_file),
                          "ca_file": str(ctl.tls_dir / "ca.crt"), "heartbeat_seconds": 1.0,
                          "timeout_seconds": 1.0}})
        cleanup.callback(agent.stop)
        agent.start()

        engine = EngineProcess(workdir / "engine")
        cleanup.callback(engine.stop)
        engine.start()
        peers = [f"127.0.0.1:{free_port()}" for _ in range(2)]
        store = free_port()
        leader_engine = {"url": engine.url, "probe_seconds": 0.5, "canary_idle_seconds": 1.0,
                         "canary_interval_seconds": 1.0}
        members: list[tuple[str, str, dict[str, Any]]] = [
            ("llama-0", node_a, leader_engine), ("llama-0-1", node_b, {"enabled": False})]
        sidecars = []
        for rank, (pod, node, engine_settings) in enumerate(members):
            car = SidecarProcess(workdir / "sidecars", pod, sidecar_settings(
                rank, node, pod, cluster.namespace, peers, store, torch_python,
                engine_settings))
            cleanup.callback(car.stop)
            sidecars.append(car.start())

        def target(daemon: DaemonProcess, **labels: str) -> dict[str, Any]:
            return {"targets": [daemon.url.removeprefix("http://")], "labels": labels}

        prometheus = PrometheusServer(workdir / "prometheus", [
            {"job_name": AGENT_JOB, "static_configs": [target(
                agent, node=node_a, namespace=SUPERVISOR_NS,
                pod="gpu-supervisor-agent-x7k2p")]},
            {"job_name": CONTROLLER_JOB, "static_configs": [target(
                ctl, namespace=SUPERVISOR_NS, pod="gpu-supervisor-controller-5d9f7-ctl")]},
            {"job_name": SIDECAR_JOB, "static_configs": [
                target(car, node=node, namespace=cluster.namespace, pod=pod)
                for car, (pod, node, _) in zip(sidecars, members, strict=True)]},
        ])
        cleanup.callback(prometheus.stop)
        prometheus.start()

        stack = Stack(prometheus, agent, ctl, sidecars, cluster)
        run_scenario(stack, engine)
        done = time.time()
        stack.exposed = {job: set().union(*(sample_names(d.metrics()) for d in daemons))
                         for job, daemons in stack.daemons().items()}
        prometheus.wait_scraped_after(done, JOBS)
        yield stack


# --- the dashboard against them ---------------------------------------------------------------

@pytest.mark.kube
@pytest.mark.vllm
class TestDashboardAgainstPrometheus:
    def test_every_panel_query_evaluates_and_returns_series(self, stack: Stack) -> None:
        """Each query, with All selected, is accepted by Prometheus's query API and selects
        something: a misspelt metric or label matcher would evaluate to nothing."""
        queries = dashboard_queries(load_dashboard())

        def empty() -> list[str]:
            return [str(q) for q in queries if not stack.prometheus.query(concrete(q.expr))]

        # A counter born at the end of the scenario needs two scrapes before rate() has a
        # value: give the 1 s scrapes that long, then judge.
        with contextlib.suppress(TimeoutError):
            stack.prometheus.wait_for(lambda: not empty(), 15, "every query to select series")
        missing = empty()
        assert not missing, "queries without any series:\n" + "\n".join(missing)
        assert len(queries) >= 60

    def test_every_metric_a_panel_names_is_exposed_by_the_job_it_selects(
            self, stack: Stack) -> None:
        """Every metric name in a query is a sample name on the real /metrics of a daemon of
        the job the selector names (``up`` comes from Prometheus itself), and Prometheus
        stored it under that job."""
        stored = set(stack.prometheus.api("label/__name__/values"))
        missing = []
        for query in dashboard_queries(load_dashboard()):
            for name, matchers in selectors(query.expr):
                job = matchers["job"][1]
                if name in SCRAPE_SYNTHETIC:
                    known = name in stored
                else:
                    known = name in stack.exposed[job] and name in stored
                if not known:
                    missing.append(f"{name} (job {job}) in {query}")
        assert not missing, "\n".join(missing)
        assert {n for q in dashboard_queries(load_dashboard())
                for n in metric_names(q.expr)} <= stored

    def test_every_metric_an_alert_rule_names_is_exposed_by_the_job_it_selects(
            self, stack: Stack) -> None:
        """The alert rules' selectors, like the panels', name series the real daemons of
        that job expose: an alert on a metric nobody exports would never fire."""
        rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "gpu-supervisor.rules.yaml")
                               .read_text())
        missing = []
        for group in rules["groups"]:
            for rule in group["rules"]:
                for name, matchers in selectors(rule["expr"]):
                    job = matchers["job"][1]
                    if name not in SCRAPE_SYNTHETIC and name not in stack.exposed[job]:
                        missing.append(f"{name} (job {job}) in {rule.get('alert')}")
        assert not missing, "\n".join(missing)

    def test_legends_only_name_labels_the_query_keeps(self, stack: Stack) -> None:
        """A ``{{label}}`` in a legend that the aggregation dropped would render empty."""
        wrong = []
        for query in dashboard_queries(load_dashboard()):
            wanted = legend_labels(query.legend)
            for series in stack.prometheus.query(concrete(query.expr)):
                lost = wanted - set(series["metric"])
                if lost:
                    wrong.append(f"{sorted(lost)} not in {series['metric']} of {query}")
                    break
        assert not wrong, "\n".join(wrong)

    def test_template_variables_list_the_agents_node_and_the_model(self, stack: Stack
                                                                   ) -> None:
        """``label_values(metric{...}, label)`` as Grafana runs it (the series API): the
        node variable offers exactly the agent's node, the model variable the model (among
        any others the controller sees in the shared test cluster)."""
        expected = {"node": {stack.agent_node}, "model": {MODEL}}
        for var in load_dashboard()["templating"]["list"]:
            if var["type"] != "query":
                continue
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["query"])
            assert match, var["query"]
            values = {s[match.group(2)] for s in stack.prometheus.series(match.group(1))
                      if match.group(2) in s}
            if var["name"] == "model":
                assert expected["model"] <= values, values
            else:
                assert values == expected[var["name"]], var["name"]

    def test_injected_faults_show_under_their_node(self, stack: Stack) -> None:
        """With the agent's node selected, the findings panel shows the injected classes on
        that node, the GPU panel their GPUs, and the throttle panel HwThermal on GPU 1; a
        node without an agent shows none of it."""
        panels = {q.panel: q for q in dashboard_queries(load_dashboard())}
        prom, node = stack.prometheus, stack.agent_node

        def run(panel: str, selected: str) -> list[dict[str, str]]:
            # One node selected: Grafana puts its name in the regex (DNS names need no
            # escaping there).
            return [s["metric"] for s in prom.query(concrete(panels[panel].expr,
                                                             node=selected))]

        findings = run("Agent findings by fault class and node", node)
        assert {f["fault_class"] for f in findings} >= AGENT_FAULT_CLASSES
        assert {f["node"] for f in findings} == {node}
        gpus = run("GPUs with an active finding", node)
        assert {(g["gpu"], g["fault_class"]) for g in gpus} >= {
            ("0", "ecc_uncorrectable"), ("1", "thermal"), ("1", "clock_throttle")}
        throttles = run("Throttle reasons active", node)
        assert {(t["gpu"], t["reason"]) for t in throttles} == {("1", "hw_thermal")}
        sidecar = run("Sidecar findings by fault class, namespace and pod", node)
        assert ("llama-0", "engine_unhealthy") in {(s["pod"], s["fault_class"])
                                                   for s in sidecar}
        elsewhere = stack.cluster.nodes[1]  # the member sidecar's node: no agent there
        assert run("Agent findings by fault class and node", elsewhere) == []
        assert run("Sidecar findings by fault class, namespace and pod", elsewhere) == []
