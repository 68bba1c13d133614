"""Never the cause of an outage: each way a report could make the controller act without
the evidence behind it, tried as an attacker would, on real processes — a real controller
process on TLS, the chart's RBAC, the real API server, tokens from its TokenRequest API.

Every test here failed on the controller before reports were bound to their senders:
a pod's token got any node quarantined, an unbound token reported for any node, a replay
after a restart failed a healthy group over, a deleted pod's stream spoke for its
same-named successor.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from kubernetes_asyncio import client

from bench.report_flood import forged_token, key_id
from simulator.controlplane.cluster import REPORT_AUDIENCE, KubeTestCluster
from simulator.processes import ControllerProcess, gpu_finding, metric_value, node_report
from supervisor.config import ReportingSettings
from supervisor.controller.actions import QUARANTINE_TAINT
from supervisor.controller.ingest import SENDER_GONE
from tests.integration.cluster_objects import (
    agent_pod,
    finish_deletion,
    list_pods,
    make_lws_group,
    make_nodes,
    mark_running,
    pod_body,
    pod_token,
    unique,
)
from tests.kubeenv import manifests

pytestmark = pytest.mark.kube

ACTING = """
cooldown: 0s
budgets: {max_groups_disrupted: 8, min_healthy_groups: 0}
rules:
  - name: gpu-fatal
    when: {fault_classes: [gpu_lost], min_severity: critical, scope: group, for: 0s}
    then: [{action: fail_over}, {action: quarantine}]
    lift_quarantine: true
  - name: gpu-node
    when: {fault_classes: [gpu_lost], min_severity: critical, scope: node, for: 0s}
    then: [{action: quarantine}]
    lift_quarantine: true
  - name: engine
    when: {fault_classes: [engine_hang, partition, collective_slow], min_severity: warning,
           scope: group, for: 0s}
    then: [{action: fail_over}, {action: quarantine}]
    lift_quarantine: true
"""

FAIL_OVER_ONLY = """
cooldown: 0s
budgets: {max_groups_disrupted: 8, min_healthy_groups: 0}
rules:
  - name: gpu-fatal
    when: {fault_classes: [gpu_lost], min_severity: critical, scope: group, for: 0s}
    then: [{action: fail_over}]
"""


@dataclass
class Env:
    cluster: KubeTestCluster
    admin: client.ApiClient
    kubeconfig: Path
    ns: str
    workdir: Path
    release: manifests.Release
    started: list[ControllerProcess] = field(default_factory=list)

    def controller(self, name: str, policy: str = ACTING, **settings: Any
                   ) -> ControllerProcess:
        ctl = ControllerProcess(self.workdir, self.kubeconfig, name, policy=policy,
                                settings=self.release.controller_settings(**settings))
        self.started.append(ctl)
        return ctl

    async def agent_token(self, node: str) -> str:
        pod = await agent_pod(self.admin, self.release.namespace,
                              self.release.service_account("agent"),
                              self.release.agent_pod_labels(), node)
        return await pod_token(self.admin, pod)


@pytest.fixture(name="env")
async def _env(kube_cluster: KubeTestCluster, tmp_path: Path) -> AsyncIterator[Env]:
    async with await kube_cluster.api_client() as admin:
        release = await manifests.install_rbac(admin, unique("gs"))
        token = await kube_cluster.service_account_token(
            release.namespace, release.service_account("controller"))
        ns = unique("serving")
        await kube_cluster.ensure_namespace(ns)
        env = Env(kube_cluster, admin, kube_cluster.write_kubeconfig(tmp_path / "kc", token),
                  ns, tmp_path, release)
        try:
            yield env
        finally:
            for ctl in env.started:
                await asyncio.to_thread(ctl.stop)


async def until(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = await predicate()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def leading(ctl: ControllerProcess, groups: int = 0) -> None:
    async def ready() -> bool:
        status = await asyncio.to_thread(ctl.status)
        return bool(status["leader"] and status["state_loaded"]
                    and status["groups"] >= groups)
    await until(ready, what="controller leading, state loaded, groups discovered")


async def quarantined(env: Env, node: str) -> bool:
    raw = await client.CoreV1Api(env.admin).read_node(node)
    return any(t.key == QUARANTINE_TAINT for t in raw.spec.taints or [])


async def gates(env: Env) -> set[str]:
    pods = await list_pods(env.admin, env.ns)
    return {c["status"] for p in pods.values() for c in p["status"].get("conditions") or []
            if c["type"] == "gpu-supervisor.io/serving"}


def pod_report(pod: dict[str, Any], findings: list[dict[str, Any]], *,
               sequence: int | None = None, boot: str = "sidecar-boot") -> dict[str, Any]:
    now = time.time()
    return {"kind": "PodReport", "pod": {"namespace": pod["metadata"]["namespace"],
                                         "name": pod["metadata"]["name"]},
            "boot": {"id": boot}, "sequence": sequence or int(now * 1000), "sent_at": now,
            "findings": findings}


def finding(fault_class: str, kind: str, subject: str, *, node: str | None = None,
            severity: str = "critical") -> dict[str, Any]:
    now = time.time()
    return {"fault_class": fault_class, "severity": severity, "detail": "",
            "subject": {"kind": kind, "id": subject, **({"node": node} if node else {})},
            "reason": "Forged", "message": "as an attacker would", "first_seen": now,
            "last_seen": now}


class TestAReportSpeaksOnlyForItsSender:
    async def test_a_pod_token_cannot_get_another_node_quarantined(self, env: Env) -> None:
        """A sidecar's own valid token, reporting ``gpu_lost`` on a GPU of a node outside
        its group (the attack that quarantined any node): refused with 403 naming the
        field, counted, and the node is never quarantined. A finding about a pod of
        another group, or a member placed on the wrong node, is refused the same way."""
        nodes = await make_nodes(env.admin, 3)
        pods = await make_lws_group(env.admin, env.ns, "llama", 0, nodes[:2])
        await make_lws_group(env.admin, env.ns, "other", 0, nodes[2:])
        ctl = env.controller("cross-node").start()
        await leading(ctl, groups=2)
        token = await pod_token(env.admin, pods[0])
        victim = nodes[2]
        path = "/v1/reports/pod"

        code, body = ctl.post_report(token, pod_report(pods[0], [
            finding("gpu_lost", "gpu", f"GPU-{victim}-0", node=victim)]), path=path)
        assert code == 403 and "findings[0].fault_class" in body, body
        code, body = ctl.post_report(token, pod_report(pods[0], [
            finding("partition", "pod", f"{env.ns}/other-0")]), path=path)
        assert code == 403 and "findings[0].subject.id" in body, body
        code, body = ctl.post_report(token, pod_report(pods[0], [
            finding("collective_slow", "pod", f"{env.ns}/llama-0-1", node=victim,
                    severity="warning")]), path=path)
        assert code == 403 and "findings[0].subject.node" in body, body
        metrics = ctl.metrics()
        assert metric_value(metrics, "gpusupervisor_report_findings_refused_total",
                            route="pod", field="fault_class") == 1
        assert metric_value(metrics, "gpusupervisor_report_findings_refused_total",
                            route="pod", field="subject") == 2
        # What a sidecar may say is still heard: its member on node B is slow — and the
        # node quarantined is B's as the Pod watch has it.
        assert ctl.post_report(token, pod_report(pods[0], [
            finding("collective_slow", "pod", f"{env.ns}/llama-0-1", severity="warning")]),
            path=path)[0] == 202
        await until(lambda: quarantined(env, nodes[1]), what="the slow member's node")
        await asyncio.sleep(2)
        assert not await quarantined(env, victim)
        assert not await quarantined(env, nodes[0])

    async def test_the_node_route_refuses_a_token_bound_to_no_node(self, env: Env) -> None:
        """The agent's ServiceAccount token minted unbound used to report for every node:
        now 403; a token bound to a pod that is not one of our agent pods is not taken
        either (503: the ServiceAccount alone proves nothing, and such a pod may just be
        new to the watch); the agent pod's token reports for its node."""
        (node,) = await make_nodes(env.admin, 1)
        await make_lws_group(env.admin, env.ns, "llama", 0, [node])
        ctl = env.controller("unbound").start()
        await leading(ctl, groups=1)
        unbound = await env.cluster.service_account_token(
            env.release.namespace, env.release.service_account("agent"),
            audiences=[REPORT_AUDIENCE])
        code, body = ctl.post_report(unbound, node_report(node, [gpu_finding(node, 0)]))
        assert code == 403 and "names no node" in body, body
        stray = await agent_pod(env.admin, env.release.namespace,
                                env.release.service_account("agent"), {"app": "not-ours"},
                                node)
        code, body = ctl.post_report(await pod_token(env.admin, stray),
                                     node_report(node, [gpu_finding(node, 0)]))
        assert code == 503 and "as an agent pod" in body, body
        await asyncio.sleep(2)
        assert not await quarantined(env, node)
        assert ctl.post_report(await env.agent_token(node), node_report(node, []))[0] == 202
        assert ctl.status()["reports"]["unbound"] == 1


class TestAReplayStaysAReplay:
    async def test_a_report_replayed_after_a_controller_restart_does_nothing(
            self, env: Env) -> None:
        """A critical report, then a healthy one; the controller restarts; the critical
        report, sent again seconds later, is accepted for freshness but held — it was made
        for the previous process (its epoch) — and the healthy group stays in traffic. A
        critical report made for the new process still acts."""
        nodes = await make_nodes(env.admin, 2)
        await make_lws_group(env.admin, env.ns, "llama", 0, nodes)
        ctl = env.controller("replay", policy=FAIL_OVER_ONLY)
        ctl.start()
        await leading(ctl, groups=1)
        token = await env.agent_token(nodes[1])
        critical = node_report(nodes[1], [gpu_finding(nodes[1], 3)], epoch=ctl.epoch())
        assert ctl.post_report(token, critical)[0] == 202
        await until(lambda: _eq(gates(env), {"False"}), what="group failed over")
        assert ctl.post_report(token, node_report(nodes[1], []))[0] == 202
        await until(lambda: _eq(gates(env), {"True"}), what="group back in traffic")

        ctl.stop()
        ctl.start()
        await leading(ctl, groups=1)
        code, body = ctl.post_report(token, critical)  # the very same bytes, seconds later
        assert code == 202 and json.loads(body)["held"] is True, body
        await asyncio.sleep(3)
        assert await gates(env) == {"True"}
        assert ctl.status()["reports_held"] == 1
        fresh = node_report(nodes[1], [gpu_finding(nodes[1], 3)])  # gets the new epoch
        assert ctl.post_report(token, fresh)[0] == 202
        await until(lambda: _eq(gates(env), {"False"}), what="a fresh fault still acts")


async def _eq(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


async def _open_stream(ctl: ControllerProcess, session: aiohttp.ClientSession, token: str,
                       path: str) -> tuple[aiohttp.ClientWebSocketResponse, str]:
    url = "wss" + ctl.report_url.removeprefix("https") + path + "/stream"
    ws = await session.ws_connect(url, ssl=ctl.tls, headers={
        "Authorization": f"Bearer {token}"})
    hello = await ws.receive_json(timeout=5)
    assert hello["kind"] == "Hello"
    return ws, str(hello["epoch"])


class TestStreamsBelongToAPod:
    async def test_a_deleted_pods_stream_is_closed_and_its_token_speaks_for_nobody(
            self, env: Env) -> None:
        """A sidecar's stream closes (4001) as soon as its pod is deleted, and the pod's
        token — still valid at the API server for a while, and cached by us — is refused;
        the same for an agent pod's stream."""
        nodes = await make_nodes(env.admin, 2)
        pods = await make_lws_group(env.admin, env.ns, "llama", 0, nodes)
        ctl = env.controller("deleted").start()
        await leading(ctl, groups=1)
        sidecar = await pod_token(env.admin, pods[1])
        agent = await agent_pod(env.admin, env.release.namespace,
                                env.release.service_account("agent"),
                                env.release.agent_pod_labels(), nodes[0])
        agent_token = await pod_token(env.admin, agent)
        async with aiohttp.ClientSession() as session:
            pod_ws, epoch = await _open_stream(ctl, session, sidecar, "/v1/reports/pod")
            node_ws, _ = await _open_stream(ctl, session, agent_token, "/v1/reports/node")
            async with pod_ws, node_ws:
                await pod_ws.send_json({**pod_report(pods[1], []), "epoch": epoch})
                assert (await pod_ws.receive_json(timeout=5))["status"] == 202
                await finish_deletion(env.admin, env.ns, pods[1]["metadata"]["name"])
                closed = await pod_ws.receive(timeout=10)
                assert closed.type == aiohttp.WSMsgType.CLOSE and closed.data == SENDER_GONE
                await finish_deletion(env.admin, env.release.namespace,
                                      agent["metadata"]["name"])
                closed = await node_ws.receive(timeout=10)
                assert closed.type == aiohttp.WSMsgType.CLOSE and closed.data == SENDER_GONE
        code, _ = ctl.post_report(sidecar, pod_report(pods[1], [
            finding("engine_hang", "pod", f"{env.ns}/{pods[1]['metadata']['name']}")]),
            path="/v1/reports/pod")
        assert code != 202
        code, _ = ctl.post_report(agent_token, node_report(nodes[0], [
            gpu_finding(nodes[0], 0)]))
        assert code != 202
        assert await gates(env) == {"True"}

    async def test_a_same_named_replacement_pod_is_a_new_sender(self, env: Env) -> None:
        """LWS recreates a member under the same name. The old pod's stream — whose
        findings were once mapped by name onto whatever pod now has it — is closed, and
        what it sends is not the new pod's: the group stays in traffic while the new pod
        reports healthy, and fails over only on the new pod's own finding."""
        nodes = await make_nodes(env.admin, 2)
        pods = await make_lws_group(env.admin, env.ns, "llama", 0, nodes)
        ctl = env.controller("same-name").start()
        await leading(ctl, groups=1)
        old_token = await pod_token(env.admin, pods[1])
        name = pods[1]["metadata"]["name"]
        hang = [finding("engine_hang", "pod", f"{env.ns}/{name}")]
        async with aiohttp.ClientSession() as session:
            old_ws, epoch = await _open_stream(ctl, session, old_token, "/v1/reports/pod")
            async with old_ws:
                await old_ws.send_json({**pod_report(pods[1], [], boot="old"), "epoch": epoch})
                assert (await old_ws.receive_json(timeout=5))["status"] == 202
                await finish_deletion(env.admin, env.ns, name)
                closing = await old_ws.receive(timeout=10)
                assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == SENDER_GONE
        core = client.CoreV1Api(env.admin)  # LWS, recreating the member
        new = env.admin.sanitize_for_serialization(await core.create_namespaced_pod(
            env.ns, pod_body(name, nodes[1], pods[1]["metadata"]["labels"])))
        await mark_running(core, env.ns, name)
        assert new["metadata"]["uid"] != pods[1]["metadata"]["uid"]
        new_token = await pod_token(env.admin, new)

        async def new_pod_heard() -> bool:
            return ctl.post_report(new_token, pod_report(new, [], boot="new"),
                                   path="/v1/reports/pod")[0] == 202
        await until(new_pod_heard, what="the new pod's sidecar heard")
        # The old sidecar, still running somewhere, says the pod (by its name) hangs.
        code, body = ctl.post_report(old_token, pod_report(pods[1], hang, boot="old"),
                                     path="/v1/reports/pod")
        assert code != 202, body
        await asyncio.sleep(2)
        assert await gates(env) == {"True"}
        assert ctl.post_report(new_token, pod_report(new, hang, boot="new"),
                               path="/v1/reports/pod")[0] == 202
        await until(lambda: _eq(gates(env), {"False"}), what="the new pod's own hang")


class TestForgedTokens:
    async def test_fresh_agents_connect_while_forged_tokens_flood_in(self, env: Env) -> None:
        """While one address floods the controller with forged tokens (the cluster's key
        id, our audience, bad signatures), 20 agents that have never connected — each from
        its own address, each token new to the controller — open their streams and have
        their first report accepted within the agent's own report deadline; the flood
        costs no TokenReview. (How fast: ``python -m bench report_flood``.)"""
        nodes = await make_nodes(env.admin, 20)
        ctl = env.controller("forgery").start()
        await leading(ctl)
        tokens = [await env.agent_token(node) for node in nodes]
        kid = key_id(tokens[0])
        stop = asyncio.Event()
        url = ctl.report_url + "/v1/reports/node"
        sent = 0

        async def flood() -> None:
            nonlocal sent
            connector = aiohttp.TCPConnector(ssl=ctl.tls, limit=20,
                                             local_addr=("127.0.0.9", 0))
            body = json.dumps(node_report(nodes[0], []))
            async with aiohttp.ClientSession(connector=connector) as session:
                async def one(i: int) -> None:
                    async with session.post(url, data=body, headers={
                            "Authorization": f"Bearer {forged_token(i, kid)}",
                            "Content-Type": "application/json"}) as resp:
                        await resp.read()
                serial = 0
                while not stop.is_set():
                    await asyncio.gather(*(one(serial + i) for i in range(20)))
                    serial += 20
                    sent = serial

        # What an agent allows itself to connect and report (reporting.timeout_seconds).
        deadline = aiohttp.ClientTimeout(total=ReportingSettings().timeout_seconds)

        async def fresh_agent(i: int) -> None:
            connector = aiohttp.TCPConnector(ssl=ctl.tls, local_addr=(f"127.0.1.{i + 1}", 0))
            async with aiohttp.ClientSession(connector=connector, timeout=deadline) as session:
                ws, epoch = await _open_stream(ctl, session, tokens[i], "/v1/reports/node")
                async with ws:
                    await ws.send_json(node_report(nodes[i], [], epoch=epoch))
                    answer = await ws.receive_json(timeout=deadline.total)
                    assert answer["status"] == 202

        flooding = asyncio.create_task(flood())
        try:
            await until(lambda: _true(sent >= 200), what="the flood under way")
            for i in range(20):
                await fresh_agent(i)
        finally:
            stop.set()
            await flooding
        status = ctl.status()
        assert status["token_reviews"] == 20  # the fresh agents'; the forgeries cost none
        assert status["tokens_forged"] + status["tokens_source_throttled"] >= sent


async def _true(value: bool) -> bool:
    return value


class TestTheSupervisorWatchesItself:
    async def test_a_starved_controller_says_it_is_behind(self, env: Env) -> None:
        """The controller process stopped for 3 s (as a CPU limit or a long pause would):
        afterwards its /status says it is behind, naming its event loop, the metric says
        1 and the loop-lag histogram holds the stall; a controller that keeps up says
        nothing."""
        import os
        import signal

        ctl = env.controller("starved").start()
        await leading(ctl)
        assert ctl.status()["behind"] == []
        assert metric_value(ctl.metrics(), "gpusupervisor_controller_behind") == 0
        assert ctl.proc is not None
        os.kill(ctl.proc.pid, signal.SIGSTOP)
        await asyncio.sleep(3)
        os.kill(ctl.proc.pid, signal.SIGCONT)

        async def behind() -> list[str]:
            return list((await asyncio.to_thread(ctl.status))["behind"])
        (why,) = await until(behind, what="the controller saying it is behind")
        assert why.startswith("event loop: ")
        assert float(why.split(": ")[1].split(" ")[0]) >= 2.0
        metrics = ctl.metrics()
        assert metric_value(metrics, "gpusupervisor_controller_behind") == 1
        assert metric_value(metrics, "gpusupervisor_controller_loop_lag_seconds_bucket",
                            le="1.0") < metric_value(
            metrics, "gpusupervisor_controller_loop_lag_seconds_bucket", le="+Inf")
