"""Report ingest: agents (and later sidecars) POST their state here.

Hostile or broken input never takes the controller down and never poisons the model:

- no or bad bearer token → 401; a valid token of an identity not allowed to report → 403
  (checked through the TokenReview API, answers cached for ``token_cache_seconds`` so 4,096
  agents reporting every 10 s cost a review per token per minute, not 400 per second);
- body over ``max_bytes`` → 413, not JSON → 400, not a NodeReport → 422 naming the field;
- agents share one ServiceAccount, so the identity alone cannot tell one node's agent from
  another's; but a pod-bound token (what the kubelet mounts) names the node its pod runs
  on, and a report about any other node is refused with 403 — a compromised agent cannot
  get healthy nodes quarantined. Tokens without that binding are taken at their word.

Every outcome is counted; only accepted reports reach the health model.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from aiohttp import web

from supervisor.errors import KubeError
from supervisor.kube import KubeClient
from supervisor.runtime.clock import Clock

log = structlog.get_logger(__name__)

SEVERITIES = ("info", "warning", "critical")
NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"


class ReportInvalid(ValueError):
    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")


@dataclass(frozen=True, slots=True)
class ReportedFinding:
    fault_class: str
    severity: str
    subject_kind: str
    subject_id: str
    detail: str
    reason: str
    message: str
    first_seen: float  # reporter's wall clock
    last_seen: float


@dataclass(frozen=True, slots=True)
class NodeReport:
    node: str
    sequence: int
    sent_at: float
    gpus: int
    findings: tuple[ReportedFinding, ...]


def _field(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in obj:
        raise ReportInvalid(f"{where}{key}", "is required")
    value = obj[key]
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise ReportInvalid(f"{where}{key}", f"must be {names}")
    return value


def parse_node_report(body: Any, max_findings: int = 10_000) -> NodeReport:
    """Validate a NodeReport; ``ReportInvalid`` names the first bad field."""
    if not isinstance(body, dict):
        raise ReportInvalid("<body>", "must be a JSON object")
    if body.get("kind") != "NodeReport":
        raise ReportInvalid("kind", "must be NodeReport")
    node = _field(body, "node", str, "")
    if not node or len(node) > 253:
        raise ReportInvalid("node", "must be a node name")
    gpus = _field(body, "gpus", list, "")
    findings_raw = _field(body, "findings", list, "")
    if len(findings_raw) > max_findings:
        raise ReportInvalid("findings", f"at most {max_findings} entries")
    findings = []
    for i, raw in enumerate(findings_raw):
        where = f"findings[{i}]."
        if not isinstance(raw, dict):
            raise ReportInvalid(f"findings[{i}]", "must be an object")
        severity = _field(raw, "severity", str, where)
        if severity not in SEVERITIES:
            raise ReportInvalid(f"{where}severity", f"must be one of {list(SEVERITIES)}")
        subject = _field(raw, "subject", dict, where)
        findings.append(ReportedFinding(
            fault_class=_field(raw, "fault_class", str, where),
            severity=severity,
            subject_kind=_field(subject, "kind", str, f"{where}subject."),
            subject_id=_field(subject, "id", str, f"{where}subject."),
            detail=str(raw.get("detail", "")),
            reason=str(raw.get("reason", "")),
            message=str(raw.get("message", ""))[:1000],
            first_seen=float(_field(raw, "first_seen", (int, float), where)),
            last_seen=float(_field(raw, "last_seen", (int, float), where)),
        ))
    return NodeReport(node=node, sequence=int(_field(body, "sequence", int, "")),
                      sent_at=float(_field(body, "sent_at", (int, float), "")),
                      gpus=len(gpus), findings=tuple(findings))


class TokenCache:
    """TokenReview answers by token hash, positive for ``ttl`` s, negative for ``ttl/6``."""

    def __init__(self, kube: KubeClient, clock: Clock, ttl: float,
                 audiences: Sequence[str] = ()) -> None:
        self._kube = kube
        self._clock = clock
        self._ttl = ttl
        self._audiences = tuple(audiences)
        self._cache: dict[bytes, tuple[float, tuple[str, str | None] | None]] = {}
        self.reviews = 0

    async def identity(self, token: str) -> tuple[str, str | None] | None:
        """(username, node the token is bound to or None), or None if not authenticated."""
        key = hashlib.sha256(token.encode()).digest()
        now = self._clock.monotonic()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        self.reviews += 1
        ok, user, extra = await self._kube.review_token(token, self._audiences)
        nodes = extra.get(NODE_NAME_EXTRA) or []
        ident = (user, nodes[0] if nodes else None) if ok else None
        self._cache[key] = (now + (self._ttl if ok else self._ttl / 6), ident)
        if len(self._cache) > 100_000:  # bounded: drop expired entries
            self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
        return ident


class Ingest:
    """The aiohttp handler for ``POST /v1/reports/node``."""

    def __init__(self, tokens: TokenCache, allowed: Sequence[str], max_bytes: int,
                 accept: Callable[[NodeReport, float], None], clock: Clock) -> None:
        self._tokens = tokens
        self._allowed = frozenset(allowed)
        self._max_bytes = max_bytes
        self._accept = accept
        self._clock = clock
        self.outcomes: Counter[str] = Counter()

    @property
    def token_reviews(self) -> int:
        return self._tokens.reviews

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/v1/reports/node", self.node_report)]

    def _reject(self, status: int, outcome: str, message: str, peer: str | None
                ) -> web.Response:
        self.outcomes[outcome] += 1
        log.warning("report rejected", outcome=outcome, status=status, error=message, peer=peer)
        return web.json_response({"error": message}, status=status)

    async def node_report(self, request: web.Request) -> web.Response:
        received = self._clock.monotonic()
        peer = request.remote
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or not auth[7:].strip():
            return self._reject(401, "unauthenticated", "bearer token required", peer)
        if request.content_length is not None and request.content_length > self._max_bytes:
            return self._reject(413, "too_large", f"body over {self._max_bytes} bytes", peer)
        try:
            identity = await self._tokens.identity(auth[7:].strip())
        except KubeError as exc:
            self.outcomes["auth_unavailable"] += 1
            log.warning("token review failed", error=str(exc))
            return web.json_response({"error": "cannot verify token now"}, status=503)
        if identity is None:
            return self._reject(401, "unauthenticated", "token not accepted", peer)
        user, bound_node = identity
        if user not in self._allowed:
            return self._reject(403, "forbidden", f"{user} may not report", peer)
        if request.content_type != "application/json":
            return self._reject(415, "bad_content_type", "expected application/json", peer)
        try:
            raw = await request.content.read(self._max_bytes + 1)
        except (OSError, ValueError) as exc:
            return self._reject(400, "malformed", f"cannot read body: {exc}", peer)
        if len(raw) > self._max_bytes:
            return self._reject(413, "too_large", f"body over {self._max_bytes} bytes", peer)
        try:
            body = json.loads(raw)
        except ValueError as exc:
            return self._reject(400, "malformed", f"not JSON: {exc}", peer)
        try:
            report = parse_node_report(body)
        except ReportInvalid as exc:
            return self._reject(422, "invalid", str(exc), peer)
        if bound_node is not None and bound_node != report.node:
            return self._reject(403, "forbidden",
                                f"token bound to node {bound_node} may not report for "
                                f"{report.node}", peer)
        self.outcomes["accepted"] += 1
        self._accept(report, received)
        return web.json_response({"accepted": True}, status=202)
