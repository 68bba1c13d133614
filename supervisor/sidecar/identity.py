"""Who this sidecar is: its pod, its group, its rank and where its peers are.

From LeaderWorkerSet's environment, which LWS injects into every container of the group's
pods: ``LWS_LEADER_ADDRESS`` (the leader's DNS name in the group's headless Service, e.g.
``llama-0.llama.serving``), ``LWS_GROUP_SIZE`` and ``LWS_WORKER_INDEX`` (0 = the leader).
LWS names the leader pod ``<lws>-<group>`` and worker *i* ``<lws>-<group>-<i>``, all under the
same subdomain, so every member's address follows from the leader's: worker *i* is the
leader's first DNS label plus ``-<i>``, with the same domain. The group is
``<namespace>/<lws>/<group>``, exactly the key the controller gives it.

Any other group kind (a KubeRay multi-host worker group, hand-made pods) states it in
settings instead: ``sidecar.group_name``, ``group_index``, ``group_size``, ``rank`` and
``peers`` (every member's address, index = rank). Settings win over the environment.

Peers are names, not IPs: a restarted pod comes back with a new IP under the same name, so
the sidecar resolves them again every ``resolve_seconds``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from supervisor.config import Settings
from supervisor.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Identity:
    namespace: str
    pod: str
    node: str
    group_name: str  # the LWS (or the configured group kind's) name
    group_index: str
    size: int
    rank: int
    peers: tuple[tuple[str, int], ...]  # (host, port) per rank, ours included
    pod_names: tuple[str, ...]  # pod name per rank ("" when only an IP is known)

    @property
    def group(self) -> str:
        """The group's key, as the controller knows it: namespace/name/index."""
        return f"{self.namespace}/{self.group_name}/{self.group_index}"


def _split(address: str, default_port: int) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if sep and port.isdigit() and not host.endswith("]") and ":" not in host:
        return host, int(port)
    if address.startswith("[") and "]:" in address:
        host, _, port = address[1:].partition("]:")
        return host, int(port)
    return address.strip("[]"), default_port


def identify(settings: Settings, env: Mapping[str, str] | None = None) -> Identity:
    """The identity from settings, else LWS's environment; ``ConfigError`` names what is
    missing."""
    env = os.environ if env is None else env
    s = settings.sidecar
    namespace = s.pod_namespace or env.get("POD_NAMESPACE", "")
    pod = s.pod_name or env.get("POD_NAME", "")
    leader = s.leader_address or env.get("LWS_LEADER_ADDRESS", "")
    size = s.group_size or int(env.get("LWS_GROUP_SIZE", "0") or 0)
    rank = s.rank if s.rank >= 0 else int(env.get("LWS_WORKER_INDEX", "-1") or -1)
    if not namespace:
        raise ConfigError("sidecar.pod_namespace", "unknown: set POD_NAMESPACE from the "
                          "downward API (metadata.namespace) or the setting")
    if not pod:
        raise ConfigError("sidecar.pod_name", "unknown: set POD_NAME from the downward API "
                          "(metadata.name) or the setting")
    if size < 1:
        raise ConfigError("sidecar.group_size", "unknown: LWS_GROUP_SIZE is not set; set "
                          "the group's size for groups that are not LeaderWorkerSets")
    if not 0 <= rank < size:
        raise ConfigError("sidecar.rank", f"must be 0..{size - 1} (LWS_WORKER_INDEX, or the "
                          f"setting), got {rank}")
    group_name, group_index = s.group_name, s.group_index
    if s.peers:
        if len(s.peers) != size:
            raise ConfigError("sidecar.peers", f"lists {len(s.peers)} members for a group of "
                              f"{size}")
        peers = tuple(_split(p, s.peer_port) for p in s.peers)
        pod_names = tuple("" if _is_ip(host) else host.split(".")[0] for host, _ in peers)
    elif leader:
        first, dot, domain = leader.partition(".")
        hosts = [leader] + [f"{first}-{i}{dot}{domain}" for i in range(1, size)]
        peers = tuple((h, s.peer_port) for h in hosts)
        pod_names = tuple(h.split(".")[0] for h in hosts)
        if not group_name or not group_index:
            name, _, index = first.rpartition("-")
            group_name, group_index = group_name or name, group_index or index
    else:
        raise ConfigError("sidecar.peers", "unknown: LWS_LEADER_ADDRESS is not set; list "
                          "every member's address for groups that are not LeaderWorkerSets")
    if not group_name or not group_index:
        raise ConfigError("sidecar.group_name", "unknown: set group_name and group_index "
                          "for groups that are not LeaderWorkerSets")
    names = list(pod_names)
    names[rank] = pod
    return Identity(namespace=namespace, pod=pod, node=settings.node_name,
                    group_name=group_name, group_index=group_index, size=size, rank=rank,
                    peers=peers, pod_names=tuple(names))


def _is_ip(host: str) -> bool:
    return ":" in host or host.replace(".", "").isdigit()
