"""Each role's RBAC, as the Helm chart renders it, on the real API server.

* **Sufficient**: every request the role's daemon makes (listed below per role, one per
  code path in supervisor/) succeeds as the chart's ServiceAccount.
* **Minimal**: for every verb the chart grants, a copy of the role's RBAC without just that
  verb, bound to a fresh ServiceAccount, gets 403 on at least one of those requests — no
  grant is there for nothing.
* **Tight**: what the role must never be able to do (rewrite a workload's pod template,
  read Secrets, create pods, exec, delete nodes, touch other Leases) is refused.

The real daemons run as these same ServiceAccounts throughout the integration tests
(tests/kubeenv/manifests.py installs the chart's RBAC for them), so a request missing from
the lists below would fail those tests; the lists here make each grant's reason explicit.
"""

from __future__ import annotations

import asyncio
import copy
import json
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from simulator.controlplane.cluster import REPORT_AUDIENCE, KubeTestCluster
from tests.integration.cluster_objects import make_lws_group, make_nodes, unique
from tests.kubeenv import manifests

pytestmark = pytest.mark.kube

MERGE = "application/merge-patch+json"
ROLE_KINDS = ("ClusterRole", "Role")
BINDING_KINDS = ("ClusterRoleBinding", "RoleBinding")


class Api:
    """Raw HTTP to the API server with one bearer token: the status code is the answer."""

    def __init__(self, cluster: KubeTestCluster, token: str) -> None:
        self.url = cluster.url
        self.token = token
        self.ssl = ssl.create_default_context(cafile=str(cluster.ca_file))
        self.session = aiohttp.ClientSession()

    async def call(self, method: str, path: str, body: Any = None,
                   content_type: str = "application/json",
                   accept: str = "application/json", **query: str
                   ) -> tuple[int, dict[str, Any]]:
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": content_type,
                   "Accept": accept}
        data = None if body is None else json.dumps(body)
        async with self.session.request(method, self.url + path, data=data, params=query,
                                        headers=headers, ssl=self.ssl) as resp:
            # A watch answers 200 and then streams: the status is all we need.
            if query.get("watch"):
                return resp.status, {}
            text = await resp.text()
            try:
                return resp.status, json.loads(text) if text else {}
            except ValueError:
                return resp.status, {"raw": text}

    async def close(self) -> None:
        await self.session.close()


Call = Callable[[Api], Awaitable[tuple[int, dict[str, Any]]]]


@dataclass
class World:
    """Objects an operator's cluster would hold, for the calls to act on."""

    nodes: list[str]
    ns: str
    leader: str
    worker: str


async def make_world(cluster: KubeTestCluster, admin: Api) -> World:
    async with await cluster.api_client() as client:
        nodes = await make_nodes(client, 2)
        ns = unique("serving")
        await cluster.ensure_namespace(ns)
        pods = await make_lws_group(client, ns, "llama", 0, nodes)
    base = f"/api/v1/namespaces/{ns}"
    for status, _ in [
        await admin.call("POST", f"/apis/apps/v1/namespaces/{ns}/deployments", {
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "small"},
            "spec": {"replicas": 0, "selector": {"matchLabels": {"app": "small"}},
                     "template": {"metadata": {"labels": {"app": "small"}},
                                  "spec": {"containers": [{"name": "c", "image": "x"}]}}}}),
        await admin.call("POST", f"/apis/leaderworkerset.x-k8s.io/v1/namespaces/{ns}/"
                         "leaderworkersets", {
                             "apiVersion": "leaderworkerset.x-k8s.io/v1",
                             "kind": "LeaderWorkerSet", "metadata": {"name": "llama"},
                             "spec": {"replicas": 1, "leaderWorkerTemplate": {
                                 "size": 2, "workerTemplate": {"spec": {"containers": [
                                     {"name": "c", "image": "x"}]}}}}}),
        await admin.call("POST", f"/apis/gateway.networking.k8s.io/v1/namespaces/{ns}/"
                         "httproutes", {
                             "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                             "metadata": {"name": "llm"}, "spec": {"rules": [{"backendRefs": [
                                 {"name": "big", "port": 80}, {"name": "small", "port": 80,
                                                               "weight": 0}]}]}}),
        await admin.call("POST", f"{base}/services", {
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": "llm"},
            "spec": {"selector": {"model": "big"}, "ports": [{"port": 80}]}}),
        await admin.call("POST", f"{base}/secrets", {
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "weights-token"},
            "stringData": {"token": "hf_x"}}),
    ]:
        assert status == 201, status
    return World(nodes, ns, pods[0]["metadata"]["name"], pods[1]["metadata"]["name"])


def event(ns: str, kind: str, name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{name}.", "namespace": ns},
            "involvedObject": {"kind": kind, "name": name, "namespace": ns},
            "reason": "GroupFailedOver", "message": "m", "type": "Warning"}


def agent_calls(world: World) -> dict[str, Call]:
    """supervisor/agent/node_status.py and supervisor/kube.py, as the agent on nodes[0]."""
    node = world.nodes[0]
    return {
        "read its Node (uid, capacity)": lambda a: a.call("GET", f"/api/v1/nodes/{node}"),
        "patch its NodeConditions": lambda a: a.call(
            "PATCH", f"/api/v1/nodes/{node}/status", {"status": {"conditions": [
                {"type": "GPULost", "status": "False", "reason": "AllGPUsPresent",
                 "message": ""}]}}, MERGE),
        "record an Event about its Node": lambda a: a.call(
            "POST", "/api/v1/namespaces/default/events", event("default", "Node", node)),
    }


def controller_calls(world: World, release: manifests.Release, agent_token: str
                     ) -> dict[str, Call]:
    """Every request of supervisor/controller/ (role.py watches, actions.py, election.py,
    store.py, ingest.py)."""
    cfg = release.config("controller")["controller"]
    own = f"/api/v1/namespaces/{release.namespace}"
    lease = f"/apis/coordination.k8s.io/v1/namespaces/{release.namespace}/leases"
    ns = f"/api/v1/namespaces/{world.ns}"
    apps = f"/apis/apps/v1/namespaces/{world.ns}/deployments/small"
    lws = f"/apis/leaderworkerset.x-k8s.io/v1/namespaces/{world.ns}/leaderworkersets/llama"
    route = f"/apis/gateway.networking.k8s.io/v1/namespaces/{world.ns}/httproutes/llm"
    node = world.nodes[0]

    async def read_then_put(a: Api, path: str) -> tuple[int, dict[str, Any]]:
        status, obj = await a.call("GET", path)
        if status != 200:
            return status, obj
        return await a.call("PUT", path, obj)

    return {
        # health model: list + watch of nodes, serving pods and LWS
        "list nodes": lambda a: a.call("GET", "/api/v1/nodes"),
        "watch nodes": lambda a: a.call("GET", "/api/v1/nodes", watch="1", timeoutSeconds="1"),
        "list pods": lambda a: a.call("GET", "/api/v1/pods",
                                      labelSelector="leaderworkerset.sigs.k8s.io/name"),
        "watch pods": lambda a: a.call("GET", "/api/v1/pods", watch="1", timeoutSeconds="1"),
        "list LWS": lambda a: a.call("GET", "/apis/leaderworkerset.x-k8s.io/v1/"
                                     "leaderworkersets"),
        "watch LWS": lambda a: a.call("GET", "/apis/leaderworkerset.x-k8s.io/v1/"
                                      "leaderworkersets", watch="1", timeoutSeconds="1"),
        # ingest: authenticate a report token
        "review a report token": lambda a: a.call(
            "POST", "/apis/authentication.k8s.io/v1/tokenreviews",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
             "spec": {"token": agent_token, "audiences": [REPORT_AUDIENCE]}}),
        # fail over: gate condition; re-read a pod after a precondition conflict
        "gate a pod": lambda a: a.call(
            "PATCH", f"{ns}/pods/{world.leader}/status", {"status": {"conditions": [
                {"type": "gpu-supervisor.io/serving", "status": "False"}]}}, MERGE),
        "re-read a pod": lambda a: a.call("GET", f"{ns}/pods/{world.leader}"),
        "record an Event about a pod": lambda a: a.call(
            "POST", f"{ns}/events", event(world.ns, "Pod", world.leader)),
        # quarantine: read-modify-write the node, our NodeCondition, Event in "default"
        "read a node": lambda a: a.call("GET", f"/api/v1/nodes/{node}"),
        "cordon and taint a node": lambda a: a.call(
            "PATCH", f"/api/v1/nodes/{node}", {"spec": {"unschedulable": True}}, MERGE),
        "mark a node quarantined": lambda a: a.call(
            "PATCH", f"/api/v1/nodes/{node}/status", {"status": {"conditions": [
                {"type": "GPUSupervisorQuarantined", "status": "True"}]}}, MERGE),
        "record an Event about a node": lambda a: a.call(
            "POST", "/api/v1/namespaces/default/events", event("default", "Node", node)),
        # restart group: delete its pods
        "delete a pod": lambda a: a.call("DELETE", f"{ns}/pods/{world.worker}"),
        # ingest: the issuer keys report tokens are checked against (every
        # ServiceAccount may read them: the API server's own bootstrap policy)
        "read the issuer keys": lambda a: a.call("GET", "/openid/v1/jwks",
                                                 accept="application/jwk-set+json"),
        # ingest: which pods are our agents
        "list agent pods": lambda a: a.call(
            "GET", f"{own}/pods", labelSelector=cfg["agent_pod_selector"]),
        # degrade: scale through /scale, read readiness, shift traffic
        "read a Deployment's scale": lambda a: a.call("GET", f"{apps}/scale"),
        "scale a Deployment": lambda a: a.call("PATCH", f"{apps}/scale",
                                               {"spec": {"replicas": 1}}, MERGE),
        "read an LWS's scale": lambda a: a.call("GET", f"{lws}/scale"),
        "scale an LWS": lambda a: a.call("PATCH", f"{lws}/scale", {"spec": {"replicas": 2}},
                                         MERGE),
        "count a backend's ready endpoints": lambda a: a.call(
            "GET", f"/apis/discovery.k8s.io/v1/namespaces/{world.ns}/endpointslices",
            labelSelector="kubernetes.io/service-name=small"),
        "count a selector's ready pods": lambda a: a.call(
            "GET", f"{ns}/pods", labelSelector="model=small"),
        "read an HTTPRoute": lambda a: a.call("GET", route),
        "shift an HTTPRoute's weights": lambda a: read_then_put(a, route),
        "read a Service": lambda a: a.call("GET", f"{ns}/services/llm"),
        "switch a Service's selector": lambda a: read_then_put(a, f"{ns}/services/llm"),
        # leader election (election.py) and incident state (store.py)
        "create the Lease": lambda a: a.call("POST", lease, {
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": cfg["lease_name"]}, "spec": {"holderIdentity": "x"}}),
        "renew the Lease": lambda a: read_then_put(a, f"{lease}/{cfg['lease_name']}"),
        "create the state ConfigMap": lambda a: a.call("POST", f"{own}/configmaps", {
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": cfg["state_configmap"]}, "data": {"state.json": "{}"}}),
        "read the state": lambda a: a.call("GET",
                                           f"{own}/configmaps/{cfg['state_configmap']}"),
        "save the state": lambda a: a.call(
            "PATCH", f"{own}/configmaps/{cfg['state_configmap']}",
            {"data": {"state.json": "{\"x\": 1}"}}, MERGE),
    }


async def run_all(api: Api, calls: dict[str, Call]) -> dict[str, int]:
    return {name: (await call(api))[0] for name, call in calls.items()}


# --- minimality: the role without one verb -------------------------------------------------

def grants(objects: list[dict[str, Any]]) -> list[tuple[int, int, str]]:
    """(object index, rule index, verb) for every verb of every role."""
    return [(i, r, verb) for i, obj in enumerate(objects) if obj["kind"] in ROLE_KINDS
            for r, rule in enumerate(obj["rules"]) for verb in rule["verbs"]]


def without(objects: list[dict[str, Any]], grant: tuple[int, int, str], tag: str,
            namespace: str) -> tuple[list[dict[str, Any]], str]:
    """A renamed copy of the role's RBAC minus one verb, bound to ServiceAccount ``tag``."""
    out = copy.deepcopy(objects)
    index, rule, verb = grant
    out[index]["rules"][rule]["verbs"].remove(verb)
    if not out[index]["rules"][rule]["verbs"]:
        del out[index]["rules"][rule]
    renamed = {}
    for obj in out:
        if obj["kind"] in ROLE_KINDS:
            renamed[obj["metadata"]["name"]] = obj["metadata"]["name"] + f"-{tag}"
    for obj in out:
        meta = obj["metadata"]
        for key in ("resourceVersion", "uid", "creationTimestamp"):
            meta.pop(key, None)
        if obj["kind"] in ROLE_KINDS:
            meta["name"] = renamed[meta["name"]]
        elif obj["kind"] in BINDING_KINDS:
            meta["name"] += f"-{tag}"
            obj["roleRef"]["name"] = renamed[obj["roleRef"]["name"]]
            obj["subjects"] = [{"kind": "ServiceAccount", "name": tag,
                                "namespace": namespace}]
    return [o for o in out if o["kind"] != "ServiceAccount"], tag


async def wait_until_bound(admin: Api, user: str, objects: list[dict[str, Any]]) -> None:
    """Until the authorizer's cache has every remaining grant (RBAC objects reach it
    through a watch, a few milliseconds after they are created)."""
    checks = []
    for obj in objects:
        if obj["kind"] not in ROLE_KINDS:
            continue
        spaces = [obj["metadata"].get("namespace", "")]
        if obj["kind"] == "ClusterRole":  # bound per namespace or cluster-wide
            spaces = [b["metadata"].get("namespace", "") for b in objects
                      if b["kind"] in BINDING_KINDS and b["roleRef"]["name"] ==
                      obj["metadata"]["name"]]
        for rule in obj["rules"]:
            resource, _, sub = rule["resources"][0].partition("/")
            for verb in rule["verbs"]:
                for space in spaces:
                    checks.append({"group": rule["apiGroups"][0], "resource": resource,
                                   "subresource": sub, "verb": verb, "namespace": space,
                                   "name": (rule.get("resourceNames") or [""])[0]})
    deadline = time.monotonic() + 20
    pending = checks
    while pending:
        left = []
        for attrs in pending:
            _, review = await admin.call(
                "POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews",
                {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
                 "spec": {"user": user, "groups": ["system:serviceaccounts",
                                                   "system:authenticated"],
                          "resourceAttributes": attrs}})
            if not review.get("status", {}).get("allowed"):
                left.append(attrs)
        pending = left
        assert time.monotonic() < deadline, f"grants never took effect for {user}: {pending}"
        if pending:
            await asyncio.sleep(0.05)


async def assert_every_grant_is_needed(cluster: KubeTestCluster, admin: Api,
                                       release: manifests.Release, component: str,
                                       calls: dict[str, Call]) -> None:
    objects = [o for o in release.of(manifests.RBAC_KINDS, component)
               if o["kind"] != "ServiceAccount"]
    unneeded = []
    for n, grant in enumerate(grants(objects)):
        variant, sa = without(objects, grant, f"{release.name}-drop{n}", release.namespace)
        async with await cluster.api_client() as client:
            await manifests.create(client, variant)
        await wait_until_bound(admin, f"system:serviceaccount:{release.namespace}:{sa}",
                               variant)
        probe = Api(cluster, await cluster.service_account_token(release.namespace, sa))
        try:
            answers = await run_all(probe, calls)
        finally:
            await probe.close()
        if 403 not in answers.values():
            obj = objects[grant[0]]
            unneeded.append(f"{obj['kind']} {obj['metadata']['name']}: "
                            f"{obj['rules'][grant[1]]['resources']} {grant[2]}")
    assert not unneeded, f"granted but never needed: {unneeded}"


# --- the roles ---------------------------------------------------------------------------------

@pytest.fixture(name="admin")
async def _admin(kube_cluster: KubeTestCluster) -> Any:
    api = Api(kube_cluster, kube_cluster.admin_token)
    yield api
    await api.close()


async def as_sa(cluster: KubeTestCluster, release: manifests.Release, component: str,
                **kw: Any) -> Api:
    token = await cluster.service_account_token(release.namespace,
                                                release.service_account(component), **kw)
    return Api(cluster, token)


class TestAgentRbac:
    async def test_the_agent_may_publish_about_its_node_and_nothing_else(
            self, kube_cluster: KubeTestCluster, admin: Api) -> None:
        """As the agent: read its Node, patch its conditions, record Events in "default" —
        all allowed; every grant needed; pods, cordon, node lists, Secrets and Events in
        other namespaces refused."""
        async with await kube_cluster.api_client() as client:
            release = await manifests.install_rbac(client, unique("gs"), "agent")
        world = await make_world(kube_cluster, admin)
        calls = agent_calls(world)
        api = await as_sa(kube_cluster, release, "agent")
        try:
            answers = await run_all(api, calls)
            assert all(200 <= code < 300 for code in answers.values()), answers
            ns = f"/api/v1/namespaces/{world.ns}"
            for method, path, body in [
                ("DELETE", f"{ns}/pods/{world.leader}", None),
                ("GET", f"{ns}/pods", None),
                ("PATCH", f"/api/v1/nodes/{world.nodes[0]}", {"spec": {"unschedulable": True}}),
                ("DELETE", f"/api/v1/nodes/{world.nodes[1]}", None),
                ("GET", "/api/v1/nodes", None),
                ("GET", "/api/v1/secrets", None),
                ("POST", f"{ns}/events", event(world.ns, "Pod", world.leader)),
            ]:
                code, _ = await api.call(method, path, body, MERGE if method == "PATCH"
                                         else "application/json")
                assert code == 403, (method, path, code)
        finally:
            await api.close()
        await assert_every_grant_is_needed(kube_cluster, admin, release, "agent", calls)


async def controller_release(cluster: KubeTestCluster, world: World,
                             values: dict[str, Any] | None = None
                             ) -> tuple[manifests.Release, str, dict[str, Call]]:
    """A fresh release's RBAC, an agent report token, and the controller's calls on
    ``world`` under that release."""
    async with await cluster.api_client() as client:
        release = await manifests.install_rbac(client, unique("gs"), values=values)
    agent_token = await cluster.service_account_token(
        release.namespace, release.service_account("agent"), audiences=[REPORT_AUDIENCE])
    return release, agent_token, controller_calls(world, release, agent_token)


class TestControllerRbac:
    async def test_the_controller_may_make_every_call_of_its_actions(
            self, kube_cluster: KubeTestCluster, admin: Api) -> None:
        """As the controller, with the chart's default (cluster-wide) binding: every
        request of its watches, ingest, actions, Lease and state succeeds; each grant is
        needed by one of them."""
        world = await make_world(kube_cluster, admin)
        release, _, calls = await controller_release(kube_cluster, world)
        api = await as_sa(kube_cluster, release, "controller")
        try:
            answers = await run_all(api, calls)
        finally:
            await api.close()
        assert all(200 <= code < 300 for code in answers.values()), answers
        await assert_every_grant_is_needed(kube_cluster, admin, release, "controller", calls)

    async def test_the_controller_can_never_run_code_read_secrets_or_take_other_leases(
            self, kube_cluster: KubeTestCluster, admin: Api) -> None:
        """No patch or replace of a Deployment or LWS (that would rewrite a pod template),
        no Secrets, no pods created, no exec, no node deleted, no Event rewritten, no
        ConfigMap or Lease but its own, no tokens minted."""
        async with await kube_cluster.api_client() as client:
            release = await manifests.install_rbac(client, unique("gs"))
        world = await make_world(kube_cluster, admin)
        ns = f"/api/v1/namespaces/{world.ns}"
        own = f"/api/v1/namespaces/{release.namespace}"
        apps = f"/apis/apps/v1/namespaces/{world.ns}/deployments/small"
        lws = f"/apis/leaderworkerset.x-k8s.io/v1/namespaces/{world.ns}/leaderworkersets/llama"
        template = {"spec": {"template": {"spec": {"containers": [
            {"name": "c", "image": "attacker/miner"}]}}}}
        _, deployment = await admin.call("GET", apps)
        lease = f"/apis/coordination.k8s.io/v1/namespaces/{release.namespace}/leases"
        async with await kube_cluster.api_client() as client:
            await manifests.create(client, [{
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "someone-elses", "namespace": release.namespace}}])
        api = await as_sa(kube_cluster, release, "controller")
        try:
            for method, path, body, ctype in [
                ("PATCH", apps, template, MERGE),
                ("PUT", apps, deployment, "application/json"),
                ("PATCH", lws, {"spec": {"leaderWorkerTemplate": {
                    "workerTemplate": template["spec"]["template"]}}}, MERGE),
                ("GET", f"{ns}/secrets/weights-token", None, "application/json"),
                ("GET", "/api/v1/secrets", None, "application/json"),
                ("POST", f"{ns}/pods", {"apiVersion": "v1", "kind": "Pod",
                                        "metadata": {"name": "evil"}, "spec": {
                                            "containers": [{"name": "c", "image": "x"}]}},
                 "application/json"),
                ("POST", f"{ns}/pods/{world.worker}/exec?command=sh", None,
                 "application/json"),
                ("DELETE", f"/api/v1/nodes/{world.nodes[1]}", None, "application/json"),
                ("PATCH", f"{ns}/events/x", {"message": "rewritten"}, MERGE),
                ("POST", f"{ns}/configmaps", {"apiVersion": "v1", "kind": "ConfigMap",
                                              "metadata": {"name": "x"}}, "application/json"),
                ("GET", f"{own}/configmaps/someone-elses", None, "application/json"),
                ("PATCH", f"{own}/configmaps/someone-elses", {"data": {"x": "1"}}, MERGE),
                ("GET", f"{lease}/someone-elses-lease", None, "application/json"),
                ("POST", f"/apis/coordination.k8s.io/v1/namespaces/{world.ns}/leases",
                 {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                  "metadata": {"name": "x"}}, "application/json"),
                ("POST", f"{own}/serviceaccounts/{release.service_account('agent')}/token",
                 {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                  "spec": {}}, "application/json"),
            ]:
                code, _ = await api.call(method, path, body, ctype)
                assert code == 403, (method, path, code)
        finally:
            await api.close()

    async def test_confined_to_listed_namespaces_the_controller_acts_only_there(
            self, kube_cluster: KubeTestCluster, admin: Api) -> None:
        """With controller.rbac.namespaces, the act role is bound per namespace: gate,
        restart and degrade work in a listed namespace and are refused in another; Events
        about Nodes still go to "default"; every grant is still needed."""
        world = await make_world(kube_cluster, admin)
        other = await make_world(kube_cluster, admin)
        release, agent_token, calls = await controller_release(
            kube_cluster, world, {"controller": {"rbac": {"namespaces": [world.ns]}}})
        api = await as_sa(kube_cluster, release, "controller")
        try:
            answers = await run_all(api, calls)
            assert all(200 <= code < 300 for code in answers.values()), answers
            elsewhere = {k: v for k, v in controller_calls(other, release, agent_token).items()
                         if k in ("gate a pod", "delete a pod", "scale a Deployment",
                                  "scale an LWS", "shift an HTTPRoute's weights",
                                  "record an Event about a pod")}
            refused = await run_all(api, elsewhere)
            assert set(refused.values()) == {403}, refused
        finally:
            await api.close()
        await assert_every_grant_is_needed(kube_cluster, admin, release, "controller", calls)


class TestSidecarRbac:
    async def test_a_sidecar_report_token_opens_nothing_on_the_api_server(
            self, kube_cluster: KubeTestCluster) -> None:
        """Sidecars need no RBAC: the chart grants them none, and the token they send with
        reports (audience gpu-supervisor) is not even accepted by the API server."""
        release = manifests.render(unique("gs"))
        assert not release.of(manifests.RBAC_KINDS, "sidecar")
        ns = unique("serving")
        await kube_cluster.ensure_namespace(ns)
        token = await kube_cluster.service_account_token(ns, "default",
                                                         audiences=[REPORT_AUDIENCE])
        api = Api(kube_cluster, token)
        try:
            for path in (f"/api/v1/namespaces/{ns}/pods", "/api/v1/nodes",
                         "/apis/authentication.k8s.io/v1"):
                assert (await api.call("GET", path))[0] == 401
        finally:
            await api.close()
