"""Report ingest: agents (and sidecars) POST their state here, over TLS.

Hostile or broken input never takes the controller down, never poisons the model and never
costs more than a bounded amount of work. Each request passes, in order:

1. **a bearer token** (401 without): a projected ServiceAccount token whose audience is
   ours (``controller.token_audiences``), so a token stolen from a report is useless
   against the API server. Before any API call the token must *look* like one: a JWT that
   has not expired and names our audience — random garbage costs no TokenReview;
2. **TokenReview**, answered from a cache for ``token_cache_seconds`` (with jitter, so
   tokens reviewed together do not expire together). Reviews of tokens not in the cache
   are rate-limited (``token_reviews_per_second``); over the limit a request gets 429 with
   Retry-After, so a flood of distinct bogus tokens costs the API server a bounded rate of
   reviews and leaves cached reporters untouched. The review must confirm our audience;
3. **the identity** may report (403 else), and **the body** is read whole — however many
   TCP segments it arrives in — within ``report_read_timeout_seconds`` and
   ``report_max_bytes`` (408, 413); it is JSON (400) of the right shape (422, naming the
   field);
4. **the binding**: a pod-bound token (what the kubelet mounts) names the node its pod runs
   on, and a report about any other node is refused (403) — one compromised agent cannot
   get healthy nodes quarantined. A sidecar's report (``/v1/reports/pod``) must come with a
   pod-bound token and be about that very pod;
5. **freshness** (409): each sender stamps its reports with a boot identity (random per
   process start), a sequence and ``sent_at``. Within one boot a report must carry a
   higher sequence than the last one accepted; a report of another boot must be newer
   (``sent_at``) than the last one accepted; and ``sent_at`` must lie within
   ``report_max_skew_seconds`` of our clock. So an old report replayed — after a newer
   one, or after a controller restart — has no effect.

Every outcome is counted; only accepted reports reach the health model.

**Streams.** A report POSTed alone costs a whole HTTPS request (~1 ms of controller CPU) to
say, nine times out of ten, "nothing changed". So reporters hold one WebSocket per
controller replica instead (``…/stream``): steps 1 and 2 and the allow-list run once, at the
handshake (a refusal is the same HTTP status a POST would get); then each message is either
a full report — checked exactly as a POSTed one (3 to 5) and acknowledged — or a *tick*
(``{"kind": "Tick", "sequence": N, "sent_at": T}``): "my last report still holds", which
re-confirms that report as sent at T, under the same freshness rule, with no reply unless it
is refused. A stream carries one sender's reports, and ends with close code 4000 after
``report_stream_seconds`` (±10 %) or when its token expires, whichever comes first: the
reporter reconnects with its current token, which is reviewed again.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import fnmatch
import hashlib
import json
import random
import weakref
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog
from aiohttp import WSCloseCode, WSMsgType, web

from supervisor.errors import DeadlineExceeded, KubeError, SupervisorError
from supervisor.kube import KubeClient
from supervisor.runtime.clock import Clock
from supervisor.runtime.deadline import with_deadline
from supervisor.runtime.logging import Throttled

log = structlog.get_logger(__name__)
R = TypeVar("R", "NodeReport", "PodReport")

SEVERITIES = ("info", "warning", "critical")
NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
NODE_REPORT_PATH = "/v1/reports/node"
POD_REPORT_PATH = "/v1/reports/pod"
STREAM_SUFFIX = "/stream"
REAUTHENTICATE = 4000  # close code: the stream's token review is due; reconnect
SA_PREFIX = "system:serviceaccount:"
JWT_EXPIRY_LEEWAY_SECONDS = 60.0  # our clock and the API server's may differ a little


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
    subject_node: str | None = None  # the node the subject is on, when the reporter knows


@dataclass(frozen=True, slots=True)
class NodeReport:
    node: str
    boot_id: str
    sequence: int
    sent_at: float
    gpus: int
    findings: tuple[ReportedFinding, ...]

    def restamped(self, sequence: int, sent_at: float) -> NodeReport:
        """The same report as sent again (a tick); by hand: dataclasses.replace costs
        several times more, on every tick."""
        return NodeReport(self.node, self.boot_id, sequence, sent_at, self.gpus,
                          self.findings)


@dataclass(frozen=True, slots=True)
class PodReport:
    namespace: str
    name: str
    node: str
    boot_id: str
    sequence: int
    sent_at: float
    ready: bool
    findings: tuple[ReportedFinding, ...]

    @property
    def pod(self) -> str:
        return f"{self.namespace}/{self.name}"

    def restamped(self, sequence: int, sent_at: float) -> PodReport:
        """The same report as sent again (a tick)."""
        return PodReport(self.namespace, self.name, self.node, self.boot_id, sequence,
                         sent_at, self.ready, self.findings)


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
            subject_node=str(subject["node"]) if subject.get("node") else None,
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


# --- tokens --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a token belongs to, from TokenReview."""

    user: str
    node: str | None  # the node its pod runs on, for a pod-bound token
    extra: dict[str, list[str]]


class ReviewThrottled(SupervisorError):
    """Too many tokens to review right now; the sender should come back later."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"token reviews are rate-limited; retry in {retry_after:.1f}s")
        self.retry_after = retry_after


class TokenBucket:
    """``rate`` per second, up to ``burst`` at once."""

    __slots__ = ("_clock", "_level", "_stamp", "burst", "rate")

    def __init__(self, clock: Clock, rate: float, burst: float) -> None:
        self._clock = clock
        self.rate = rate
        self.burst = burst
        self._level = burst
        self._stamp = clock.monotonic()

    def take(self) -> float:
        """0 if a token was taken, else the seconds until one will be there."""
        now = self._clock.monotonic()
        self._level = min(self.burst, self._level + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._level >= 1:
            self._level -= 1
            return 0.0
        return (1 - self._level) / self.rate


def jwt_claims(token: str) -> dict[str, Any] | None:
    """The claims of a JWT, read without checking its signature; None if it is not one."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = parts[1] + "=" * (-len(parts[1]) % 4)
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (ValueError, binascii.Error):
        return None
    return claims if isinstance(claims, dict) else None


def jwt_plausible(token: str, audiences: Sequence[str], now_wall: float) -> str | None:
    """Why ``token`` cannot be a valid ServiceAccount token for us, or None if it might be.

    Reads the JWT's claims without checking the signature — the TokenReview that follows
    does that; this only keeps tokens that cannot pass it from costing one."""
    claims = jwt_claims(token)
    if claims is None:
        return "not a JWT"
    exp = claims.get("exp")
    if not isinstance(exp, int | float) or exp + JWT_EXPIRY_LEEWAY_SECONDS < now_wall:
        return "expired"
    if audiences:
        aud = claims.get("aud")
        names = {aud} if isinstance(aud, str) else set(aud) if isinstance(aud, list) else set()
        if not names & set(audiences):
            return f"audience is not one of {list(audiences)}"
    return None


class TokenCache:
    """TokenReview answers by token hash, with a rate limit on reviews of new tokens.

    Positive answers are kept ``ttl`` seconds (±10 %), negative ones ``ttl/6``. Concurrent
    requests with the same uncached token share one review.
    """

    def __init__(self, kube: KubeClient, clock: Clock, ttl: float,
                 audiences: Sequence[str] = (), reviews_per_second: float = 100.0) -> None:
        self._kube = kube
        self._clock = clock
        self._ttl = ttl
        self._audiences = tuple(audiences)
        self._cache: dict[bytes, tuple[float, Identity | None]] = {}
        self._pending: dict[bytes, asyncio.Future[Identity | None]] = {}
        self._bucket = TokenBucket(clock, reviews_per_second, 2 * reviews_per_second)
        self._rate = reviews_per_second
        self._window = (clock.monotonic(), 0, 1.0)  # start, throttled since, suggested wait
        self.reviews = 0
        self.prefiltered = 0
        self.throttled = 0

    async def identity(self, token: str) -> Identity | None:
        """Who ``token`` is, or None if it is not a valid token for us.

        Raises ``ReviewThrottled`` over the review rate, ``KubeError`` when the API server
        cannot answer."""
        key = hashlib.sha256(token.encode()).digest()
        now = self._clock.monotonic()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        pending = self._pending.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        why = jwt_plausible(token, self._audiences, self._clock.wall())
        if why is not None:
            self.prefiltered += 1
            return None
        wait = self._bucket.take()
        if wait > 0:
            self.throttled += 1
            raise ReviewThrottled(max(wait, self._come_back_in()))
        future: asyncio.Future[Identity | None] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            ident = await self._review(token)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters (if any) get it through the shield
            raise
        finally:
            del self._pending[key]
        if not future.done():
            future.set_result(ident)
        ttl = self._ttl * random.uniform(0.9, 1.1) if ident else self._ttl / 6
        self._cache[key] = (now + ttl, ident)
        if len(self._cache) > 100_000:  # bounded: drop expired entries
            self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
        return ident

    def _come_back_in(self) -> float:
        """When a throttled sender should try again: spread over the time the reviews of
        everyone waiting will take. A fleet reconnecting at once (a controller restart)
        would otherwise retry every second, each attempt a TLS handshake refused — more
        work than the reviews themselves. Senders throttled over the last suggested wait
        are about the ones still waiting; each is told a random time within the time
        their reviews take at our rate (at least a second, at most a minute)."""
        now = self._clock.monotonic()
        start, count, suggested = self._window
        if now - start >= suggested:
            suggested = min(60.0, max(1.0, count / self._rate))
            start, count = now, 0
        self._window = (start, count + 1, suggested)
        return random.uniform(0.5, 1.0) * suggested + random.uniform(0.0, 0.5)

    async def _review(self, token: str) -> Identity | None:
        self.reviews += 1
        ok, user, extra, audiences = await self._kube.review_token(token, self._audiences)
        if not ok:
            return None
        # An API server that ignores audiences answers with none: then the token was
        # checked against the API server's own audience, not ours (TokenReview docs).
        if self._audiences and not set(audiences) & set(self._audiences):
            log.warning("token authenticated without our audience; refusing it",
                        user=user, audiences=audiences)
            return None
        nodes = extra.get(NODE_NAME_EXTRA) or []
        return Identity(user=user, node=nodes[0] if nodes else None, extra=extra)


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


# --- the endpoint --------------------------------------------------------------------------


class Refused(Exception):
    """A request refused with an HTTP status; ``outcome`` is what the counters say."""

    def __init__(self, status: int, outcome: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.outcome = outcome
        self.headers = headers or {}


class Ingest:
    """The aiohttp handlers for reports: one POSTed, or a stream of them."""

    def __init__(self, tokens: TokenCache, allowed: Sequence[str], max_bytes: int,
                 accept: Callable[[NodeReport, float], None], clock: Clock, *,
                 accept_pod: Callable[[PodReport, float], None] | None = None,
                 allowed_pods: Sequence[str] = (), max_skew: float = 30.0,
                 read_timeout: float = 10.0, stream_seconds: float = 300.0) -> None:
        self._tokens = tokens
        self._allowed = tuple(allowed)
        self._allowed_pods = tuple(allowed_pods)
        self._accept_pod = accept_pod
        self._max_bytes = max_bytes
        self._accept = accept
        self._clock = clock
        self._read_timeout = read_timeout
        self._stream_seconds = stream_seconds
        self.replay = ReplayGuard(clock, max_skew)
        self.outcomes: Counter[str] = Counter()
        self.ticks = 0  # accepted reports that were ticks (also counted as accepted)
        self.streams: weakref.WeakSet[web.WebSocketResponse] = weakref.WeakSet()
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

    @staticmethod
    def _node_bound(identity: Identity, report: NodeReport) -> str:
        """A node-bound token may report only for its node."""
        if identity.node is not None and identity.node != report.node:
            raise Refused(403, "forbidden", f"token bound to node {identity.node} may "
                                            f"not report for {report.node}")
        return f"node/{report.node}"

    @staticmethod
    def _pod_bound(identity: Identity, report: PodReport) -> str:
        """Only a pod-bound token, and only about that pod: the token names its pod
        (TokenReview's pod-name extra) and its ServiceAccount's namespace, and the report
        must be about exactly that pod."""
        pods = identity.extra.get(POD_NAME_EXTRA) or []
        if not pods:
            raise Refused(403, "forbidden", "pod reports need a pod-bound token (the "
                                            "projected token of the reporting pod)")
        namespace = identity.user.removeprefix(SA_PREFIX).split(":")[0]
        if (namespace, pods[0]) != (report.namespace, report.name):
            raise Refused(403, "forbidden", f"token of pod {namespace}/{pods[0]} may "
                                            f"not report for {report.pod}")
        return f"pod/{report.pod}"

    async def node_report(self, request: web.Request) -> web.Response:
        """An agent's report."""
        return await self._receive(request, self._allowed, parse_node_report,
                                   self._node_bound, self._accept)

    async def pod_report(self, request: web.Request) -> web.Response:
        """A sidecar's report."""
        assert self._accept_pod is not None
        return await self._receive(request, self._allowed_pods, parse_pod_report,
                                   self._pod_bound, self._accept_pod)

    async def node_stream(self, request: web.Request) -> web.StreamResponse:
        """An agent's stream of reports and ticks."""
        return await self._stream(request, self._allowed, parse_node_report,
                                  self._node_bound, self._accept)

    async def pod_stream(self, request: web.Request) -> web.StreamResponse:
        """A sidecar's stream of reports and ticks."""
        assert self._accept_pod is not None
        return await self._stream(request, self._allowed_pods, parse_pod_report,
                                  self._pod_bound, self._accept_pod)

    async def _receive(self, request: web.Request, allowed: Sequence[str],
                       parse: Callable[[Any], R],
                       bound: Callable[[Identity, R], str],
                       accept: Callable[[R, float], None]) -> web.Response:
        """Every step of the module docstring, for one kind of report: ``bound`` checks
        the token's binding and names the sender (whose freshness is tracked)."""
        received = self._clock.monotonic()
        try:
            identity = await self._identity(request, allowed)
            if request.content_type != "application/json":
                raise Refused(415, "bad_content_type", "expected application/json")
            body = self._json(await self._read_body(request))
            report = self._parse(parse, body)
            sender = bound(identity, report)
            self._fresh(sender, report.boot_id, report.sequence, report.sent_at)
        except Refused as refused:
            return self._refuse(refused, request.remote)
        self.outcomes["accepted"] += 1
        accept(report, received)
        return web.json_response({"accepted": True}, status=202)

    async def _stream(self, request: web.Request, allowed: Sequence[str],
                      parse: Callable[[Any], R],
                      bound: Callable[[Identity, R], str],
                      accept: Callable[[R, float], None]) -> web.StreamResponse:
        """The stream of the module docstring: authenticated once, then reports and ticks
        until the token's review is due again."""
        ws = web.WebSocketResponse(max_msg_size=self._max_bytes)
        try:
            identity = await self._identity(request, allowed)
            if not ws.can_prepare(request).ok:
                raise Refused(400, "malformed", "expected a WebSocket upgrade")
        except Refused as refused:
            return self._refuse(refused, request.remote)
        await ws.prepare(request)
        self.streams.add(ws)
        life = self._stream_seconds * random.uniform(0.9, 1.1)
        exp = (jwt_claims(_bearer(request)) or {}).get("exp")
        if isinstance(exp, int | float):  # reviewed as valid: it has an expiry
            life = min(life, exp - self._clock.wall())
        try:  # one timer for the stream's life, rather than a timeout on every receive
            async with asyncio.timeout(max(0.0, life)):
                await self._messages(ws, request, identity, parse, bound, accept)
        except TimeoutError:
            await ws.close(code=REAUTHENTICATE, message=b"token review due; reconnect")
        return ws

    async def _messages(self, ws: web.WebSocketResponse, request: web.Request,
                        identity: Identity, parse: Callable[[Any], R],
                        bound: Callable[[Identity, R], str],
                        accept: Callable[[R, float], None]) -> None:
        last: R | None = None  # the report this stream's ticks re-confirm
        sender = ""
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
                if tick:
                    report = self._tick(last, body)
                else:
                    report = self._parse(parse, body)
                    named = bound(identity, report)
                    if sender and named != sender:
                        raise Refused(422, "invalid", f"this stream carries {sender}'s "
                                                      f"reports, not {named}'s")
                    sender = named
                self._fresh(sender, report.boot_id, report.sequence, report.sent_at)
            except Refused as refused:
                self._refuse(refused, request.remote)
                await _reply(ws, {"sequence": sequence, "status": refused.status,
                                  "error": str(refused)})
                if refused.status == 403:  # a sender reporting for another: no second try
                    await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"forbidden")
                    return
                continue
            self.outcomes["accepted"] += 1
            accept(report, received)
            last = report
            if tick:
                self.ticks += 1  # no reply: silence is acceptance, and costs us nothing
            else:
                await _reply(ws, {"sequence": report.sequence, "status": 202})

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
            identity = await self._tokens.identity(token)
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

    def _fresh(self, sender: str, boot_id: str, sequence: int, sent_at: float) -> None:
        stale = self.replay.check(sender, boot_id, sequence, sent_at)
        if stale is not None:
            raise Refused(409, *stale)
        self.replay.accepted(sender, boot_id, sequence, sent_at)

    def _refuse(self, refused: Refused, peer: str | None) -> web.Response:
        self.outcomes[refused.outcome] += 1
        held = self._log_gate.allow(refused.outcome)
        if held is not None:  # one line per outcome per 10 s: a flood must not fill the log
            log.warning("report rejected", outcome=refused.outcome, status=refused.status,
                        error=str(refused), peer=peer, similar_not_logged=held)
        return web.json_response({"error": str(refused)}, status=refused.status,
                                 headers=refused.headers)


async def _reply(ws: web.WebSocketResponse, message: dict[str, Any]) -> None:
    """Answer on a stream whose reporter may have gone meanwhile (the next receive ends it)."""
    try:
        await ws.send_json(message)
    except ConnectionError:
        pass


def _bearer(request: web.Request) -> str:
    auth = request.headers.get("Authorization", "")
    return auth[7:].strip() if auth.startswith("Bearer ") else ""
