"""Controller processes against the real API server: ingest, leadership, exactly-once.

Two controllers compete for the Lease; reports are POSTed as the agent would, with the
agent ServiceAccount's token; the controller acts as its own ServiceAccount.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio import client

from simulator.controlplane.cluster import REPORT_AUDIENCE, KubeTestCluster
from simulator.processes import ControllerProcess, gpu_finding, node_report
from supervisor.controller.actions import QUARANTINE_TAINT, SUSPECT_TAINT
from tests.integration.api_proxy import ApiProxy
from tests.integration.cluster_objects import (
    agent_token,
    deployment_body,
    finish_deletion,
    list_pods,
    make_endpoint_slice,
    make_lws_group,
    make_nodes,
    mark_running,
    pod_body,
    unique,
)
from tests.kubeenv import manifests

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
    ns: str
    workdir: Path
    release: manifests.Release  # the chart's RBAC and names this test's daemons run with
    tokens: dict[str, str] = field(default_factory=dict)  # node → its agent's report token

    def token(self, node: str) -> str:
        """The report token of the agent on ``node`` (see ``nodes_with_agents``)."""
        return self.tokens[node]

    async def agents_on(self, nodes: list[str]) -> None:
        """An agent pod of the release on each node, and its report token."""
        for node in nodes:
            self.tokens[node] = await agent_token(self.admin, self.release, node)


async def nodes_with_agents(env: Env, count: int) -> list[str]:
    """``count`` Ready nodes, each with an agent pod whose token reports for it."""
    nodes = await make_nodes(env.admin, count)
    await env.agents_on(nodes)
    return nodes


@pytest.fixture(name="env")
async def _env(kube_cluster: KubeTestCluster, tmp_path: Path) -> AsyncIterator[Env]:
    async with await kube_cluster.api_client() as admin:
        # Each test installs its own release of the chart's RBAC: its own Lease and state,
        # so tests cannot see each other's leader.
        release = await manifests.install_rbac(admin, unique("gs"))
        token = await kube_cluster.service_account_token(
            release.namespace, release.service_account("controller"))
        ns = unique("serving")
        await kube_cluster.ensure_namespace(ns)
        yield Env(kube_cluster, admin, kube_cluster.write_kubeconfig(tmp_path / "kc", token),
                  ns, tmp_path, release)


def controller(env: Env, identity: str, policy: str = POLICY) -> ControllerProcess:
    return ControllerProcess(env.workdir, env.controller_kubeconfig, identity, policy=policy,
                             settings=env.release.controller_settings(silence_seconds=3.0,
                                                                      quorum_min_nodes=3))


async def until(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = await predicate()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def all_gated(env: Env) -> bool:
    """Every pod of the namespace has our readiness gate False: the group is out of traffic."""
    pods = await list_pods(env.admin, env.ns)
    return all(any(c["type"] == "gpu-supervisor.io/serving" and c["status"] == "False"
                   for c in p["status"]["conditions"]) for p in pods.values())


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
            await env.agents_on(["node-x"])
            ctl.wait_for(lambda: ctl.get("/readyz")[0] == 200, what="watches synced")
            good = node_report("node-x", [])
            assert ctl.post_report("", good)[0] == 401
            assert ctl.post_report("not-a-token", good)[0] == 401
            other = await env.cluster.service_account_token(env.ns, "someone-else",
                                                            audiences=[REPORT_AUDIENCE])
            assert ctl.post_report(other, good)[0] == 403
            assert ctl.post_report(env.token("node-x"), None, raw=b"{nope")[0] == 400
            code, body = ctl.post_report(env.token("node-x"), {**good, "findings": [{"x": 1}]})
            assert code == 422 and "findings[0].severity" in body
            code, body = ctl.post_report(env.token("node-x"), {**good, "kind": "Other"})
            assert code == 422 and "kind" in body
            assert ctl.post_report(env.token("node-x"), None, raw=b"x" * (2 << 20))[0] == 413
            assert ctl.post_report(env.token("node-x"), good, content_type="text/plain")[0] == 415
            assert ctl.post_report(env.token("node-x"), good)[0] == 202
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
        nodes = await nodes_with_agents(env, 2)
        await make_lws_group(env.admin, env.ns, "llama", 0, nodes, model="llama-70b")
        a = controller(env, "ctl-a").start()
        b = controller(env, "ctl-b").start()
        try:
            leader = await leader_of(a, b)
            standby = b if leader is a else a
            report = node_report(nodes[1], [gpu_finding(nodes[1], 3)])
            for c in (leader, standby):  # the Service may route to either
                assert c.post_report(env.token(nodes[1]), report)[0] == 202

            await until(lambda: all_gated(env), what="group failed over")
            leader.kill()  # mid-incident: restart_group is still 4 s away

            async def restarted() -> bool:
                pods = await list_pods(env.admin, env.ns)
                return bool(pods["llama-0"]["metadata"].get("deletionTimestamp"))

            # Keep the agent's report fresh for the survivor while it takes over.
            async def refresh_and_check() -> bool:
                standby.post_report(env.token(nodes[1]), node_report(nodes[1], [
                    gpu_finding(nodes[1], 3, age=10)]))
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


def restart_only(extra: str) -> str:
    return f"""
{extra}
rules:
  - name: gpu-lost
    when: {{fault_classes: [gpu_lost], min_severity: critical, scope: group, for: 0s}}
    then:
      - action: restart_group
"""


async def leader_with_groups(env: Env, groups: int, policy: str,
                             name: str = "solo") -> tuple[ControllerProcess, list[str]]:
    nodes = await nodes_with_agents(env, groups)
    for i, node in enumerate(nodes):
        await make_lws_group(env.admin, env.ns, "llama", i, [node], model="llama-70b")
    ctl = controller(env, name, policy=policy).start()

    async def ready() -> bool:
        status = await asyncio.to_thread(ctl.status)
        return bool(status["leader"] and status["state_loaded"] and status["groups"] >= groups)
    await until(ready, what="controller leading with the groups discovered")
    return ctl, nodes


async def terminating(env: Env) -> list[str]:
    pods = await list_pods(env.admin, env.ns)
    return sorted(n for n, p in pods.items() if p["metadata"].get("deletionTimestamp"))


class TestControllerSafety:
    async def test_budget_limits_groups_disrupted_at_once(self, env: Env) -> None:
        """Three groups lose a GPU; with max_groups_disrupted 1 exactly one is restarted and
        the other two are refused for budget."""
        ctl, nodes = await leader_with_groups(env, 3, restart_only(
            "budgets: {max_groups_disrupted: 1, min_healthy_groups: 0}"))
        try:
            for node in nodes:
                assert ctl.post_report(env.token(node), node_report(
                    node, [gpu_finding(node, 0)]))[0] == 202

            async def refused_two() -> bool:
                status = await asyncio.to_thread(ctl.status)
                return sum(r["why"] == "budget" for r in status["refusals"]) == 2
            await until(refused_two, what="two budget refusals")
            assert len(await terminating(env)) == 1
        finally:
            ctl.stop()

    async def test_circuit_breaker_opens_and_is_reset_by_annotation(self, env: Env) -> None:
        """With max_actions 2, the third restart trips the breaker: nothing more happens until
        someone annotates the state ConfigMap; then the held restart goes ahead."""
        ctl, nodes = await leader_with_groups(env, 3, restart_only(
            "budgets: {max_groups_disrupted: 10, min_healthy_groups: 0}\n"
            "circuit_breaker: {max_actions: 2, window: 10m}"))
        try:
            for node in nodes:
                ctl.post_report(env.token(node), node_report(node, [gpu_finding(node, 0)]))

            async def tripped() -> bool:
                status = await asyncio.to_thread(ctl.status)
                return bool(status["breaker_open"])
            await until(tripped, what="breaker open")
            await asyncio.sleep(2)
            assert len(await terminating(env)) == 2
            metrics = await asyncio.to_thread(_get, ctl.url + "/metrics")
            assert "gpusupervisor_policy_breaker_open 1.0" in metrics
            core = client.CoreV1Api(env.admin)
            state = env.release.config("controller")["controller"]["state_configmap"]
            await core.patch_namespaced_config_map(
                state, env.release.namespace,
                {"metadata": {"annotations": {"gpu-supervisor.io/reset-breaker": "true"}}})

            async def all_three() -> bool:
                for node in nodes:  # the agents keep reporting
                    ctl.post_report(env.token(node), node_report(node, [gpu_finding(node, 0)]))
                return len(await terminating(env)) == 3
            await until(all_three, what="third restart after reset")
            cm = await core.read_namespaced_config_map(state, env.release.namespace)
            assert "gpu-supervisor.io/reset-breaker" not in (cm.metadata.annotations or {})
        finally:
            ctl.stop()

    async def test_cooldown_holds_back_a_repeat_quarantine(self, env: Env) -> None:
        """A node quarantined, lifted when healthy, then faulty again within the cooldown is
        not quarantined a second time until the cooldown ends."""
        policy = """
cooldown: 10m
rules:
  - name: hot
    when: {fault_classes: [thermal], min_severity: warning, scope: node, for: 0s}
    then: [{action: quarantine}]
    lift_quarantine: true
"""
        ctl, nodes = await leader_with_groups(env, 1, policy)
        node = nodes[0]
        core = client.CoreV1Api(env.admin)

        async def quarantined() -> bool:
            raw = await core.read_node(node)
            return any(t.key == QUARANTINE_TAINT for t in raw.spec.taints or [])
        try:
            hot = [gpu_finding(node, 0, "thermal", "warning")]
            ctl.post_report(env.token(node), node_report(node, hot))
            await until(quarantined, what="quarantine")
            ctl.post_report(env.token(node), node_report(node, []))

            async def lifted() -> bool:
                return not await quarantined()
            await until(lifted, what="quarantine lifted")
            ctl.post_report(env.token(node), node_report(node, hot))

            async def cooldown_refusal() -> bool:
                status = await asyncio.to_thread(ctl.status)
                return any(r["why"] == "cooldown" for r in status["refusals"])
            await until(cooldown_refusal, what="cooldown refusal")
            assert not await quarantined()
        finally:
            ctl.stop()

    async def test_dry_run_acts_on_nothing(self, env: Env) -> None:
        """In dry-run the controller logs what it would do and changes nothing — not even
        the readiness gate of a new pod, which it would otherwise admit."""
        ctl, nodes = await leader_with_groups(env, 1, restart_only("dry_run: true"))
        try:
            core = client.CoreV1Api(env.admin)
            await core.create_namespaced_pod(env.ns, pod_body(
                "llama-0-1", nodes[0], {"leaderworkerset.sigs.k8s.io/name": "llama",
                                        "leaderworkerset.sigs.k8s.io/group-index": "0",
                                        "leaderworkerset.sigs.k8s.io/worker-index": "1"}))
            await mark_running(core, env.ns, "llama-0-1", gate=False)
            ctl.post_report(env.token(nodes[0]), node_report(nodes[0], [gpu_finding(nodes[0], 0)]))

            async def logged() -> bool:
                log = ctl.log()
                return "dry-run: would act" in log and "dry-run: would admit pod" in log
            await until(logged, what="dry-run log lines")
            assert await terminating(env) == []
            pod = (await list_pods(env.admin, env.ns))["llama-0-1"]
            assert not [c for c in pod["status"].get("conditions") or []
                        if c["type"] == "gpu-supervisor.io/serving"]
        finally:
            ctl.stop()

    async def test_bad_policy_reload_keeps_the_last_good_policy(self, env: Env) -> None:
        """Rewriting the policy file with an invalid one is reported and ignored: the old
        policy still acts."""
        ctl, nodes = await leader_with_groups(env, 1, restart_only(""))
        try:
            path = env.workdir / "policy-solo.yaml"
            path.write_text("rules: [{name: x, when: {fault_classes: [gpu_lost]}, "
                            "then: [{action: explode}]}]\n")

            async def rejected() -> bool:
                status = await asyncio.to_thread(ctl.status)
                return bool(status["policy_error"])
            await until(rejected, what="reload rejected")
            status = await asyncio.to_thread(ctl.status)
            assert "rules[0].then[0].action" in status["policy_error"]
            ctl.post_report(env.token(nodes[0]), node_report(nodes[0], [gpu_finding(nodes[0], 0)]))

            async def restarted() -> bool:
                return len(await terminating(env)) == 1
            await until(restarted, what="restart under the last good policy")
        finally:
            ctl.stop()

    async def test_quorum_guard_stops_a_leader_that_lost_most_agents(self, env: Env) -> None:
        """When most reporting agents go silent at once the leader suspects itself: a new
        fault is not acted on."""
        ctl, nodes = await leader_with_groups(env, 4, restart_only(
            "budgets: {max_groups_disrupted: 10, min_healthy_groups: 0}"),)
        try:
            for node in nodes:
                ctl.post_report(env.token(node), node_report(node, []))
            # silence_seconds is 3 here: three agents fall silent, one reports a fault.
            await asyncio.sleep(4)
            ctl.post_report(env.token(nodes[0]), node_report(nodes[0], [gpu_finding(nodes[0], 0)]))

            async def suspect() -> bool:
                status = await asyncio.to_thread(ctl.status)
                return bool(status["suspect"])
            await until(suspect, what="quorum guard")
            await asyncio.sleep(2)
            assert await terminating(env) == []
        finally:
            ctl.stop()


def _get(url: str) -> str:
    import urllib.request
    with urllib.request.urlopen(url, timeout=5) as resp:
        return str(resp.read().decode())


class TestControllerWithAgent:
    async def test_xid_on_a_simulated_gpu_fails_the_group_over_end_to_end(
            self, env: Env) -> None:
        """Stand-in GPU → real agent process → report with its SA token → controller →
        readiness gates of the group's pods False on the API server."""
        from simulator.processes import AgentProcess

        nodes = await nodes_with_agents(env, 2)
        await make_lws_group(env.admin, env.ns, "llama", 0, nodes, model="llama-70b")
        ctl = controller(env, "with-agent", policy=POLICY.replace(
            "fault_classes: [gpu_lost]", "fault_classes: [gpu_lost, xid]")).start()
        token_file = env.workdir / "agent-token"
        token_file.write_text(env.token(nodes[0]))
        agent = AgentProcess(env.workdir / "agent", gpus=2, node_name=nodes[0], settings={
            "reporting": {"controller_url": ctl.report_url, "token_file": str(token_file),
                          "ca_file": str(ctl.tls_dir / "ca.crt"),
                          "heartbeat_seconds": 1.0, "timeout_seconds": 1.0}})
        (env.workdir / "agent").mkdir(exist_ok=True)
        try:
            await asyncio.to_thread(agent.start)

            async def leading() -> bool:
                status = await asyncio.to_thread(ctl.status)
                return bool(status["leader"] and status["state_loaded"])
            await until(leading, what="controller leading")
            agent.control.inject_xid(1, 79)

            await until(lambda: all_gated(env), what="group failed over")
            status = await asyncio.to_thread(ctl.status)
            assert status["reports"]["accepted"] >= 1
            (incident,) = [i for i in status["incidents"] if "llama" in str(i)]
            assert "gpu-lost" in str(incident)
        finally:
            await asyncio.to_thread(agent.stop)
            ctl.stop()


class TestControllerNodeBinding:
    async def test_pod_bound_token_may_only_report_for_its_own_node(self, env: Env) -> None:
        """An agent token bound to a pod on node A is refused (403) when it reports for node
        B, and accepted for A: one compromised agent cannot get other nodes quarantined."""
        node_a, node_b = await nodes_with_agents(env, 2)
        ctl = controller(env, "binding").start()
        try:
            # Until its watches have listed, the controller cannot tell an agent pod from
            # any other: it answers 503, come back shortly.
            ctl.wait_for(lambda: ctl.get("/readyz")[0] == 200, what="watches synced")
            code, body = ctl.post_report(env.token(node_a), node_report(node_b, []))
            assert code == 403 and f"bound to node {node_a}" in body
            assert ctl.post_report(env.token(node_a), node_report(node_a, []))[0] == 202
        finally:
            ctl.stop()


class TestControllerAdmission:
    async def test_new_pods_get_the_readiness_gate_of_their_group(self, env: Env) -> None:
        """Pods listing our readiness gate would never turn Ready on their own: the leader
        sets it True on a healthy group's new pods, False on a failed-over group's."""
        nodes = await nodes_with_agents(env, 3)
        await make_lws_group(env.admin, env.ns, "llama", 0, nodes[:2], gate=False)
        ctl = controller(env, "admit").start()
        try:
            async def gates() -> dict[str, str | None]:
                pods = await list_pods(env.admin, env.ns)
                return {n: next((c["status"] for c in p["status"].get("conditions") or []
                                 if c["type"] == "gpu-supervisor.io/serving"), None)
                        for n, p in pods.items()}

            async def admitted() -> bool:
                return await gates() == {"llama-0": "True", "llama-0-1": "True"}
            await until(admitted, what="new pods admitted")
            # Fail the group over, then a replacement member appears: it joins gated False.
            ctl.post_report(env.token(nodes[0]), node_report(nodes[0], [gpu_finding(nodes[0], 0)]))
            await until(lambda: all_gated(env), what="group failed over")
            core = client.CoreV1Api(env.admin)
            await core.create_namespaced_pod(env.ns, pod_body(
                "llama-0-2", nodes[2], {"leaderworkerset.sigs.k8s.io/name": "llama",
                                        "leaderworkerset.sigs.k8s.io/group-index": "0",
                                        "leaderworkerset.sigs.k8s.io/worker-index": "2"}))
            await mark_running(core, env.ns, "llama-0-2", gate=False)

            async def joined_gated() -> bool:
                return (await gates()).get("llama-0-2") == "False"
            await until(joined_gated, what="replacement gated like its group")
        finally:
            ctl.stop()


class TestFencingAcrossLeaderChanges:
    async def test_a_deposed_leaders_late_write_never_lands_after_the_new_leaders(
            self, env: Env) -> None:
        """Leader A's API server path goes slow just as it fails a group over: its gate
        write and its Lease renewals are held. B takes over, fails the group over itself,
        then puts it back once the fault clears. When A's held write finally reaches the
        API server it fails its precondition: the group stays in traffic."""
        nodes = await nodes_with_agents(env, 2)
        await make_lws_group(env.admin, env.ns, "llama", 0, nodes, model="llama-70b")
        proxy = await ApiProxy(env.cluster).start()
        token = (await asyncio.to_thread(env.controller_kubeconfig.read_text))
        kc = json.loads(token)
        kc["clusters"][0]["cluster"] = {"server": proxy.url}
        slow_kubeconfig = env.workdir / "kc-through-proxy"
        slow_kubeconfig.write_text(json.dumps(kc))
        fail_over_only = POLICY.replace("""      - action: quarantine
      - action: restart_group
        after: 4s
""", "")
        a = ControllerProcess(env.workdir, slow_kubeconfig, "fence-a", policy=fail_over_only,
                              settings=env.release.controller_settings(silence_seconds=30.0))
        await asyncio.to_thread(a.start)
        b = None
        try:
            assert await leader_of(a) is a
            b = controller(env, "fence-b", policy=fail_over_only)
            await asyncio.to_thread(b.start)
            # A has reviewed the agent's token before its path goes slow. (Every blocking
            # call runs in a thread here: the proxy lives on this test's event loop.)
            post = asyncio.to_thread
            assert (await post(a.post_report, env.token(nodes[1]),
                               node_report(nodes[1], [])))[0] == 202
            proxy.hold()
            fault = [gpu_finding(nodes[1], 3)]
            assert (await post(a.post_report, env.token(nodes[1]),
                               node_report(nodes[1], fault)))[0] == 202

            async def a_wrote_something() -> bool:
                return proxy.held >= 2  # a Lease renewal and the gate write, at least
            await until(a_wrote_something, what="A's writes held")

            async def b_leads_and_failed_over() -> bool:
                assert b is not None
                await post(b.post_report, env.token(nodes[1]), node_report(nodes[1], fault))
                status = await asyncio.to_thread(b.status)
                return bool(status["leader"]) and await all_gated(env)
            await until(b_leads_and_failed_over, timeout=30, what="B failed the group over")

            async def b_recovered() -> bool:
                assert b is not None
                await post(b.post_report, env.token(nodes[1]), node_report(nodes[1], []))
                return await gates(env) == {"True"}
            await until(b_recovered, timeout=30, what="B put the group back")

            proxy.release()

            async def late_writes_arrived() -> bool:
                return any(m == "PATCH" for m, _, _ in proxy.late_statuses)
            await until(late_writes_arrived, what="A's held writes forwarded")
            await asyncio.sleep(2)  # A, its Lease gone, must not try again either
            assert await gates(env) == {"True"}
            patches = [s for m, path, s in proxy.late_statuses if m == "PATCH"
                       and path.endswith("/status") and "/pods/" in path]
            assert patches and all(s == 409 for s in patches), proxy.late_statuses
        finally:
            await asyncio.to_thread(a.stop)
            if b is not None:
                await asyncio.to_thread(b.stop)
            await proxy.close()


    async def test_a_deposed_leaders_late_scale_never_lands_after_the_new_leaders(
            self, env: Env) -> None:
        """Leader A degrades a model, then restores it: its scale of the fallback down to 0
        is held on the way, its Lease renewals with it. B takes over, finds the restore
        unfinished and finishes it, then the model falls short again and B degrades it:
        the fallback back at 2, traffic on it. A's late scale reaches the API server after
        all that and fails its precondition (409): the fallback keeps B's replicas."""
        nodes = await nodes_with_agents(env, 2)
        # A model name of this test's own: the controller counts a model's healthy groups
        # cluster-wide, and earlier tests leave healthy "llama-70b" groups behind.
        model = f"llama-70b-{env.ns}"
        for index, node in enumerate(nodes):
            await make_lws_group(env.admin, env.ns, "llama", index, [node], model=model)
        apps = client.AppsV1Api(env.admin)
        await apps.create_namespaced_deployment(env.ns, deployment_body("llama-8b", 0))
        routes = client.CustomObjectsApi(env.admin)
        await routes.create_namespaced_custom_object(
            "gateway.networking.k8s.io", "v1", env.ns, "httproutes", {
                "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                "metadata": {"name": "llm"}, "spec": {"parentRefs": [{"name": "gw"}],
                "rules": [{"backendRefs": [{"name": "llama-70b", "port": 8000, "weight": 100},
                                           {"name": "llama-8b", "port": 8000,
                                            "weight": 0}]}]}})
        for service in ("llama-70b", "llama-8b"):  # both sides serve (the slices' controller)
            await make_endpoint_slice(env.admin, env.ns, service, 2)
        topology = {"degrade": [{
            "model": model, "ready_timeout_seconds": 30, "drain_seconds": 0,
            "workload": {"kind": "Deployment", "namespace": env.ns, "name": "llama-8b",
                         "replicas": 2},
            "traffic": {"kind": "HTTPRoute", "namespace": env.ns, "name": "llm",
                        "primary": "llama-70b", "fallback": "llama-8b"}}]}
        policy = POLICY.replace("""      - action: quarantine
      - action: restart_group
        after: 4s
""", "") + f"""degrade:
  - {{model: {model}, fallback: llama-8b, floor: 2, restore_after: 2s}}
"""
        scale_path = f"/apis/apps/v1/namespaces/{env.ns}/deployments/llama-8b/scale"

        def scale_down(method: str, path: str, body: bytes) -> bool:
            # The restore's scale to 0 — not the n-th PATCH: the degrade's scale-up is
            # retried when the Deployment's controller wrote its status in between.
            return (method == "PATCH" and path == scale_path
                    and json.loads(body)["spec"]["replicas"] == 0)

        proxy = await ApiProxy(env.cluster, hold_from=scale_down).start()
        kc = json.loads(await asyncio.to_thread(env.controller_kubeconfig.read_text))
        kc["clusters"][0]["cluster"] = {"server": proxy.url}
        slow_kubeconfig = env.workdir / "kc-scale-through-proxy"
        slow_kubeconfig.write_text(json.dumps(kc))
        settings = env.release.controller_settings(silence_seconds=30.0)
        a = ControllerProcess(env.workdir, slow_kubeconfig, "scale-a", policy=policy,
                              topology=topology, settings=settings)
        b = ControllerProcess(env.workdir, env.controller_kubeconfig, "scale-b", policy=policy,
                              topology=topology, settings=settings)
        fault = [gpu_finding(nodes[1], 3)]

        async def replicas() -> int:
            scale = await apps.read_namespaced_deployment_scale("llama-8b", env.ns)
            return int(scale.spec.replicas or 0)

        async def fallback_weight() -> int:
            route = await routes.get_namespaced_custom_object(
                "gateway.networking.k8s.io", "v1", env.ns, "httproutes", "llm")
            return next(int(r.get("weight", 1)) for r in route["spec"]["rules"][0][
                "backendRefs"] if r["name"] == "llama-8b")

        await asyncio.to_thread(a.start)
        try:
            assert await leader_of(a) is a
            post = asyncio.to_thread
            assert (await post(a.post_report, env.token(nodes[1]),
                               node_report(nodes[1], fault)))[0] == 202

            async def degraded() -> bool:
                return await fallback_weight() > 0
            await until(degraded, timeout=30, what="A degraded the model")
            await post(b.start)
            assert (await post(a.post_report, env.token(nodes[1]),
                               node_report(nodes[1], [])))[0] == 202

            async def a_held() -> bool:
                return proxy.held >= 1  # the restore's scale-down (the traffic is back)
            await until(a_held, timeout=30, what="A's scale-down held")
            assert await fallback_weight() == 0

            async def b_restored() -> bool:
                await post(b.post_report, env.token(nodes[1]), node_report(nodes[1], []))
                status = await asyncio.to_thread(b.status)
                return bool(status["leader"]) and await replicas() == 0
            await until(b_restored, timeout=40, what="B leading, the restore finished")

            async def b_degraded() -> bool:
                await post(b.post_report, env.token(nodes[1]), node_report(nodes[1], fault))
                return await replicas() == 2 and await fallback_weight() > 0
            await until(b_degraded, timeout=40, what="B degraded the model again")

            proxy.release()

            async def late_scale_arrived() -> bool:
                return any(path == scale_path for _, path, _ in proxy.late_statuses)
            await until(late_scale_arrived, what="A's held scale-down forwarded")
            await asyncio.sleep(2)  # A, its Lease gone, must not try again either
            assert await replicas() == 2
            assert [status for method, path, status in proxy.late_statuses
                    if path == scale_path and method == "PATCH"] == [409]
        finally:
            await asyncio.to_thread(a.stop)
            await asyncio.to_thread(b.stop)
            await proxy.close()


async def gates(env: Env) -> set[str]:
    """The distinct values of our readiness gate over the namespace's pods."""
    pods = await list_pods(env.admin, env.ns)
    return {c["status"] for p in pods.values() for c in p["status"].get("conditions") or []
            if c["type"] == "gpu-supervisor.io/serving"}


class TestTimersAcrossLeaderChanges:
    async def test_after_fires_on_time_when_the_leader_dies_long_after_its_last_action(
            self, env: Env) -> None:
        """A fails the group over and 12 s later (no action since) is SIGKILLed. B takes
        over and restarts the group when the ladder's ``after: 20s`` ends — about 20 s
        after the fail-over — not 20 s after its own take-over."""
        nodes = await nodes_with_agents(env, 2)
        await make_lws_group(env.admin, env.ns, "llama", 0, nodes, model="llama-70b")
        policy = POLICY.replace("""      - action: quarantine
      - action: restart_group
        after: 4s""", """      - action: restart_group
        after: 20s""")
        a = controller(env, "timer-a", policy=policy).start()
        b = controller(env, "timer-b", policy=policy).start()
        try:
            leader = await leader_of(a, b)
            standby = b if leader is a else a
            fault = [gpu_finding(nodes[1], 3)]

            async def report_and_gated() -> bool:
                for c in (leader, standby):
                    c.post_report(env.token(nodes[1]), node_report(nodes[1], fault))
                return await all_gated(env)
            await until(report_and_gated, what="group failed over")
            failed_over_at = time.monotonic()
            while time.monotonic() - failed_over_at < 12:
                standby.post_report(env.token(nodes[1]), node_report(nodes[1], fault))
                await asyncio.sleep(1)
            leader.kill()

            async def restarted() -> bool:
                standby.post_report(env.token(nodes[1]), node_report(nodes[1], fault))
                pods = await list_pods(env.admin, env.ns)
                return bool(pods["llama-0"]["metadata"].get("deletionTimestamp"))
            await until(restarted, timeout=40, what="restart by the new leader")
            after = time.monotonic() - failed_over_at
            # On time: 20 s after the fail-over (+ take-over and polling slack), where
            # timers restarted from the take-over would give 12 + 3 + 20 = 35 s.
            assert 19 <= after <= 28, f"restarted {after:.1f}s after the fail-over"
        finally:
            a.stop()
            b.stop()


class TestXidIncidentsEndToEnd:
    async def test_one_application_crash_is_not_quarantined_and_recurrence_makes_the_node_a_suspect(
            self, env: Env) -> None:
        """Stand-in → agent → controller with the shipped default policy. A burst of six
        XID 13 on one GPU (one crashing application) fails nothing over and quarantines
        nothing. The same XID recurring in separate incidents (the application restarted
        and crashed again, twice) is critical — but under one workload only it may be the
        application's as well as the GPU's: the node is a suspect (new work prefers other
        nodes), not quarantined, until the XIDs follow the workload or stay with the GPU."""
        from simulator.processes import AgentProcess

        nodes = await nodes_with_agents(env, 1)
        await make_lws_group(env.admin, env.ns, "llama", 0, nodes, model="llama-70b")
        ctl = ControllerProcess(env.workdir, env.controller_kubeconfig, "xid-default",
                                settings=env.release.controller_settings())
        await asyncio.to_thread(ctl.start)
        token_file = env.workdir / "agent-token"
        token_file.write_text(env.token(nodes[0]))
        agent = AgentProcess(env.workdir / "agent", gpus=2, node_name=nodes[0], settings={
            "detectors": {"xid_incident_gap_seconds": 1.0},
            "reporting": {"controller_url": ctl.report_url, "token_file": str(token_file),
                          "ca_file": str(ctl.tls_dir / "ca.crt"),
                          "heartbeat_seconds": 1.0, "timeout_seconds": 1.0}})
        core = client.CoreV1Api(env.admin)

        async def taints() -> set[str]:
            node = await core.read_node(nodes[0])
            return {t.key for t in node.spec.taints or []}

        async def quarantined() -> bool:
            return QUARANTINE_TAINT in await taints()

        async def suspected() -> bool:
            return SUSPECT_TAINT in await taints()
        try:
            await asyncio.to_thread(agent.start)
            await until(lambda: leader_of(ctl), what="leader")
            agent.control.inject_xid(1, 13, count=6)
            finding = await asyncio.to_thread(agent.wait_finding, "xid", 1)
            assert (finding["severity"], finding["evidence"]["incidents"]) == ("warning", 1)
            evaluations = (await asyncio.to_thread(ctl.status))["evaluations"]

            async def evaluated_since() -> bool:  # the report with the finding was weighed
                status = await asyncio.to_thread(ctl.status)
                return bool(status["evaluations"] >= evaluations + 5)
            await until(evaluated_since, what="evaluations after the burst")
            status = await asyncio.to_thread(ctl.status)
            assert status["incidents"] == [] and status["actions"] == {}
            assert not await quarantined()
            assert await gates(env) == {"True"}

            for _ in range(2):  # restarted, crashed again: two more incidents
                await asyncio.sleep(1.5)
                agent.control.inject_xid(1, 13, count=6)
            await until(suspected, what="suspicion after recurring incidents")
            finding = (await asyncio.to_thread(agent.findings, "xid", 1))[0]
            assert (finding["severity"], finding["reason"]) == ("critical", "XidRepeated")
            assert not await quarantined()
            assert not (await core.read_node(nodes[0])).spec.unschedulable
        finally:
            await asyncio.to_thread(agent.stop)
            await asyncio.to_thread(ctl.stop)


ENGINE_HANG_POLICY = """
cooldown: 1m
budgets: {max_groups_disrupted: 4, min_healthy_groups: 0}
circuit_breaker: {max_actions: 50, window: 5m}
rules:
  - name: engine
    when: {fault_classes: [engine_hang, engine_crash, partition], min_severity: critical,
           scope: group, for: 0s}
    then:
      - action: fail_over
"""


class TestSidecarToController:
    async def test_engine_hang_fails_the_group_over_and_recovery_puts_it_back(
            self, env: Env) -> None:
        """Two pods of an LWS group, a sidecar and an engine beside each, reporting with
        their pods' own bound tokens. The leader's engine hangs: its sidecar reports
        engine_hang and the controller takes the whole group out of traffic (our gate False
        on both pods); the engine resumes: the gate is True again."""
        from simulator.processes import EngineProcess, SidecarProcess

        nodes = await nodes_with_agents(env, 2)
        pods = await make_lws_group(env.admin, env.ns, "llama", 0, nodes, model="llama-70b")
        ctl = controller(env, "with-sidecars", policy=ENGINE_HANG_POLICY)
        await asyncio.to_thread(ctl.start)
        engines = [await asyncio.to_thread(EngineProcess(env.workdir, f"engine{i}").start)
                   for i in range(2)]
        ports = [18200 + i for i in range(2)]
        cars = []
        try:
            for i, pod in enumerate(pods):
                token = await env.cluster.service_account_token(
                    env.ns, "default", audiences=[REPORT_AUDIENCE],
                    bound_to={"kind": "Pod", "name": pod["metadata"]["name"],
                              "uid": pod["metadata"]["uid"]})
                token_file = env.workdir / f"token-{i}"
                token_file.write_text(token)
                car = SidecarProcess(env.workdir, f"s{i}", {
                    "node_name": nodes[i],
                    "sidecar": {"pod_name": pod["metadata"]["name"], "pod_namespace": env.ns,
                                "group_name": "llama", "group_index": "0", "group_size": 2,
                                "rank": i, "peers": [f"127.0.0.1:{p}" for p in ports],
                                "peer_listen": f"127.0.0.1:{ports[i]}"},
                    "engine": {"url": engines[i].url, "stall_seconds": 2.0},
                    "reporting": {"controller_url": ctl.report_url,
                                  "token_file": str(token_file),
                                  "ca_file": str(ctl.tls_dir / "ca.crt"),
                                  "heartbeat_seconds": 1.0, "timeout_seconds": 1.0}})
                cars.append(await asyncio.to_thread(car.start))
            await leader_of(ctl)

            async def sidecars_reporting() -> bool:
                status = await asyncio.to_thread(ctl.status)
                return bool(status["pods_reporting"] == 2)
            await until(sidecars_reporting, what="both sidecars reporting")
            await asyncio.to_thread(engines[0].control, load=2)
            await asyncio.sleep(1)
            await asyncio.to_thread(engines[0].control, hang=True)
            await until(lambda: all_gated(env), what="group failed over")

            async def recorded() -> bool:
                # The gates land before the incident records them: read it once it has.
                incidents = (await asyncio.to_thread(ctl.status))["incidents"]
                return any(i["failed_over"] for i in incidents)
            await until(recorded, what="fail over recorded in the incident")
            (incident,) = (await asyncio.to_thread(ctl.status))["incidents"]
            assert incident["rule"] == "engine" and incident["failed_over"] == [
                f"{env.ns}/llama/0"]
            await asyncio.to_thread(engines[0].control, hang=False)

            async def back_in_traffic() -> bool:
                return await gates(env) == {"True"}
            await until(back_in_traffic, timeout=30, what="group back in traffic")
        finally:
            for car in cars:
                await asyncio.to_thread(car.stop)
            for engine in engines:
                await asyncio.to_thread(engine.stop)
            await asyncio.to_thread(ctl.stop)

    async def test_a_pod_token_may_only_report_for_its_own_pod(self, env: Env) -> None:
        """A sidecar's token is bound to its pod: a report about another pod is 403, a
        token not bound to any pod is 403, the right pod's report is accepted."""
        nodes = await nodes_with_agents(env, 2)
        pods = await make_lws_group(env.admin, env.ns, "llama", 0, nodes)
        ctl = controller(env, "pod-binding").start()
        try:
            token = await env.cluster.service_account_token(
                env.ns, "default", audiences=[REPORT_AUDIENCE],
                bound_to={"kind": "Pod", "name": pods[0]["metadata"]["name"],
                          "uid": pods[0]["metadata"]["uid"]})
            unbound = await env.cluster.service_account_token(
                env.ns, "default", audiences=[REPORT_AUDIENCE])

            def report(pod: str) -> dict[str, Any]:
                return {"kind": "PodReport", "pod": {"namespace": env.ns, "name": pod},
                        "boot": {"id": "b"}, "sequence": int(time.time() * 1000),
                        "sent_at": time.time(), "findings": []}
            path = "/v1/reports/pod"
            code, body = ctl.post_report(token, report(pods[1]["metadata"]["name"]),
                                         path=path)
            assert code == 403 and "may not report for" in body
            assert ctl.post_report(unbound, report(pods[0]["metadata"]["name"]),
                                   path=path)[0] == 403
            assert ctl.post_report(token, report(pods[0]["metadata"]["name"]),
                                   path=path)[0] == 202
        finally:
            ctl.stop()

    async def test_collective_slow_quarantines_the_named_member_node(self, env: Env) -> None:
        """The group's leader reports collective_slow localized to the worker on node B:
        the controller quarantines node B — where the cause is — not the reporter's node."""
        nodes = await nodes_with_agents(env, 2)
        pods = await make_lws_group(env.admin, env.ns, "llama", 0, nodes)
        ctl = controller(env, "collective-slow", policy="""
budgets: {max_groups_disrupted: 4, min_healthy_groups: 0}
rules:
  - name: fail-slow
    when: {fault_classes: [collective_slow], min_severity: warning, scope: group, for: 0s}
    then: [{action: quarantine}]
""").start()
        try:
            await leader_of(ctl)
            leader_pod = pods[0]["metadata"]
            token = await env.cluster.service_account_token(
                env.ns, "default", audiences=[REPORT_AUDIENCE],
                bound_to={"kind": "Pod", "name": leader_pod["name"], "uid": leader_pod["uid"]})
            now = time.time()
            report = {"kind": "PodReport", "pod": {"namespace": env.ns,
                                                   "name": leader_pod["name"]},
                      "node": nodes[0], "boot": {"id": "b"}, "sequence": 1, "sent_at": now,
                      "findings": [{
                          "fault_class": "collective_slow", "severity": "warning",
                          "subject": {"kind": "pod", "id": f"{env.ns}/llama-0-1",
                                      "node": nodes[1]},
                          "reason": "CollectiveSlow", "message": "localized to rank 1",
                          "first_seen": now, "last_seen": now}]}
            assert ctl.post_report(token, report, path="/v1/reports/pod")[0] == 202
            core = client.CoreV1Api(env.admin)

            async def quarantined(node: str) -> bool:
                raw = await core.read_node(node)
                return any(t.key == QUARANTINE_TAINT for t in raw.spec.taints or [])

            async def b_quarantined() -> bool:
                return await quarantined(nodes[1])
            await until(b_quarantined, what="node B quarantined")
            assert not await quarantined(nodes[0])
        finally:
            ctl.stop()
