"""The policy file: YAML in, a frozen ``Policy`` out, or a ``PolicyError`` naming the field.

A policy is data, not code, so that it can be reviewed, diffed and hot-reloaded; the price
is that a typo must never turn into a rule that quietly does nothing. So validation is strict
and happens all at once, before the policy is used (the controller keeps the last good policy
when a reload fails):

- every key is known (``rules[0].when.fault_class`` is an error, not an ignored key), and a
  key given twice in one mapping is an error rather than "the last one wins";
- every value has the right type and bounds, durations are ``500ms``/``30s``/``5m``/``1h``
  or a number of seconds;
- fault classes and actions come from closed lists, rule names are unique.

Errors read ``field: rule`` — ``rules[2].then[0].action: must be one of [...], got 'reboot'``
— the way ``supervisor.config`` reports settings. Defaults are the values in the dataclasses
below, so a minimal policy is a list of rules.

The values are frozen, with durations stored in seconds (``*_seconds``) so that the engine
never parses anything.
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any, NoReturn, TypeVar

import yaml

from policies.model import FAULT_CLASSES, LADDER_ACTIONS, SEVERITIES, Action

T = TypeVar("T")

SCOPES: tuple[str, ...] = ("group", "node")
DEGRADE_RULE = "degrade"  # the rule name degrade/restore decisions carry; reserved

_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
# Rule names become part of incident ids ("rule/scope/id"), so no slashes or blanks.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class PolicyError(ValueError):
    """The policy is invalid. ``field`` is the path of the offending value
    (``rules[2].then[0].action``), ``rule`` what it broke."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule


@dataclass(frozen=True, slots=True)
class When:
    """Which signals a rule is about, and how long they must have lasted."""

    fault_classes: tuple[str, ...]
    min_severity: str = "warning"
    scope: str = "group"  # what one incident is about: a group key or a node name
    for_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class Step:
    """One rung of the escalation ladder."""

    action: Action
    after_seconds: float = 0.0  # after the previous step was confirmed (step 0: the opening)


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    when: When
    then: tuple[Step, ...]
    cooldown_seconds: float | None = None  # None: the policy's default
    lift_quarantine: bool = False  # unquarantine the nodes it quarantined when it closes


@dataclass(frozen=True, slots=True)
class Budgets:
    max_groups_disrupted: int = 1
    min_healthy_groups: int = 1
    min_healthy_groups_by_model: Mapping[str, int] = field(
        default_factory=lambda: MappingProxyType({}))

    def min_healthy(self, model: str) -> int:
        return self.min_healthy_groups_by_model.get(model, self.min_healthy_groups)


@dataclass(frozen=True, slots=True)
class CircuitBreaker:
    max_actions: int = 20
    window_seconds: float = 300.0


@dataclass(frozen=True, slots=True)
class Degrade:
    model: str
    fallback: str
    floor: int = 1  # degrade while fewer healthy primary groups than this
    restore_after_seconds: float = 300.0  # healthy again this long without a dip → restore


@dataclass(frozen=True, slots=True)
class Policy:
    rules: tuple[Rule, ...] = ()
    degrade: tuple[Degrade, ...] = ()
    dry_run: bool = False
    cooldown_seconds: float = 600.0
    budgets: Budgets = field(default_factory=Budgets)
    circuit_breaker: CircuitBreaker = field(default_factory=CircuitBreaker)

    def rule(self, name: str) -> Rule | None:
        for rule in self.rules:
            if rule.name == name:
                return rule
        return None

    def degrade_for(self, model: str) -> Degrade | None:
        """The degrade entry of a primary model (the action layer needs its fallback)."""
        for entry in self.degrade:
            if entry.model == model:
                return entry
        return None


# --- reading ----------------------------------------------------------------------------

class _Loader(yaml.SafeLoader):
    """Safe YAML that refuses a key given twice in one mapping: with plain ``safe_load`` the
    second silently wins, which is how a rule's ``for:`` gets lost in a long file."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            mark = key_node.start_mark
            raise PolicyError("policy", f"line {mark.line + 1}: key {key!r} appears twice "
                                        "in one mapping")
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _fail(path: str, rule: str) -> NoReturn:
    raise PolicyError(path, rule)


def _type_name(value: object) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
            type(None): "nothing"}.get(type(value), type(value).__name__)


def _mapping(value: object, path: str, allowed: Collection[str],
             required: Collection[str] = ()) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        _fail(path, f"must be a mapping, got {_type_name(value)}")
    for key in value:
        if key not in allowed:
            _fail(_join(path, str(key)), f"unknown key; expected one of {sorted(allowed)}")
    for key in required:
        if key not in value:
            _fail(_join(path, key), "is required")
    return value


def _join(path: str, key: str) -> str:
    return key if path == "policy" else f"{path}.{key}"


def _list(value: object, path: str, *, non_empty: bool = False) -> Sequence[Any]:
    if not isinstance(value, list):
        _fail(path, f"must be a list, got {_type_name(value)}")
    if non_empty and not value:
        _fail(path, "must not be empty")
    return value


def _bool(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        _fail(path, f"must be true or false, got {value!r}")
    return value


def _int(value: object, path: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(path, f"must be an integer >= {minimum}, got {value!r}")
    return value


def _name(value: object, path: str) -> str:
    if not isinstance(value, str) or not value.strip():
        _fail(path, f"must be a non-empty string, got {value!r}")
    return value


def _choice(value: object, path: str, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        _fail(path, f"must be one of {list(choices)}, got {value!r}")
    return value


def parse_duration(value: object, path: str = "duration", *, positive: bool = False) -> float:
    """Seconds from ``500ms``, ``30s``, ``5m``, ``1h`` or a plain number of seconds."""
    seconds: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
    if seconds is None or not math.isfinite(seconds):
        _fail(path, f"must be a duration like 30s, 5m, 1h or a number of seconds, got {value!r}")
    if seconds < 0 or (positive and seconds == 0):
        _fail(path, f"must be a duration {'> 0' if positive else '>= 0'}, got {value!r}")
    return seconds


def _get(raw: Mapping[str, Any], key: str, path: str, convert: Callable[[Any, str], T],
         default: T) -> T:
    return convert(raw[key], _join(path, key)) if key in raw else default


def _given(raw: Mapping[str, Any], path: str,
           fields: Mapping[str, tuple[str, Callable[[Any, str], Any]]]) -> dict[str, Any]:
    """Keyword arguments for the keys present in ``raw`` (YAML key → (attribute, converter));
    absent keys take the dataclass default, so each default is written down once."""
    return {attr: convert(raw[key], _join(path, key))
            for key, (attr, convert) in fields.items() if key in raw}


def _when(raw: object, path: str, known: Collection[str] | None) -> When:
    when = _mapping(raw, path, ("fault_classes", "min_severity", "scope", "for"),
                    required=("fault_classes",))
    classes: list[str] = []
    for i, item in enumerate(_list(when["fault_classes"], f"{path}.fault_classes",
                                   non_empty=True)):
        item_path = f"{path}.fault_classes[{i}]"
        name = _name(item, item_path)
        if known is not None and name not in known:
            _fail(item_path, f"unknown fault class {name!r}; known: {sorted(known)}")
        if name not in classes:
            classes.append(name)
    return When(fault_classes=tuple(classes), **_given(when, path, {
        "min_severity": ("min_severity", lambda v, p: _choice(v, p, SEVERITIES)),
        "scope": ("scope", lambda v, p: _choice(v, p, SCOPES)),
        "for": ("for_seconds", parse_duration),
    }))


def _step(raw: object, path: str) -> Step:
    step = _mapping(raw, path, ("action", "after"), required=("action",))
    action = _choice(step["action"], f"{path}.action", [a.value for a in LADDER_ACTIONS])
    return Step(action=Action(action),
                **_given(step, path, {"after": ("after_seconds", parse_duration)}))


def _rule(raw: object, path: str, known: Collection[str] | None) -> Rule:
    rule = _mapping(raw, path, ("name", "when", "then", "cooldown", "lift_quarantine"),
                    required=("name", "when", "then"))
    name = rule["name"]
    if not isinstance(name, str) or not _NAME.match(name):
        _fail(f"{path}.name", "must be a name of letters, digits, '.', '_' or '-' (it becomes "
                              f"part of incident ids), got {name!r}")
    if name == DEGRADE_RULE:
        _fail(f"{path}.name", f"{DEGRADE_RULE!r} is reserved for the degrade entries")
    steps = _list(rule["then"], f"{path}.then", non_empty=True)
    return Rule(
        name=name,
        when=_when(rule["when"], f"{path}.when", known),
        then=tuple(_step(s, f"{path}.then[{i}]") for i, s in enumerate(steps)),
        **_given(rule, path, {"cooldown": ("cooldown_seconds", parse_duration),
                              "lift_quarantine": ("lift_quarantine", _bool)}),
    )


def _budgets(raw: object, path: str) -> Budgets:
    budgets = _mapping(raw, path, ("max_groups_disrupted", "min_healthy_groups",
                                   "min_healthy_groups_by_model"))
    by_model: dict[str, int] = {}
    if "min_healthy_groups_by_model" in budgets:
        by_path = f"{path}.min_healthy_groups_by_model"
        raw_by_model = budgets["min_healthy_groups_by_model"]
        if not isinstance(raw_by_model, dict):
            _fail(by_path, f"must be a mapping of model name to count, got "
                           f"{_type_name(raw_by_model)}")
        for model, count in raw_by_model.items():
            by_model[_name(model, by_path)] = _int(count, f"{by_path}.{model}", 0)
    return Budgets(min_healthy_groups_by_model=MappingProxyType(by_model), **_given(
        budgets, path, {
            "max_groups_disrupted": ("max_groups_disrupted", lambda v, p: _int(v, p, 1)),
            "min_healthy_groups": ("min_healthy_groups", lambda v, p: _int(v, p, 0)),
        }))


def _breaker(raw: object, path: str) -> CircuitBreaker:
    breaker = _mapping(raw, path, ("max_actions", "window"))
    return CircuitBreaker(**_given(breaker, path, {
        "max_actions": ("max_actions", lambda v, p: _int(v, p, 1)),
        "window": ("window_seconds", lambda v, p: parse_duration(v, p, positive=True)),
    }))


def _degrade(raw: object, path: str) -> Degrade:
    entry = _mapping(raw, path, ("model", "fallback", "floor", "restore_after"),
                     required=("model", "fallback"))
    model = _name(entry["model"], f"{path}.model")
    fallback = _name(entry["fallback"], f"{path}.fallback")
    if fallback == model:
        _fail(f"{path}.fallback", f"must differ from model {model!r}")
    return Degrade(model=model, fallback=fallback, **_given(entry, path, {
        "floor": ("floor", lambda v, p: _int(v, p, 1)),
        "restore_after": ("restore_after_seconds", parse_duration),
    }))


def _unique(names: Sequence[str], path: str, attr: str, what: str) -> None:
    first: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in first:
            _fail(f"{path}[{i}].{attr}",
                  f"duplicate {what} {name!r} (also {path}[{first[name]}].{attr})")
        first[name] = i


def parse_policy(raw: object, *,
                 fault_classes: Collection[str] | None = FAULT_CLASSES) -> Policy:
    """A ``Policy`` from already-parsed YAML/JSON data (see ``load_policy``)."""
    top = _mapping(raw, "policy", ("dry_run", "cooldown", "budgets", "circuit_breaker",
                                   "rules", "degrade"))
    raw_rules: Sequence[Any] = _get(top, "rules", "policy", _list, [])
    rules = tuple(_rule(r, f"rules[{i}]", fault_classes) for i, r in enumerate(raw_rules))
    _unique([r.name for r in rules], "rules", "name", "rule name")
    raw_degrade: Sequence[Any] = _get(top, "degrade", "policy", _list, [])
    degrade = tuple(_degrade(d, f"degrade[{i}]") for i, d in enumerate(raw_degrade))
    _unique([d.model for d in degrade], "degrade", "model", "degrade entry for model")
    return Policy(rules=rules, degrade=degrade, **_given(top, "policy", {
        "dry_run": ("dry_run", _bool),
        "cooldown": ("cooldown_seconds", parse_duration),
        "budgets": ("budgets", _budgets),
        "circuit_breaker": ("circuit_breaker", _breaker),
    }))


def load_policy(text: str, *,
                fault_classes: Collection[str] | None = FAULT_CLASSES) -> Policy:
    """Parse and validate a policy document; ``PolicyError`` names the first bad field.

    ``fault_classes`` is the vocabulary rules may name (``None`` accepts any name).
    """
    try:
        raw = yaml.load(text, Loader=_Loader)  # _Loader is a SafeLoader: no arbitrary objects
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise PolicyError("policy", f"is not valid YAML: {where}{exc.problem}") from exc
    except yaml.YAMLError as exc:
        raise PolicyError("policy", f"is not valid YAML: {exc}") from exc
    if raw is None:
        raise PolicyError("policy", "is empty")
    return parse_policy(raw, fault_classes=fault_classes)


def load_policy_file(path: str | os.PathLike[str], *,
                     fault_classes: Collection[str] | None = FAULT_CLASSES) -> Policy:
    """``load_policy`` on a file; a file that cannot be read is a ``PolicyError`` too, so the
    caller's "keep the last good policy" path covers it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(os.fspath(path), f"cannot be read: {exc}") from exc
    return load_policy(text, fault_classes=fault_classes)


@functools.cache
def default_policy() -> Policy:
    """The shipped ``policies/default.yaml`` (parsed once; a ``Policy`` is immutable)."""
    text = resources.files("policies").joinpath("default.yaml").read_text(encoding="utf-8")
    return load_policy(text)
