"""Incident state persisted in the cluster, so a new leader neither forgets nor repeats.

One ConfigMap holds the policy engine's snapshot (open incidents, steps done, cooldowns,
breaker history, degrade state) and the action *intents*: before a non-idempotent action
(deleting a group's pods) the executor records exactly what it is about to do — which pod
UIDs — and only then does it. A leader killed between the two leaves the intent behind;
its successor replays it with the same UID preconditions, so the pods are deleted at most
once however the hand-over falls.

The circuit breaker is reset by a person, through Kubernetes RBAC like any other change:
``kubectl -n gpu-supervisor annotate configmap gpu-supervisor-state
gpu-supervisor.io/reset-breaker=true`` — the leader sees it, resets and removes it.

Every write carries the ``resourceVersion`` last read. A 409 means another controller has
written since: we are no longer the one in charge, and ``Fenced`` stops us acting.
"""

from __future__ import annotations

import json
from typing import Any

from supervisor.errors import Fenced
from supervisor.kube import Fence, KubeClient

STATE_KEY = "state.json"
RESET_BREAKER_ANNOTATION = "gpu-supervisor.io/reset-breaker"



class StateStore:
    def __init__(self, kube: KubeClient, namespace: str, name: str) -> None:
        self._kube = kube
        self.namespace = namespace
        self.name = name
        self._path = f"/api/v1/namespaces/{namespace}/configmaps/{name}"
        self._resource_version: str | None = None
        self.writes = 0

    async def load(self) -> dict[str, Any]:
        """Read the state (creating an empty one) and remember its version for fencing."""
        cm = await self._kube.request("GET", self._path, ok_statuses=frozenset({404}))
        if not cm:
            body = {"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": self.name, "namespace": self.namespace,
                                 "labels": {"app.kubernetes.io/name": "gpu-supervisor"}},
                    "data": {STATE_KEY: "{}"}}
            cm = await self._kube.request(
                "POST", f"/api/v1/namespaces/{self.namespace}/configmaps", body=body,
                ok_statuses=frozenset({409}))
            if not cm:  # created concurrently by another replica
                cm = await self._kube.request("GET", self._path)
        self._resource_version = cm["metadata"]["resourceVersion"]
        state: dict[str, Any] = json.loads(cm.get("data", {}).get(STATE_KEY) or "{}")
        return state

    async def save(self, state: dict[str, Any], fence: Fence | None = None) -> None:
        if self._resource_version is None:
            raise Fenced("state was never loaded by this controller")
        body = {"metadata": {"resourceVersion": self._resource_version},
                "data": {STATE_KEY: json.dumps(state, sort_keys=True)}}
        result = await self._kube.request(
            "PATCH", self._path, body=body, content_type="application/merge-patch+json",
            ok_statuses=frozenset({409}), retry=False, fence=fence)
        if not result:
            self._resource_version = None
            raise Fenced(f"ConfigMap {self.namespace}/{self.name} changed under us")
        self._resource_version = result["metadata"]["resourceVersion"]
        self.writes += 1

    async def take_breaker_reset(self) -> bool:
        """True once if someone annotated the ConfigMap asking for a breaker reset."""
        cm = await self._kube.request("GET", self._path, ok_statuses=frozenset({404}))
        annotations = (cm.get("metadata", {}).get("annotations") or {}) if cm else {}
        if annotations.get(RESET_BREAKER_ANNOTATION) != "true":
            return False
        body = {"metadata": {"resourceVersion": cm["metadata"]["resourceVersion"],
                             "annotations": {RESET_BREAKER_ANNOTATION: None}}}
        result = await self._kube.request(
            "PATCH", self._path, body=body, content_type="application/merge-patch+json",
            ok_statuses=frozenset({409}), retry=False)
        if not result:
            return False  # changed under us; the next pass sees it again
        self._resource_version = result["metadata"]["resourceVersion"]
        return True
