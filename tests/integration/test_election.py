"""Leader election on the real API server, with one candidate's path to it gone slow.

A candidate may take the Lease only when the record has not changed for a whole lease
duration *as it has seen it*: time its own requests spent on the way is no evidence that
the leader stopped renewing.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from simulator.controlplane.cluster import KubeTestCluster
from supervisor.controller.election import LeaseElector
from supervisor.kube import KubeClient
from supervisor.runtime.clock import SystemClock
from tests.integration.api_proxy import ApiProxy
from tests.integration.cluster_objects import unique
from tests.kubeenv import manifests

pytestmark = pytest.mark.kube

LEASE_SECONDS = 2.0


@dataclass
class Lease:
    kubeconfig: Path  # the controller's credentials of a release of its own
    namespace: str
    name: str

    def elector(self, kube: KubeClient, identity: str) -> LeaseElector:
        return LeaseElector(kube, self.namespace, self.name, identity, SystemClock(),
                            lease_duration=LEASE_SECONDS, renew_deadline=1.5,
                            retry_period=0.5)


@pytest.fixture(name="lease")
async def _lease(kube_cluster: KubeTestCluster, tmp_path: Path) -> Lease:
    async with await kube_cluster.api_client() as admin:
        release = await manifests.install_rbac(admin, unique("gs"), "controller")
    token = await kube_cluster.service_account_token(
        release.namespace, release.service_account("controller"))
    return Lease(kube_cluster.write_kubeconfig(tmp_path / "kc", token), release.namespace,
                 release.controller_settings()["controller"]["lease_name"])


async def test_a_candidate_whose_read_was_held_does_not_depose_a_renewing_leader(
        kube_cluster: KubeTestCluster, lease: Lease) -> None:
    """A leads; its path goes slow and its next read of the Lease is held for longer than
    a lease duration. B takes the Lease meanwhile (A really stopped renewing). When A's
    read comes back it shows B's fresh record — seen now, not when A asked: A's next
    round, right after, must leave the Lease to B, who renewed a moment ago."""
    proxy = await ApiProxy(kube_cluster).start()
    config = json.loads(lease.kubeconfig.read_text())
    config["clusters"][0]["cluster"] = {"server": proxy.url}
    slow = lease.kubeconfig.with_name("kc-through-proxy")
    slow.write_text(json.dumps(config))
    kube_a = await KubeClient.connect(str(slow))
    kube_b = await KubeClient.connect(str(lease.kubeconfig))
    a, b = lease.elector(kube_a, "a"), lease.elector(kube_b, "b")
    try:
        assert await a.try_acquire_or_renew()
        assert not await b.try_acquire_or_renew()  # B sees A's record from now on
        proxy.hold()
        a_reads = asyncio.create_task(a.try_acquire_or_renew())
        await proxy.until_held()
        await asyncio.sleep(LEASE_SECONDS + 0.5)  # A's record unchanged this long: B takes it
        assert await b.try_acquire_or_renew()
        proxy.release()
        assert not await a_reads  # B's record, just written
        assert not await a.try_acquire_or_renew()  # unchanged for a moment only
        assert await b.try_acquire_or_renew()  # B is still the leader
        assert b.holder == "b"
    finally:
        await proxy.close()
        await kube_a.close()
        await kube_b.close()
