"""Report ingest: agents and sidecars send their state here, over TLS.

Hostile or broken input never takes the controller down, never poisons the model and never
costs more than a bounded amount of work; and a report speaks only for its sender. Each
request passes, in order:

1. **a bearer token** (401 without), checked by ``auth.TokenCache``: cache, plausibility,
   the source's allowance (429), the signature against the cluster's issuer keys (401),
   TokenReview under its rate (429). Its audience must be ours
   (``controller.token_audiences``), so a token stolen from a report opens nothing else;
2. **the identity** may report on this route (403 else: ``allowed_reporters``,
   ``allowed_pod_reporters``), and **its binding** names the sender — what a report may
   speak for is decided here, from the token and the objects the controller watches,
   never from the body:

   - ``/v1/reports/node`` (agents): the token must carry a node (a pod-bound token from the
     kubelet names the pod's node; 403 without). Its pod, when the controller watches agent
     pods (``agent_pod_selector``), must be a live agent pod on that node. The report is
     about that node only, its findings only of the classes an agent observes (GPU and
     node classes) about that node's GPUs and the node itself;
   - ``/v1/reports/pod`` (sidecars): the token must be bound to a pod, by name *and UID*,
     and that pod must be a member of a pipeline group the controller watches; the
     report's node and group are that Pod object's, whatever the body says. Its findings
     are only of the classes a sidecar observes (engine, partition, collective), about its
     own pod, its group, a link within the group or a member of the group — whose node,
     again, comes from the member's Pod object.

   A report that claims more is refused whole (403 naming the field) and counted
   (``refused_findings``);
3. **the body** is read whole — however many TCP segments it arrives in — within
   ``report_read_timeout_seconds`` and ``report_max_bytes`` (408, 413); it is JSON (400) of
   the right shape (422, naming the field);
4. **freshness** (409): each sender stamps its reports with a boot identity (random per
   process start), a sequence and ``sent_at``. Within one boot a report must carry a
   higher sequence than the last one accepted; a report of another boot must be newer
   (``sent_at``) than the last one accepted; and ``sent_at`` must lie within
   ``report_max_skew_seconds`` of our clock;
5. **the epoch**: the guard of step 4 lives in memory, so after a controller restart an
   old report replayed within the skew would look new. Each controller process therefore
   draws a random *epoch* and hands it out — first message of every stream, and in every
   answer — and reporters echo the epoch they were given in each report. A report that
   does not carry this process's epoch is accepted for freshness (and keeps its sender
   from counting as silent) but its content is *held*: it neither raises nor clears
   anything until a report carrying the epoch, which only a report made after this
   process started can, replaces it. A reporter holding a stream has the epoch before its
   first report, so an honest sender loses nothing. Persisting the guard instead would
   mean a write per report (the guard moves with every tick), or a stale state after a
   crash — the epoch needs neither.

Every outcome is counted; only accepted reports reach the health model.

**Streams.** A report POSTed alone costs a whole HTTPS request (~1 ms of controller CPU) to
say, nine times out of ten, "nothing changed". So reporters hold one WebSocket per
controller replica instead (``…/stream``): steps 1 and 2 run once, at the handshake (a
refusal is the same HTTP status a POST would get); the controller then sends
``{"kind": "Hello", "epoch": E}``, and each message is either a full report — checked
exactly as a POSTed one — or a *tick* (``{"kind": "Tick", "sequence": N, "sent_at": T}``):
"my last report still holds", which re-confirms that report as sent at T, under the same
freshness rule, with no reply unless it is refused. A stream is keyed by its sender's pod
UID: it closes (code 4001) as soon as the watch sees that pod deleted — a new pod of the
same name is another sender, with a token of its own — and ends with close code 4000
after ``report_stream_seconds`` (±10 %) or shortly before its token expires, whichever
comes first: the reporter reconnects with its current token, which is checked again.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import random
import uuid
import weakref
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar

import structlog
from aiohttp import WSCloseCode, WSMsgType, web

from supervisor.controller.auth import (
    Identity,
    ReviewThrottled,
    TokenCache,
    jwt_claims,
)
from supervisor.errors import DeadlineExceeded, KubeError
from supervisor.findings import GPU_FAULT_CLASSES, NODE_FAULT_CLASSES, POD_FAULT_CLASSES
from supervisor.runtime.clock import Clock
from supervisor.runtime.deadline import with_deadline
from supervisor.runtime.logging import Throttled

log = structlog.get_logger(__name__)
R = TypeVar("R", "NodeReport", "PodReport")

SEVERITIES = ("info", "warning", "critical")
NODE_REPORT_PATH = "/v1/reports/node"
POD_REPORT_PATH = "/v1/reports/pod"
STREAM_SUFFIX = "/stream"
REAUTHENTICATE = 4000  # close code: the stream's token is due to be checked again; reconnect
SENDER_GONE = 4001  # close code: the pod this stream's token is bound to was deleted
AGENT_CLASSES = frozenset(str(c) for c in (*GPU_FAULT_CLASSES, *NODE_FAULT_CLASSES))
SIDECAR_CLASSES = frozenset(str(c) for c in POD_FAULT_CLASSES)
EXPIRY_MARGIN = 0.1  # a stream ends this share of its token's remaining life early …
EXPIRY_MARGIN_MAX_SECONDS = 300.0  # … but no more than this (the kubelet rotates at 80 %)


class ReportInvalid(ValueError):
    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field


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
    # The node the subject is on: for a sidecar's finding about a member of its group,
    # that member's node as the controller's Pod watch has it (never the body's).
    subject_node: str | None = None


@dataclass(frozen=True, slots=True)
class NodeReport:
    node: str
    boot_id: str
    sequence: int
    sent_at: float
    gpus: int
    findings: tuple[ReportedFinding, ...]
    # Carries this controller process's epoch: made after it started, so not a replay of
    # a report from before (see the module docstring). Unconfirmed reports are held.
    confirmed: bool = True

    def restamped(self, sequence: int, sent_at: float) -> NodeReport:
        """The same report as sent again (a tick); by hand: dataclasses.replace costs
        several times more, on every tick."""
        return NodeReport(self.node, self.boot_id, sequence, sent_at, self.gpus,
                          self.findings, self.confirmed)


@dataclass(frozen=True, slots=True)
class PodReport:
    namespace: str
    name: str
    node: str  # the pod's node as the controller's watch has it ("" until scheduled)
    boot_id: str
    sequence: int
    sent_at: float
    ready: bool
    findings: tuple[ReportedFinding, ...]
    uid: str = ""  # the sending pod's UID, from its token: the key of its state
    group: str = ""  # the sending pod's group, from the watch
    confirmed: bool = True

    @property
    def pod(self) -> str:
        return f"{self.namespace}/{self.name}"

    def restamped(self, sequence: int, sent_at: float) -> PodReport:
        """The same report as sent again (a tick)."""
        return PodReport(self.namespace, self.name, self.node, self.boot_id, sequence,
                         sent_at, self.ready, self.findings, self.uid, self.group,
                         self.confirmed)


def _field(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in obj:
        raise ReportInvalid(f"{where}{key}", "is required")
    value = obj[key]
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise ReportInvalid(f"{where}{key}", f"must be {names}")
    return value


def _envelope(body: Any, kind: str) -> tuple[str, int, float]:
    """Check ``kind`` and read the freshness stamp every report carries:
    (boot id, sequence, sent_at)."""
    if not isinstance(body, dict):
        raise ReportInvalid("<body>", "must be a JSON object")
    if body.get("kind") != kind:
        raise ReportInvalid("kind", f"must be {kind}")
    boot = _field(body, "boot", dict, "")
    boot_id = _field(boot, "id", str, "boot.")
    if not boot_id or len(boot_id) > 64:
        raise ReportInvalid("boot.id", "must be 1 to 64 characters")
    sequence = _field(body, "sequence", int, "")
    if sequence < 0:
        raise ReportInvalid("sequence", "must not be negative")
    return boot_id, sequence, float(_field(body, "sent_at", (int, float), ""))


def parse_findings(body: dict[str, Any], max_findings: int = 10_000
                   ) -> tuple[ReportedFinding, ...]:
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
        node = subject.get("node")
        if node is not None and not isinstance(node, str):
            raise ReportInvalid(f"{where}subject.node", "must be str")
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
            subject_node=node or None,
        ))
    return tuple(findings)


def parse_node_report(body: Any) -> NodeReport:
    """Validate a NodeReport; ``ReportInvalid`` names the first bad field."""
    boot_id, sequence, sent_at = _envelope(body, "NodeReport")
    node = _field(body, "node", str, "")
    if not node or len(node) > 253:
        raise ReportInvalid("node", "must be a node name")
    gpus = _field(body, "gpus", list, "")
    return NodeReport(node=node, boot_id=boot_id, sequence=sequence, sent_at=sent_at,
                      gpus=len(gpus), findings=parse_findings(body))


def parse_pod_report(body: Any) -> PodReport:
    """Validate a PodReport (a sidecar's); ``ReportInvalid`` names the first bad field."""
    boot_id, sequence, sent_at = _envelope(body, "PodReport")
    pod = _field(body, "pod", dict, "")
    namespace = _field(pod, "namespace", str, "pod.")
    name = _field(pod, "name", str, "pod.")
    if not namespace or not name or len(namespace) > 63 or len(name) > 253:
        raise ReportInvalid("pod", "must name a pod")
    node = body.get("node") or ""
    if not isinstance(node, str):
        raise ReportInvalid("node", "must be str")
    return PodReport(namespace=namespace, name=name, node=node, boot_id=boot_id,
                     sequence=sequence, sent_at=sent_at, ready=bool(body.get("ready", True)),
                     findings=parse_findings(body))


def report_epoch(body: Any) -> str:
    """The controller epoch a report echoes ("" when it carries none)."""
    epoch = body.get("epoch") if isinstance(body, dict) else None
    return epoch if isinstance(epoch, str) else ""


# --- freshness -----------------------------------------------------------------------------


@dataclass(slots=True)
class _Last:
    boot_id: str
    sequence: int
    sent_at: float


class ReplayGuard:
    """The freshness rule of the module docstring, per sender."""

    def __init__(self, clock: Clock, max_skew: float) -> None:
        self._clock = clock
        self._max_skew = max_skew
        self._last: dict[str, _Last] = {}

    def check(self, sender: str, boot_id: str, sequence: int, sent_at: float
              ) -> tuple[str, str] | None:
        """(outcome, message) when the report must be refused, else None."""
        skew = sent_at - self._clock.wall()
        if abs(skew) > self._max_skew:
            return ("skewed", f"sent_at is {skew:+.1f}s from the controller's clock; at most "
                              f"±{self._max_skew:g}s is accepted (check the sender's clock)")
        last = self._last.get(sender)
        if last is None:
            return None
        if boot_id == last.boot_id:
            if sequence <= last.sequence:
                return ("stale", f"sequence {sequence} of boot {boot_id} is not newer than "
                                 f"{last.sequence}, already accepted")
        elif sent_at <= last.sent_at:
            return ("stale", f"boot {boot_id} report sent at {sent_at:.3f} is older than the "
                             f"last accepted one (boot {last.boot_id}, {last.sent_at:.3f})")
        return None

    def accepted(self, sender: str, boot_id: str, sequence: int, sent_at: float) -> None:
        last = self._last.get(sender)
        if last is None:
            self._last[sender] = _Last(boot_id, sequence, sent_at)
        else:  # in place: this runs for every tick of every stream
            last.boot_id, last.sequence, last.sent_at = boot_id, sequence, sent_at

    def forget(self, sender: str) -> None:
        self._last.pop(sender, None)


# --- who may speak for what ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WatchedPod:
    """A pod as the controller's watch has it."""

    namespace: str
    name: str
    uid: str
    node: str | None
    group: str  # its pipeline group's key ("" for an agent pod)


class Directory(Protocol):
    """The pods the controller watches, as the ingest asks about them
    (``supervisor.controller.senders.Senders``)."""

    def group_pod(self, uid: str) -> WatchedPod | None:
        """The member of a pipeline group with this UID."""

    def member(self, group: str, subject_id: str) -> tuple[bool, str | None]:
        """Whether ``subject_id`` (namespace/name, or ``<group>/member-<rank>``) is a
        member of ``group``, and the node it runs on when the watch has it."""

    def agents_watched(self) -> bool:
        """Agent pods are watched (``agent_pod_selector`` set): a node report's token
        must belong to one."""

    def agent_node(self, uid: str) -> str | None:
        """The node of the agent pod with this UID, if there is one."""


@dataclass(frozen=True, slots=True)
class Binding:
    """What a token lets its bearer speak for, resolved once per request or stream."""

    sender: str  # the key of its freshness state: "agent/<uid>", "node/<n>", "pod/<uid>"
    node: str = ""  # node route: the one node it reports for
    # The watched pod its token is bound to ("" when the controller does not watch it):
    # the stream closes and the freshness state goes when the watch sees the pod deleted.
    uid: str = ""


# --- the endpoint --------------------------------------------------------------------------


class Refused(Exception):
    """A request refused with an HTTP status; ``outcome`` is what the counters say."""

    def __init__(self, status: int, outcome: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.outcome = outcome
        self.headers = headers or {}


def _unknown_sender(what: str) -> Refused:
    """A pod the watch does not know (yet): a sidecar can start a moment before the
    controller's watch hears of its pod. Come back shortly; nothing is lost meanwhile."""
    return Refused(503, "unknown_sender", f"{what} is not known to the controller (yet); "
                                          "retry shortly", {"Retry-After": "2"})


class Ingest:
    """The aiohttp handlers for reports: one POSTed, or a stream of them."""

    def __init__(self, tokens: TokenCache, allowed: Sequence[str], max_bytes: int,
                 accept: Callable[[NodeReport, float], None], clock: Clock, *,
                 directory: Directory,
                 accept_pod: Callable[[PodReport, float], None] | None = None,
                 allowed_pods: Sequence[str] = (), max_skew: float = 30.0,
                 read_timeout: float = 10.0, stream_seconds: float = 300.0) -> None:
        self._tokens = tokens
        self._allowed = tuple(allowed)
        self._allowed_pods = tuple(allowed_pods)
        self._directory = directory
        self._accept_pod = accept_pod
        self._max_bytes = max_bytes
        self._accept = accept
        self._clock = clock
        self._read_timeout = read_timeout
        self._stream_seconds = stream_seconds
        # This process's epoch: reporters echo it, so a report made before we started
        # (replayed after a restart) is told from one made since (module docstring, 5).
        self.epoch = uuid.uuid4().hex[:16]
        self.replay = ReplayGuard(clock, max_skew)
        self.outcomes: Counter[str] = Counter()
        self.refused_findings: Counter[tuple[str, str]] = Counter()  # (route, field)
        self.held = 0  # accepted reports without our epoch: content held
        self.ticks = 0  # accepted reports that were ticks (also counted as accepted)
        self.streams: weakref.WeakSet[web.WebSocketResponse] = weakref.WeakSet()
        self._by_pod: dict[str, set[web.WebSocketResponse]] = {}  # bound pod UID → streams
        self._closing: set[asyncio.Task[Any]] = set()
        self._log_gate = Throttled(clock.monotonic)

    @property
    def token_reviews(self) -> int:
        return self._tokens.reviews

    def routes(self) -> list[web.RouteDef]:
        routes = [web.post(NODE_REPORT_PATH, self.node_report),
                  web.get(NODE_REPORT_PATH + STREAM_SUFFIX, self.node_stream)]
        if self._accept_pod is not None:
            routes += [web.post(POD_REPORT_PATH, self.pod_report),
                       web.get(POD_REPORT_PATH + STREAM_SUFFIX, self.pod_stream)]
        return routes

    async def close_streams(self, _: web.Application | None = None) -> None:
        """On shutdown: tell every reporter to go elsewhere (the other replica) now, rather
        than find out when the connection drops."""
        await asyncio.gather(*(ws.close(code=WSCloseCode.GOING_AWAY, message=b"shutting down")
                               for ws in list(self.streams)), return_exceptions=True)
        await asyncio.gather(*self._closing, return_exceptions=True)

    def sender_gone(self, uid: str) -> None:
        """The pod with this UID was deleted: whatever its token still opens, it speaks for
        nobody now. Its streams are closed and its freshness state dropped (a new pod of
        the same name is a new sender)."""
        for key in (f"agent/{uid}", f"pod/{uid}"):  # the senders a pod can be (Binding)
            self.replay.forget(key)
        for ws in self._by_pod.pop(uid, ()):
            task = asyncio.get_running_loop().create_task(
                ws.close(code=SENDER_GONE, message=b"the pod this token is bound to is gone"),
                name=f"close stream of {uid}")
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    # --- bindings ------------------------------------------------------------------------

    def _bind_node(self, identity: Identity) -> Binding:
        """A node report's sender: the node its token names — through the agent pod it is
        bound to, which must be a live agent pod on that node when agent pods are
        watched."""
        if identity.node is None:
            raise Refused(403, "unbound", "node reports need a token bound to the agent's "
                                          "pod (the kubelet's projected token names the "
                                          "pod's node); this token names no node")
        if not self._directory.agents_watched():
            # Nothing tells us when its pod goes: its state is the node's, as it would be
            # for any agent on the node.
            return Binding(sender=f"node/{identity.node}", node=identity.node)
        uid = identity.pod_uid
        if uid is None:
            raise Refused(403, "forbidden", "a token bound to no pod cannot report for a node "
                                            "here: agent pods are watched "
                                            "(controller.agent_pod_selector)")
        node = self._directory.agent_node(uid)
        if node is None:
            # A new agent pod the watch has not placed on its node yet — or not one of our
            # agents at all (controller.agent_pod_selector): either way, nothing to take.
            raise _unknown_sender(f"pod {identity.namespace}/{identity.pod} as an agent pod "
                                  "(controller.agent_pod_selector)")
        if node != identity.node:
            raise Refused(403, "forbidden", f"agent pod {identity.pod} runs on {node}, "
                                            f"not on {identity.node}")
        return Binding(sender=f"agent/{uid}", node=identity.node, uid=uid)

    def _bind_pod(self, identity: Identity) -> Binding:
        """A sidecar's sender: the pod its token is bound to, by UID — a member of a
        group the controller watches."""
        if identity.pod_uid is None:
            raise Refused(403, "unbound", "pod reports need a pod-bound token (the "
                                          "projected token of the reporting pod)")
        if self._directory.group_pod(identity.pod_uid) is None:
            raise _unknown_sender(f"pod {identity.namespace}/{identity.pod} "
                                  f"(uid {identity.pod_uid}) as a member of a pipeline group")
        return Binding(sender=f"pod/{identity.pod_uid}", uid=identity.pod_uid)

    def _overreach(self, route: str, field: str, message: str) -> Refused:
        self.refused_findings[(route, field.rsplit(".", 1)[-1] if "subject" not in field
                               else "subject")] += 1
        return Refused(403, "forbidden_finding", f"{field}: {message}")

    def _node_claims(self, binding: Binding, report: NodeReport) -> NodeReport:
        """An agent speaks for its node: its GPUs and itself, in the agent's classes."""
        if report.node != binding.node:
            raise Refused(403, "forbidden", f"token bound to node {binding.node} may not "
                                            f"report for {report.node}")
        for i, f in enumerate(report.findings):
            where = f"findings[{i}]."
            if f.fault_class not in AGENT_CLASSES:
                raise self._overreach("node", where + "fault_class", f"an agent may not "
                                      f"report {f.fault_class!r}; it reports GPU and node "
                                      "classes only (engine, partition and collective "
                                      "classes come from sidecars)")
            if f.subject_kind not in ("gpu", "node"):
                raise self._overreach("node", where + "subject.kind", f"an agent reports "
                                      f"about its GPUs and its node, not a {f.subject_kind}")
            if f.subject_node not in (None, binding.node) or (
                    f.subject_kind == "node" and f.subject_id != binding.node):
                raise self._overreach("node", where + "subject.node", f"the agent of "
                                      f"{binding.node} may not report about another node")
        return report

    def _pod_claims(self, binding: Binding, report: PodReport) -> PodReport:
        """A sidecar speaks for its pod, its group's links and members, in the sidecar's
        classes; its node and group — and a member's node — are the Pod objects'."""
        pod = self._directory.group_pod(binding.uid)
        if pod is None:
            raise Refused(403, "forbidden", "the pod this token is bound to is gone")
        if (report.namespace, report.name) != (pod.namespace, pod.name):
            raise Refused(403, "forbidden", f"token of pod {pod.namespace}/{pod.name} may "
                                            f"not report for {report.pod}")
        node = pod.node or ""
        if report.node and report.node != node:
            raise Refused(403, "forbidden", f"node: pod {report.pod} runs on "
                                            f"{node or 'no node yet'}, not {report.node}")
        findings = []
        for i, f in enumerate(report.findings):
            where = f"findings[{i}]."
            if f.fault_class not in SIDECAR_CLASSES:
                raise self._overreach("pod", where + "fault_class", f"a sidecar may not "
                                      f"report {f.fault_class!r}; GPU and node classes come "
                                      "only from the agent of that node")
            if f.subject_kind == "pod":
                member, subject_node = self._directory.member(pod.group, f.subject_id)
                if not member:
                    raise self._overreach("pod", where + "subject.id", f"{f.subject_id} is "
                                          f"not a member of group {pod.group}")
            elif (f.subject_kind, f.subject_id) == ("group", pod.group) or (
                    f.subject_kind == "link" and f.subject_id.startswith(f"{pod.group}/link/")):
                subject_node = node or None
            else:
                raise self._overreach("pod", where + "subject.id", f"a sidecar of group "
                                      f"{pod.group} may not report about {f.subject_kind} "
                                      f"{f.subject_id}")
            # A member being recreated is not in the watch yet: its node is not known,
            # and the body's word for it is not taken either.
            if None not in (f.subject_node, subject_node) and f.subject_node != subject_node:
                raise self._overreach("pod", where + "subject.node", f"{f.subject_id} runs "
                                      f"on {subject_node}, not {f.subject_node}")
            findings.append(f if f.subject_node == subject_node
                            else replace(f, subject_node=subject_node))
        return replace(report, node=node, uid=pod.uid, group=pod.group,
                       findings=tuple(findings))

    # --- routes --------------------------------------------------------------------------

    async def node_report(self, request: web.Request) -> web.Response:
        """An agent's report."""
        return await self._receive(request, self._allowed, self._bind_node,
                                   parse_node_report, self._node_claims, self._accept)

    async def pod_report(self, request: web.Request) -> web.Response:
        """A sidecar's report."""
        assert self._accept_pod is not None
        return await self._receive(request, self._allowed_pods, self._bind_pod,
                                   parse_pod_report, self._pod_claims, self._accept_pod)

    async def node_stream(self, request: web.Request) -> web.StreamResponse:
        """An agent's stream of reports and ticks."""
        return await self._stream(request, self._allowed, self._bind_node,
                                  parse_node_report, self._node_claims, self._accept)

    async def pod_stream(self, request: web.Request) -> web.StreamResponse:
        """A sidecar's stream of reports and ticks."""
        assert self._accept_pod is not None
        return await self._stream(request, self._allowed_pods, self._bind_pod,
                                  parse_pod_report, self._pod_claims, self._accept_pod)

    def _read(self, body: Any, parse: Callable[[Any], R],
              claims: Callable[[Binding, R], R], binding: Binding) -> R:
        """Parse a full report, hold it to its binding, and mark whether it carries our
        epoch."""
        report = claims(binding, self._parse(parse, body))
        if report_epoch(body) != self.epoch:
            report = replace(report, confirmed=False)
        return report

    async def _receive(self, request: web.Request, allowed: Sequence[str],
                       bind: Callable[[Identity], Binding], parse: Callable[[Any], R],
                       claims: Callable[[Binding, R], R],
                       accept: Callable[[R, float], None]) -> web.Response:
        """Every step of the module docstring, for one kind of report."""
        received = self._clock.monotonic()
        try:
            binding = bind(await self._identity(request, allowed))
            if request.content_type != "application/json":
                raise Refused(415, "bad_content_type", "expected application/json")
            body = self._json(await self._read_body(request))
            report = self._read(body, parse, claims, binding)
            self._fresh(binding, report.boot_id, report.sequence, report.sent_at)
        except Refused as refused:
            return self._refuse(refused, request.remote)
        self._accepted(report, received, accept)
        return web.json_response({"accepted": True, "epoch": self.epoch,
                                  "held": not report.confirmed}, status=202)

    def _accepted(self, report: R, received: float, accept: Callable[[R, float], None]
                  ) -> None:
        self.outcomes["accepted"] += 1
        if not report.confirmed:
            self.held += 1
        accept(report, received)

    async def _stream(self, request: web.Request, allowed: Sequence[str],
                      bind: Callable[[Identity], Binding], parse: Callable[[Any], R],
                      claims: Callable[[Binding, R], R],
                      accept: Callable[[R, float], None]) -> web.StreamResponse:
        """The stream of the module docstring: authenticated once, then reports and ticks
        until the token is due to be checked again or its pod is gone."""
        ws = web.WebSocketResponse(max_msg_size=self._max_bytes)
        try:
            binding = bind(await self._identity(request, allowed))
            if not ws.can_prepare(request).ok:
                raise Refused(400, "malformed", "expected a WebSocket upgrade")
        except Refused as refused:
            return self._refuse(refused, request.remote)
        await ws.prepare(request)
        self.streams.add(ws)
        if binding.uid:
            self._by_pod.setdefault(binding.uid, set()).add(ws)
        await _reply(ws, {"kind": "Hello", "epoch": self.epoch})
        try:  # one timer for the stream's life, rather than a timeout on every receive
            async with asyncio.timeout(max(0.0, self._life(request))):
                await self._messages(ws, request, binding, parse, claims, accept)
        except TimeoutError:
            await ws.close(code=REAUTHENTICATE, message=b"token check due; reconnect")
        finally:
            streams = self._by_pod.get(binding.uid)
            if streams is not None:
                streams.discard(ws)
                if not streams:
                    del self._by_pod[binding.uid]
        return ws

    def _life(self, request: web.Request) -> float:
        """How long a stream may run on its token: ``report_stream_seconds`` (±10 %), and
        ending a little before the token expires — the kubelet has rotated it by then,
        and the reporter reconnects with the new one."""
        life = self._stream_seconds * random.uniform(0.9, 1.1)
        exp = (jwt_claims(_bearer(request)) or {}).get("exp")
        if isinstance(exp, int | float):  # checked as valid: it has an expiry
            left = exp - self._clock.wall()
            life = min(life, left - min(EXPIRY_MARGIN * left, EXPIRY_MARGIN_MAX_SECONDS))
        return life

    async def _messages(self, ws: web.WebSocketResponse, request: web.Request,
                        binding: Binding, parse: Callable[[Any], R],
                        claims: Callable[[Binding, R], R],
                        accept: Callable[[R, float], None]) -> None:
        last: R | None = None  # the report this stream's ticks re-confirm
        while True:
            msg = await ws.receive()
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                return
            if msg.type == WSMsgType.ERROR:  # e.g. a message over report_max_bytes
                self._refuse(Refused(400, "malformed", f"stream broken: {msg.data}"),
                             request.remote)
                return
            received = self._clock.monotonic()
            sequence: Any = None
            try:
                if msg.type != WSMsgType.TEXT:
                    raise Refused(415, "bad_content_type", "expected JSON text messages")
                body = self._json(msg.data)
                sequence = body.get("sequence") if isinstance(body, dict) else None
                tick = isinstance(body, dict) and body.get("kind") == "Tick"
                report = self._tick(last, body) if tick else \
                    self._read(body, parse, claims, binding)
                self._fresh(binding, report.boot_id, report.sequence, report.sent_at)
            except Refused as refused:
                self._refuse(refused, request.remote)
                await _reply(ws, {"sequence": sequence, "status": refused.status,
                                  "error": str(refused), "epoch": self.epoch})
                if refused.status == 403:  # a sender claiming too much: no second try
                    await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"forbidden")
                    return
                continue
            self._accepted(report, received, accept)
            last = report
            if tick:
                self.ticks += 1  # no reply: silence is acceptance, and costs us nothing
            else:
                await _reply(ws, {"sequence": report.sequence, "status": 202,
                                  "epoch": self.epoch, "held": not report.confirmed})

    @staticmethod
    def _tick(last: R | None, body: dict[str, Any]) -> R:
        """The report a tick re-confirms, as sent at the tick's time and sequence."""
        if last is None:
            raise Refused(409, "stale", "a tick needs a report before it on this stream")
        try:
            sequence = _field(body, "sequence", int, "")
            sent_at = float(_field(body, "sent_at", (int, float), ""))
        except ReportInvalid as exc:
            raise Refused(422, "invalid", str(exc)) from exc
        return last.restamped(sequence, sent_at)

    # --- steps shared by every report kind ---------------------------------------------------

    async def _identity(self, request: web.Request, allowed: Sequence[str]) -> Identity:
        """Steps 1 and 2 of the module docstring, and the allow-list: who is asking."""
        token = _bearer(request)
        if not token:
            raise Refused(401, "unauthenticated", "bearer token required")
        if request.content_length is not None and request.content_length > self._max_bytes:
            raise Refused(413, "too_large", f"body over {self._max_bytes} bytes")
        try:
            identity = await self._tokens.identity(token, request.remote or "")
        except ReviewThrottled as exc:
            raise Refused(429, "throttled", str(exc),
                          {"Retry-After": str(max(1, round(exc.retry_after)))}) from exc
        except KubeError as exc:
            log.warning("token review failed", error=str(exc))
            raise Refused(503, "auth_unavailable", "cannot verify token now") from exc
        if identity is None:
            raise Refused(401, "unauthenticated", "token not accepted")
        if not any(fnmatch.fnmatchcase(identity.user, pattern) for pattern in allowed):
            raise Refused(403, "forbidden", f"{identity.user} may not report here")
        return identity

    @staticmethod
    def _json(raw: str | bytes) -> Any:
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise Refused(400, "malformed", f"not JSON: {exc}") from exc

    async def _read_body(self, request: web.Request) -> bytes:
        """The whole body, however many segments it arrives in, bounded in size and time."""
        async def read() -> bytes:
            chunks: list[bytes] = []
            size = 0
            while size <= self._max_bytes:
                chunk = await request.content.read(self._max_bytes + 1 - size)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            return b"".join(chunks)

        try:
            raw = await with_deadline("read report body", read(), self._read_timeout)
        except DeadlineExceeded as exc:
            raise Refused(408, "malformed", f"body not received within "
                                            f"{self._read_timeout:g}s") from exc
        except (OSError, ValueError) as exc:
            raise Refused(400, "malformed", f"cannot read body: {exc}") from exc
        if len(raw) > self._max_bytes:
            raise Refused(413, "too_large", f"body over {self._max_bytes} bytes")
        return raw

    @staticmethod
    def _parse(parse: Callable[[Any], R], body: Any) -> R:
        try:
            return parse(body)
        except ReportInvalid as exc:
            raise Refused(422, "invalid", str(exc)) from exc

    def _fresh(self, binding: Binding, boot_id: str, sequence: int, sent_at: float) -> None:
        stale = self.replay.check(binding.sender, boot_id, sequence, sent_at)
        if stale is not None:
            raise Refused(409, *stale)
        self.replay.accepted(binding.sender, boot_id, sequence, sent_at)

    def _refuse(self, refused: Refused, peer: str | None) -> web.Response:
        self.outcomes[refused.outcome] += 1
        held = self._log_gate.allow(refused.outcome)
        if held is not None:  # one line per outcome per 10 s: a flood must not fill the log
            log.warning("report rejected", outcome=refused.outcome, status=refused.status,
                        error=str(refused), peer=peer, similar_not_logged=held)
        return web.json_response({"error": str(refused), "epoch": self.epoch},
                                 status=refused.status, headers=refused.headers)


async def _reply(ws: web.WebSocketResponse, message: dict[str, Any]) -> None:
    """Answer on a stream whose reporter may have gone meanwhile (the next receive ends it)."""
    try:
        await ws.send_json(message)
    except ConnectionError:
        pass


def _bearer(request: web.Request) -> str:
    auth = request.headers.get("Authorization", "")
    return auth[7:].strip() if auth.startswith("Bearer ") else ""
