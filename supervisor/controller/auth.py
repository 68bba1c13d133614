"""Who sent a report: the bearer token checked here first, by the API server only after.

A report token is a projected ServiceAccount token: a JWT the API server signed, for our
audience, usually bound to the sender's pod (and through it to the pod's node). Checking
one costs a TokenReview — an API call — so a flood of forged tokens, each one new, would
otherwise spend the review budget every honest reporter needs to (re)connect. So a token
passes, in order and as cheaply as possible:

1. **the cache** (by SHA-256 of the token): an answer from the last
   ``token_cache_seconds`` (±10 %); concurrent requests with one new token share a review;
2. **plausibility**, reading the claims without any cryptography: a JWT, not expired, for
   our audience;
3. **the sender's allowance** (``SourceLimits``): each source address may fail
   authentication, and spend TokenReviews, only at a small rate of its own; over it, 429
   before any signature is checked. One attacking pod slows only itself;
4. **the signature**, checked locally against the keys the API server publishes for its
   ServiceAccount issuer (OIDC discovery: ``/openid/v1/jwks``, readable by every
   ServiceAccount; ``IssuerKeys``), refreshed periodically and when a token names a key
   we do not know (key rotation; at most every ``KEY_REFRESH_MIN_SECONDS``). A token no key
   of the cluster signed is refused here and never reaches the API server. Without the
   keys (a cluster that does not publish them, or the API server unreachable at the time)
   tokens fall through to TokenReview under its rate limit, as before, and the controller
   says so in its status;
5. **TokenReview**, under the review rate (``token_reviews_per_second``): the API server's
   own verdict — the bound pod still exists with the same UID, the ServiceAccount too —
   and the identity: user, and the pod and node the token is bound to.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import random
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import jwt
import structlog

from supervisor.errors import KubeError, SupervisorError
from supervisor.kube import KubeClient
from supervisor.runtime.clock import Clock

log = structlog.get_logger(__name__)

NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
NODE_UID_EXTRA = "authentication.kubernetes.io/node-uid"
POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
POD_UID_EXTRA = "authentication.kubernetes.io/pod-uid"
SA_PREFIX = "system:serviceaccount:"
JWT_EXPIRY_LEEWAY_SECONDS = 60.0  # our clock and the API server's may differ a little
JWKS_PATH = "/openid/v1/jwks"  # the API server's ServiceAccount issuer keys
KEY_REFRESH_SECONDS = 600.0  # keys rotate rarely; a new one is fetched when first seen
KEY_REFRESH_MIN_SECONDS = 10.0  # forged key ids must not make us fetch in a loop
SOURCES_TRACKED = 10_000  # per-source allowances kept (least recently used dropped)


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a token belongs to, from TokenReview."""

    user: str
    node: str | None = None  # the node its pod runs on (or it is bound to)
    extra: dict[str, list[str]] = field(default_factory=dict)
    pod: str | None = None  # the pod it is bound to: name …
    pod_uid: str | None = None  # … and UID (a new pod of the same name is another sender)
    node_uid: str | None = None

    @property
    def namespace(self) -> str:
        """The ServiceAccount's namespace (a bound pod lives in it too)."""
        return self.user.removeprefix(SA_PREFIX).split(":")[0]

    @classmethod
    def from_review(cls, user: str, extra: dict[str, list[str]]) -> Identity:
        def one(key: str) -> str | None:
            values = extra.get(key) or []
            return values[0] if values and values[0] else None

        return cls(user=user, node=one(NODE_NAME_EXTRA), extra=extra, pod=one(POD_NAME_EXTRA),
                   pod_uid=one(POD_UID_EXTRA), node_uid=one(NODE_UID_EXTRA))


class ReviewThrottled(SupervisorError):
    """Too many tokens to check right now; the sender should come back later."""

    def __init__(self, retry_after: float, why: str = "token reviews are rate-limited") -> None:
        super().__init__(f"{why}; retry in {retry_after:.1f}s")
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

    def _refill(self) -> None:
        now = self._clock.monotonic()
        self._level = min(self.burst, self._level + (now - self._stamp) * self.rate)
        self._stamp = now

    def take(self) -> float:
        """0 if a token was taken, else the seconds until one will be there."""
        self._refill()
        if self._level >= 1:
            self._level -= 1
            return 0.0
        return (1 - self._level) / self.rate

    def empty(self) -> float:
        """Like ``take`` without taking: 0 while a token is there."""
        self._refill()
        return 0.0 if self._level >= 1 else (1 - self._level) / self.rate


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

    Reads the JWT's claims without checking the signature — ``IssuerKeys`` and TokenReview
    do that; this only keeps tokens that cannot pass them from costing anything."""
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


class IssuerKeys:
    """The public keys the API server signs ServiceAccount tokens with, from its OIDC
    discovery endpoint (``GET /openid/v1/jwks``; the ``system:service-account-issuer-
    discovery`` ClusterRole every ServiceAccount is bound to allows it)."""

    def __init__(self, kube: KubeClient, clock: Clock) -> None:
        self._kube = kube
        self._clock = clock
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at: float | None = None  # monotonic, of the last successful fetch
        self._tried_at = -KEY_REFRESH_MIN_SECONDS
        self._refreshing: asyncio.Task[None] | None = None
        self.fetches = 0
        self.last_error: str | None = None

    @property
    def available(self) -> bool:
        return bool(self._keys)

    def key(self, kid: str) -> jwt.PyJWK | None:
        return self._keys.get(kid)

    async def refresh(self) -> None:
        """Fetch the key set now; on failure keep what we had (and say why)."""
        self._tried_at = self._clock.monotonic()
        try:
            body = await self._kube.request("GET", JWKS_PATH,
                                            accept="application/jwk-set+json")
        except KubeError as exc:
            self.last_error = f"cannot read the issuer keys ({JWKS_PATH}): {exc}"
            log.warning("issuer keys not refreshed: tokens are checked by TokenReview only "
                        "until they are", error=self.last_error, keys=len(self._keys))
            return
        keys: dict[str, jwt.PyJWK] = {}
        for raw in body.get("keys") or []:
            try:
                key = jwt.PyJWK(raw)
            except (jwt.PyJWKError, jwt.InvalidKeyError) as exc:
                log.warning("issuer key skipped", kid=raw.get("kid"), error=str(exc))
                continue
            if key.key_id:
                keys[key.key_id] = key
        self.fetches += 1
        if keys:
            self._keys = keys
            self._fetched_at = self._clock.monotonic()
            self.last_error = None
        else:
            self.last_error = f"{JWKS_PATH} lists no usable key"

    def refresh_soon(self) -> None:
        """A token named a key we do not know: fetch again, unless we did just now."""
        if self._refreshing is not None and not self._refreshing.done():
            return
        if self._clock.monotonic() - self._tried_at < KEY_REFRESH_MIN_SECONDS:
            return
        self._refreshing = asyncio.get_running_loop().create_task(self.refresh(),
                                                                  name="issuer-keys refresh")

    async def run(self) -> None:
        """Keep the keys fresh: now, then every ``KEY_REFRESH_SECONDS`` (every
        ``KEY_REFRESH_MIN_SECONDS`` while we have none)."""
        while True:
            await self.refresh()
            await asyncio.sleep(KEY_REFRESH_SECONDS if self._keys else KEY_REFRESH_MIN_SECONDS)

    async def close(self) -> None:
        if self._refreshing is not None:
            self._refreshing.cancel()
            await asyncio.gather(self._refreshing, return_exceptions=True)

    def status(self) -> dict[str, Any]:
        age = None if self._fetched_at is None else self._clock.monotonic() - self._fetched_at
        return {"keys": sorted(self._keys), "age_seconds": None if age is None else round(age),
                "fetches": self.fetches, "last_error": self.last_error}


def verify_signature(token: str, keys: IssuerKeys, audiences: Sequence[str]) -> str | None:
    """Why no key of the cluster's issuer signed ``token`` for us, or None if one did."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.DecodeError:
        return "not a JWT"
    kid = header.get("kid")
    key = keys.key(kid) if isinstance(kid, str) else None
    if key is None:
        keys.refresh_soon()  # a rotated key, or a forgery naming one that never existed
        return f"signed with key {kid!r}, which the cluster's issuer does not publish"
    try:
        jwt.decode(token, key.key, algorithms=[key.algorithm_name],
                   audience=list(audiences) or None,
                   options={"verify_aud": bool(audiences), "require": ["exp"]},
                   leeway=JWT_EXPIRY_LEEWAY_SECONDS)
    except jwt.InvalidTokenError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


class SourceLimits:
    """Per source address: how often it may fail authentication, and how many
    TokenReviews it may cost, per second. A pod flooding forged or stale tokens exhausts
    its own allowance and is told to come back later, while every other sender's
    allowance — and the shared review rate — stays whole."""

    def __init__(self, clock: Clock, failures_per_second: float,
                 reviews_per_second: float) -> None:
        self._clock = clock
        self._failure_rate = failures_per_second
        self._review_rate = reviews_per_second
        self._sources: OrderedDict[str, tuple[TokenBucket, TokenBucket]] = OrderedDict()

    def _of(self, source: str) -> tuple[TokenBucket, TokenBucket]:
        buckets = self._sources.get(source)
        if buckets is None:
            buckets = (TokenBucket(self._clock, self._failure_rate, 2 * self._failure_rate),
                       TokenBucket(self._clock, self._review_rate, 2 * self._review_rate))
            self._sources[source] = buckets
            if len(self._sources) > SOURCES_TRACKED:
                self._sources.popitem(last=False)
        else:
            self._sources.move_to_end(source)
        return buckets

    def blocked(self, source: str) -> float:
        """Seconds until ``source`` may try an unchecked token again (0: now)."""
        return self._of(source)[0].empty()

    def failed(self, source: str) -> None:
        self._of(source)[0].take()

    def review(self, source: str) -> float:
        """Take one review of ``source``'s allowance: 0, or the seconds to wait."""
        return self._of(source)[1].take()


class TokenCache:
    """The checks of the module docstring; ``identity`` is the one entry point.

    Positive answers are kept ``ttl`` seconds (±10 %), negative ones ``ttl/6``.
    """

    def __init__(self, kube: KubeClient, clock: Clock, ttl: float,
                 audiences: Sequence[str] = (), reviews_per_second: float = 100.0, *,
                 keys: IssuerKeys | None = None, source_failures_per_second: float = 5.0,
                 source_reviews_per_second: float = 20.0) -> None:
        self._kube = kube
        self._clock = clock
        self._ttl = ttl
        self._audiences = tuple(audiences)
        self.keys = keys
        self._cache: dict[bytes, tuple[float, Identity | None]] = {}
        self._pending: dict[bytes, asyncio.Future[Identity | None]] = {}
        self._bucket = TokenBucket(clock, reviews_per_second, 2 * reviews_per_second)
        self._sources = SourceLimits(clock, source_failures_per_second,
                                     source_reviews_per_second)
        self._rate = reviews_per_second
        self._window = (clock.monotonic(), 0, 1.0)  # start, throttled since, suggested wait
        self.reviews = 0
        self.prefiltered = 0
        self.forged = 0  # refused by the signature check, no API call
        self.throttled = 0
        self.source_throttled = 0
        self.review_waiting = 0  # reviews sent and not answered yet

    def _remember(self, key: bytes, now: float, ident: Identity | None) -> None:
        ttl = self._ttl * random.uniform(0.9, 1.1) if ident else self._ttl / 6
        self._cache[key] = (now + ttl, ident)
        if len(self._cache) > 100_000:  # bounded: drop expired entries
            self._cache = {k: v for k, v in self._cache.items() if v[0] > now}

    async def identity(self, token: str, source: str = "") -> Identity | None:
        """Who ``token`` is, or None if it is not a valid token for us.

        Raises ``ReviewThrottled`` over the review rate or ``source``'s allowance,
        ``KubeError`` when the API server cannot answer."""
        key = hashlib.sha256(token.encode()).digest()
        now = self._clock.monotonic()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        pending = self._pending.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        wait = self._sources.blocked(source)
        if wait > 0:
            self.source_throttled += 1
            raise ReviewThrottled(max(wait, 1.0), "too many unaccepted tokens from "
                                                  f"{source or 'this sender'}")
        why = jwt_plausible(token, self._audiences, self._clock.wall())
        if why is None and self.keys is not None and self.keys.available:
            why = verify_signature(token, self.keys, self._audiences)
            if why is not None:
                self.forged += 1
                self._sources.failed(source)
                return None
        elif why is not None:
            self.prefiltered += 1
            self._sources.failed(source)
            return None
        wait = max(self._sources.review(source), self._bucket.take())
        if wait > 0:
            self.throttled += 1
            raise ReviewThrottled(max(wait, self._come_back_in()))
        future: asyncio.Future[Identity | None] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        self.review_waiting += 1
        try:
            ident = await self._review(token)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters (if any) get it through the shield
            raise
        finally:
            self.review_waiting -= 1
            del self._pending[key]
        if not future.done():
            future.set_result(ident)
        if ident is None:
            self._sources.failed(source)
        self._remember(key, now, ident)
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
        return Identity.from_review(user, extra)
