"""The pods a report may come from, as the controller's watches have them.

The ingest binds every report to the pod its token is bound to (``ingest.Directory``);
this answers its questions from what the controller watches anyway — the members of
pipeline groups (the health model) and, when ``controller.agent_pod_selector`` is set,
the agent pods of our DaemonSet — so that a report's node, group and the node of a group
member it names come from Pod objects, never from the report.
"""

from __future__ import annotations

import re
from typing import Any

from supervisor.controller.ingest import WatchedPod
from supervisor.controller.model import HealthModel


class Senders:
    """``ingest.Directory`` over the health model and the agent pods."""

    def __init__(self, model: HealthModel, *, agents_watched: bool) -> None:
        self._model = model
        self._agents_watched = agents_watched
        self._agents: dict[str, str] = {}  # agent pod UID → its node
        self._agent_uid: dict[tuple[str, str], str] = {}  # (namespace, name) → UID

    # --- the agent pod watch -----------------------------------------------------------------

    def upsert_agent(self, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata", {})
        node = (obj.get("spec") or {}).get("nodeName")
        uid = meta.get("uid", "")
        if node and uid:
            self._agents[uid] = node
            self._agent_uid[(meta.get("namespace", ""), meta.get("name", ""))] = uid

    def delete_agent(self, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata", {})
        self._agents.pop(meta.get("uid", ""), None)
        key = (meta.get("namespace", ""), meta.get("name", ""))
        if self._agent_uid.get(key) == meta.get("uid"):
            del self._agent_uid[key]

    # --- ingest.Directory ----------------------------------------------------------------------

    def agents_watched(self) -> bool:
        return self._agents_watched

    def agent_node(self, uid: str) -> str | None:
        return self._agents.get(uid)

    def group_pod(self, uid: str) -> WatchedPod | None:
        pod = self._model.pod(uid)
        if pod is None:
            return None
        return WatchedPod(namespace=pod.namespace, name=pod.name, uid=pod.uid, node=pod.node,
                          group=pod.group)

    def member(self, group: str, subject_id: str) -> tuple[bool, str | None]:
        """A member named the way the sidecars name one: ``namespace/pod`` (a pod of the
        group, or — for a LeaderWorkerSet, whose pods are named ``<lws>-<group>`` and
        ``<lws>-<group>-<worker>`` — a member being recreated right now), or
        ``<group>/member-<rank>`` when the sidecar could not resolve its name."""
        info = self._model.groups.get(group)
        if info is None:
            return False, None
        size = self._model.expected_size(info) or len(info.pods)
        rank = _rank_of(subject_id, group)
        if rank is not None:
            pods = [p for p in info.pods.values() if p.worker_index == rank]
            return rank < max(size, len(info.pods)), pods[0].node if pods else None
        namespace, _, name = subject_id.partition("/")
        if namespace != info.namespace:
            return False, None
        for pod in info.pods.values():
            if pod.name == name:
                return True, pod.node
        if info.kind == "lws":
            index = group.rsplit("/", 1)[-1]
            worker = _lws_worker(name, info.owner, index)
            return worker is not None and worker < size, None
        return False, None


def _rank_of(subject_id: str, group: str) -> int | None:
    prefix = f"{group}/member-"
    tail = subject_id.removeprefix(prefix)
    return int(tail) if subject_id.startswith(prefix) and tail.isdigit() else None


def _lws_worker(name: str, owner: str, index: str) -> int | None:
    """The worker index of an LWS pod name (``<lws>-<group>`` is worker 0), or None if
    the name is not one of that group's."""
    leader = f"{owner}-{index}"
    if name == leader:
        return 0
    match = re.fullmatch(re.escape(leader) + r"-(\d+)", name)
    return int(match.group(1)) if match else None
