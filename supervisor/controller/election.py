"""Leader election on a ``coordination.k8s.io/v1`` Lease, with a fencing check for actions.

Written here rather than taken from ``kubernetes_asyncio.leaderelection`` because acting
safely needs two things that library does not expose: a cheap "am I *still* the leader
right now?" check before every write (``is_leader``), and expiry judged on *local*
monotonic time since we last saw the record change — the client-go rule — so clock skew
between controller replicas cannot make two of them leader at once.

- A candidate takes the Lease when it does not exist, or when its record has not changed
  for ``lease_duration`` seconds of our own monotonic time.
- The leader renews every ``retry_period``. Updates carry the ``resourceVersion`` they
  read, so two candidates racing for the same Lease cannot both win: the loser gets 409.
- ``is_leader()`` is True only while the last successful renewal is younger than
  ``renew_deadline`` (< ``lease_duration``): a leader cut off from the API server stops
  acting before anyone else can take over.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from typing import Any

import structlog

from supervisor.errors import KubeError
from supervisor.kube import KubeClient
from supervisor.runtime.clock import Clock

log = structlog.get_logger(__name__)


def _micro_time(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaseElector:
    def __init__(self, kube: KubeClient, namespace: str, name: str, identity: str,
                 clock: Clock, *, lease_duration: float = 15.0, renew_deadline: float = 10.0,
                 retry_period: float = 2.0) -> None:
        if not lease_duration > renew_deadline > retry_period > 0:
            raise ValueError("need lease_duration > renew_deadline > retry_period > 0")
        self._kube = kube
        self._path = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/{name}"
        self._collection = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self._clock = clock
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self._last_renew: float | None = None
        self._observed: tuple[str, float] | None = None  # (record fingerprint, seen at)
        self.holder: str | None = None
        self.transitions = 0
        self.listeners: list[Callable[[bool], None]] = []
        self._was_leader = False

    def remaining(self) -> float:
        """Seconds we may still act: ``renew_deadline`` after the start of our last
        successful renewal, 0 when we are not the leader. Another replica can take over
        only ``lease_duration`` after it last saw the record change, so whatever we do
        within this time is over before anyone else may act."""
        if self._last_renew is None:
            return 0.0
        return max(0.0, self.renew_deadline - (self._clock.monotonic() - self._last_renew))

    def is_leader(self) -> bool:
        """Safe to act: we renewed the Lease less than ``renew_deadline`` seconds ago."""
        return self.remaining() > 0

    async def run(self) -> None:
        """Acquire and renew forever; listeners hear every change of leadership."""
        while True:
            try:
                await self.try_acquire_or_renew()
            except KubeError as exc:
                log.warning("lease update failed", lease=self.name, error=str(exc))
            self._notify()
            await asyncio.sleep(self.retry_period)

    def _notify(self) -> None:
        leading = self.is_leader()
        if leading != self._was_leader:
            self._was_leader = leading
            log.info("leadership changed", leader=leading, identity=self.identity,
                     lease=self.name)
            for listener in self.listeners:
                listener(leading)

    async def release(self) -> None:
        """Give the Lease up on a clean shutdown so a standby takes over at once."""
        if not self.is_leader():
            return
        self._last_renew = None
        try:
            lease = await self._kube.request("GET", self._path, retry=False)
            if lease.get("spec", {}).get("holderIdentity") == self.identity:
                lease["spec"]["holderIdentity"] = ""
                lease["spec"]["leaseDurationSeconds"] = 1
                await self._kube.request("PUT", self._path, body=lease, retry=False)
        except KubeError as exc:
            log.warning("lease release failed", error=str(exc))
        self._notify()

    async def try_acquire_or_renew(self) -> bool:
        now_wall = self._clock.wall()
        now = self._clock.monotonic()
        lease = await self._kube.request("GET", self._path, ok_statuses=frozenset({404}),
                                         retry=False)
        spec_new = {"holderIdentity": self.identity,
                    "leaseDurationSeconds": round(self.lease_duration),
                    "acquireTime": _micro_time(now_wall), "renewTime": _micro_time(now_wall),
                    "leaseTransitions": 0}
        if not lease:
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace},
                    "spec": spec_new}
            created = await self._kube.request("POST", self._collection, body=body,
                                               ok_statuses=frozenset({409}), retry=False)
            return self._won(created, now)
        spec: dict[str, Any] = lease.get("spec", {})
        holder = spec.get("holderIdentity") or ""
        self.holder = holder or None
        self.transitions = int(spec.get("leaseTransitions") or 0)
        fingerprint = f"{holder}|{spec.get('renewTime')}|{lease['metadata']['resourceVersion']}"
        # A record is seen when the answer arrives, not when we asked: a read held on a
        # slow path for longer than a lease duration would otherwise make the current
        # leader's fresh record look unchanged that long, and we would depose it. (Our
        # own renewal, below, counts from before the read: the safe side there.)
        seen_at = self._clock.monotonic()
        if self._observed is None or self._observed[0] != fingerprint:
            self._observed = (fingerprint, seen_at)
        if holder != self.identity:
            duration = float(spec.get("leaseDurationSeconds") or self.lease_duration)
            expired = not holder or seen_at - self._observed[1] >= duration
            if not expired:
                self._last_renew = None
                return False
            spec_new["leaseTransitions"] = self.transitions + 1
        else:
            spec_new["acquireTime"] = spec.get("acquireTime") or spec_new["acquireTime"]
            spec_new["leaseTransitions"] = self.transitions
        lease["spec"] = spec_new  # metadata keeps the resourceVersion we read: 409 on a race
        updated = await self._kube.request("PUT", self._path, body=lease,
                                           ok_statuses=frozenset({409}), retry=False)
        return self._won(updated, now)

    def _won(self, lease: dict[str, Any], now: float) -> bool:
        if not lease:  # 409: someone else wrote first
            self._last_renew = None
            return False
        self._last_renew = now
        self.holder = self.identity
        self.transitions = int(lease.get("spec", {}).get("leaseTransitions") or 0)
        return True
