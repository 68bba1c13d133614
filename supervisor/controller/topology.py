"""What the controller must know about the serving set-up beyond LWS labels.

``topology_file`` (YAML), validated like every setting (``ConfigError`` names the field)::

    group_kinds:                 # multi-pod replicas that are not LeaderWorkerSets
      - name: ray-workers
        selector: "ray.io/node-type=worker"   # equality-based label selector
        group_label: "ray.io/group"           # pods with the same value form one group
        model: llama-70b
    degrade:                     # how to serve the fallback model when policy says degrade
      - model: llama-70b
        workload: {kind: Deployment, namespace: serving, name: llama-8b, replicas: 2}
        traffic: {kind: HTTPRoute, namespace: serving, name: llm,
                  primary: llama-70b, fallback: llama-8b}   # backendRef names
        # or: traffic: {kind: Service, namespace: serving, name: llm,
        #               primary: "model=llama-70b", fallback: "model=llama-8b"}  # selectors
        ready_timeout_seconds: 600   # for the fallback's endpoints to be ready
        drain_seconds: 30            # restore gives traffic back over this long
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from supervisor.controller.actions import DegradeTarget, Traffic, Workload
from supervisor.controller.model import GroupKind
from supervisor.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Topology:
    kinds: list[GroupKind] = field(default_factory=list)
    degrade: dict[str, DegradeTarget] = field(default_factory=dict)


def _str(obj: dict[str, Any], key: str, where: str, choices: tuple[str, ...] = ()) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}.{key}", "must be a non-empty string")
    if choices and value not in choices:
        raise ConfigError(f"{where}.{key}", f"must be one of {list(choices)}, got {value!r}")
    return value


def _map(obj: Any, where: str, known: set[str]) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ConfigError(where, "must be a mapping")
    for key in obj:
        if key not in known:
            raise ConfigError(f"{where}.{key}", f"unknown key (known: {sorted(known)})")
    return obj


def parse_topology(raw: Any, where: str = "topology") -> Topology:
    raw = _map(raw or {}, where, {"group_kinds", "degrade"})
    kinds = []
    for i, raw_kind in enumerate(raw.get("group_kinds") or []):
        w = f"{where}.group_kinds[{i}]"
        item = _map(raw_kind, w, {"name", "selector", "group_label", "model"})
        kinds.append(GroupKind(name=_str(item, "name", w), selector=_str(item, "selector", w),
                               group_label=_str(item, "group_label", w),
                               model=str(item.get("model", ""))))
    degrade: dict[str, DegradeTarget] = {}
    for i, raw_target in enumerate(raw.get("degrade") or []):
        w = f"{where}.degrade[{i}]"
        item = _map(raw_target, w, {"model", "workload", "traffic", "ready_timeout_seconds",
                                    "drain_seconds"})
        wl = _map(item.get("workload"), f"{w}.workload", {"kind", "namespace", "name",
                                                          "replicas"})
        replicas = wl.get("replicas")
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1:
            raise ConfigError(f"{w}.workload.replicas", "must be an integer >= 1")
        tr = _map(item.get("traffic"), f"{w}.traffic", {"kind", "namespace", "name", "primary",
                                                        "fallback"})
        timeout = item.get("ready_timeout_seconds", 600)
        if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0:
            raise ConfigError(f"{w}.ready_timeout_seconds", "must be a number > 0")
        drain = item.get("drain_seconds", 30)
        if not isinstance(drain, int | float) or isinstance(drain, bool) or drain < 0:
            raise ConfigError(f"{w}.drain_seconds", "must be a number >= 0")
        model = _str(item, "model", w)
        degrade[model] = DegradeTarget(
            model=model,
            workload=Workload(kind=_str(wl, "kind", f"{w}.workload",
                                        ("Deployment", "LeaderWorkerSet")),
                              namespace=_str(wl, "namespace", f"{w}.workload"),
                              name=_str(wl, "name", f"{w}.workload"), replicas=replicas),
            traffic=Traffic(kind=_str(tr, "kind", f"{w}.traffic", ("HTTPRoute", "Service")),
                            namespace=_str(tr, "namespace", f"{w}.traffic"),
                            name=_str(tr, "name", f"{w}.traffic"),
                            primary=_str(tr, "primary", f"{w}.traffic"),
                            fallback=_str(tr, "fallback", f"{w}.traffic")),
            ready_timeout=float(timeout), drain_seconds=float(drain))
    return Topology(kinds=kinds, degrade=degrade)


def load_topology(path: str) -> Topology:
    if not path:
        return Topology()
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError("controller.topology_file", f"cannot read {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError("controller.topology_file", f"not valid YAML: {exc}") from exc
    return parse_topology(raw)
