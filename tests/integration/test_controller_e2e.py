"""Controller processes against the real API server: ingest, leadership, exactly-once.

Two controllers compete for the Lease; reports are POSTed as the agent would, with the
agent ServiceAccount's token; the controller acts as its own ServiceAccount.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio import client

from bench.harness import ControllerProcess, gpu_finding, node_report
from supervisor.controller.actions import QUARANTINE_TAINT
from tests.integration.cluster_objects import (
    finish_deletion,
    list_pods,
    make_lws_group,
    make_nodes,
    unique,
)
from tests.kubeenv import manifests
from tests.kubeenv.cluster import KubeTestCluster

pytestmark = pytest.mark.kube

POLICY = """
cooldown: 1m
budgets: {max_groups_disrupted: 4, min_healthy_groups: 0}
circuit_breaker: {max_actions: 50, window: 5m}
rules:
  - name: gpu-lost
    when: {fault_classes: [gpu_lost], min_severity: critical, scope: group, for: 0s}
    then:
      - action: fail_over
      - action: quarantine
      - action: restart_group
        after: 4s
    lift_quarantine: true
"""


@dataclass
class Env:
    cluster: KubeTestCluster
    admin: client.ApiClient
    controller_kubeconfig: Path
    agent_token: str
    ns: str
    workdir: Path


@pytest.fixture(name="env")
async def _env(kube_cluster: KubeTestCluster, tmp_path: Path) -> AsyncIterator[Env]:
    async with await kube_cluster.api_client() as admin:
        await manifests.apply(admin, "namespace.yaml", "agent-rbac.yaml",
                              "controller-rbac.yaml")
        token = await kube_cluster.service_account_token("gpu-supervisor",
                                                         "gpu-supervisor-controller")
        agent_token = await kube_cluster.service_account_token("gpu-supervisor",
                                                               "gpu-supervisor-agent")
        ns = unique("serving")
        await kube_cluster.ensure_namespace(ns)
        # Each test gets its own Lease and state, so tests cannot see each other's leader.
        yield Env(kube_cluster, admin, kube_cluster.write_kubeconfig(tmp_path / "kc", token),
                  agent_token, ns, tmp_path)


def controller(env: Env, identity: str, policy: str = POLICY) -> ControllerProcess:
    return ControllerProcess(env.workdir, env.controller_kubeconfig, identity, policy=policy,
                             settings={"controller": {"lease_name": f"lease-{env.ns}",
                                                      "state_configmap": f"state-{env.ns}"}})


async def until(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = await predicate()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def leader_of(*controllers: ControllerProcess) -> ControllerProcess:
    async def find() -> ControllerProcess | None:
        leaders = []
        for c in controllers:
            status = await asyncio.to_thread(c.status)
            if status["leader"]:
                leaders.append(c)
        assert len(leaders) <= 1, "two leaders at once"
        return leaders[0] if leaders else None
    result: ControllerProcess = await until(find, what="a leader")
    return result


class TestControllerIngest:
    async def test_malformed_and_unauthenticated_reports_get_4xx(self, env: Env) -> None:
        """No token 401, a bogus token 401, a non-agent identity 403, bad JSON 400, a wrong
        shape 422 naming the field, oversized 413 — and the controller keeps running."""
        ctl = controller(env, "ingest").start()
        try:
            good = node_report("node-x", [])
            assert ctl.post_report("", good)[0] == 401
            assert ctl.post_report("not-a-token", good)[0] == 401
            other = await env.cluster.service_account_token(env.ns, "someone-else")
            assert ctl.post_report(other, good)[0] == 403
            assert ctl.post_report(env.agent_token, None, raw=b"{nope")[0] == 400
            code, body = ctl.post_report(env.agent_token, {**good, "findings": [{"x": 1}]})
            assert code == 422 and "findings[0].severity" in body
            code, body = ctl.post_report(env.agent_token, {**good, "kind": "Other"})
            assert code == 422 and "kind" in body
            assert ctl.post_report(env.agent_token, None, raw=b"x" * (2 << 20))[0] == 413
            assert ctl.post_report(env.agent_token, good, content_type="text/plain")[0] == 415
            assert ctl.post_report(env.agent_token, good)[0] == 202
            status = ctl.status()
            assert status["reports"]["accepted"] == 1
            assert status["reports"]["unauthenticated"] == 2
            assert status["reports"]["forbidden"] == 1
            assert ctl.proc is not None and ctl.proc.poll() is None
        finally:
            ctl.stop()

    async def test_bad_policy_file_is_rejected_with_field(self, env: Env) -> None:
        """A controller given an invalid policy exits 2 and names the field."""
        path = env.workdir / "bad-policy.yaml"
        path.write_text("rules:\n  - name: x\n    when: {fault_classes: [gpu_lost]}\n"
                        "    then: [{action: reboot}]\n")
        proc = await asyncio.create_subprocess_exec(
            "python", "-m", "supervisor", "controller", "--policy", str(path),
            "--kubeconfig", str(env.controller_kubeconfig),
            stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL)
        _, err = await proc.communicate()
        assert proc.returncode == 2
        assert "rules[0].then[0].action" in err.decode()


class TestControllerFailover:
    async def test_gpu_lost_fails_over_quarantines_and_restarts_once_across_leader_kill(
            self, env: Env) -> None:
        """Leader A fails the group over, is SIGKILLed; B takes the Lease, loads the incident
        and continues the ladder: the group is restarted exactly once, never again."""
        nodes = await make_nodes(env.admin, 2)
        await make_lws_group(env.admin, env.ns, "llama", 0, nodes, model="llama-70b")
        a = controller(env, "ctl-a").start()
        b = controller(env, "ctl-b").start()
        try:
            leader = await leader_of(a, b)
            standby = b if leader is a else a
            report = node_report(nodes[1], [gpu_finding(nodes[1], 3)])
            for c in (leader, standby):  # the Service may route to either
                assert c.post_report(env.agent_token, report)[0] == 202

            async def gated() -> bool:
                pods = await list_pods(env.admin, env.ns)
                return all(any(c["type"] == "gpu-supervisor.io/serving" and
                               c["status"] == "False" for c in p["status"]["conditions"])
                           for p in pods.values())
            await until(gated, what="group failed over")
            leader.kill()  # mid-incident: restart_group is still 4 s away

            async def restarted() -> bool:
                pods = await list_pods(env.admin, env.ns)
                return bool(pods["llama-0"]["metadata"].get("deletionTimestamp"))

            # Keep the agent's report fresh for the survivor while it takes over.
            async def refresh_and_check() -> bool:
                standby.post_report(env.agent_token, node_report(nodes[1], [
                    gpu_finding(nodes[1], 3, age=10)], sequence=2))
                return await restarted()
            await until(refresh_and_check, timeout=30, what="restart by the new leader")
            assert (await asyncio.to_thread(standby.status))["leader"]

            core = client.CoreV1Api(env.admin)
            node = env.admin.sanitize_for_serialization(await core.read_node(nodes[1]))
            assert any(t["key"] == QUARANTINE_TAINT for t in node["spec"]["taints"])
            # Play LWS: the group comes back with a new leader pod.
            await finish_deletion(env.admin, env.ns, "llama-0")
            await make_lws_group(env.admin, env.ns, "llama", 0, nodes[:1], model="llama-70b")
            await asyncio.sleep(6)  # longer than the ladder's after: no second restart
            pod = (await list_pods(env.admin, env.ns))["llama-0"]
            assert not pod["metadata"].get("deletionTimestamp")
            events = await core.list_namespaced_event(env.ns)
            restarts = [e for e in events.items if e.reason == "GroupRestarted"]
            assert len(restarts) == 1
        finally:
            a.stop()
            b.stop()
