"""Report tokens checked without the API server: the signature against the issuer's keys,
and each source's allowance."""

from __future__ import annotations

import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from supervisor.controller.auth import IssuerKeys, SourceLimits, verify_signature
from supervisor.runtime.clock import ManualClock


class _Keys(IssuerKeys):
    """The issuer's key set as the API server would publish it, without fetching."""

    def __init__(self, *published: dict[str, object]) -> None:
        self._keys = {str(raw["kid"]): jwt.PyJWK(raw) for raw in published}
        self.asked: list[str] = []

    def refresh_soon(self) -> None:
        self.asked.append("refresh")


def _jwk(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, kid: str) -> dict[str, object]:
    """The public half as the API server publishes it in /openid/v1/jwks."""
    if isinstance(key, rsa.RSAPrivateKey):
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
        jwk["alg"] = "RS256"
    else:
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
        jwk["alg"] = "ES256"
    jwk.update(kid=kid, use="sig")
    return dict(jwk)


@pytest.fixture(scope="module")
def issuer() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 2048)


def _token(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, kid: str,
           **claims: object) -> str:
    body = {"aud": ["gpu-supervisor"], "exp": time.time() + 600, "iss": "https://k8s",
            "sub": "system:serviceaccount:gs:agent"} | claims
    alg = "RS256" if isinstance(key, rsa.RSAPrivateKey) else "ES256"
    return jwt.encode(body, key, algorithm=alg, headers={"kid": kid})


class TestSignature:
    def test_a_token_the_issuer_signed_for_us_passes(self, issuer: rsa.RSAPrivateKey) -> None:
        """Signed with a published key, for our audience, not expired: no objection."""
        keys = _Keys(_jwk(issuer, "k1"))
        assert verify_signature(_token(issuer, "k1"), keys, ["gpu-supervisor"]) is None

    def test_an_elliptic_curve_issuer_key_works_too(self) -> None:
        """API servers may sign with ES256 keys; the key's own algorithm is used."""
        key = ec.generate_private_key(ec.SECP256R1())
        keys = _Keys(_jwk(key, "ec"))
        assert verify_signature(_token(key, "ec"), keys, ["gpu-supervisor"]) is None

    def test_a_forged_signature_under_a_real_key_id_is_refused(
            self, issuer: rsa.RSAPrivateKey) -> None:
        """The header names the cluster's key, the signature is someone else's."""
        other = rsa.generate_private_key(65537, 2048)
        keys = _Keys(_jwk(issuer, "k1"))
        why = verify_signature(_token(other, "k1"), keys, ["gpu-supervisor"])
        assert why is not None and "Signature" in why

    def test_an_unknown_key_asks_for_a_refresh_and_is_refused(
            self, issuer: rsa.RSAPrivateKey) -> None:
        """A key id we do not know may be a rotation: refused now, and the keys are fetched
        again (rate-limited by IssuerKeys)."""
        keys = _Keys(_jwk(issuer, "k1"))
        why = verify_signature(_token(issuer, "k2"), keys, ["gpu-supervisor"])
        assert why is not None and "'k2'" in why
        assert keys.asked == ["refresh"]

    def test_another_audience_or_an_expired_token_is_refused(
            self, issuer: rsa.RSAPrivateKey) -> None:
        """Genuine signature, wrong audience or long expired: refused."""
        keys = _Keys(_jwk(issuer, "k1"))
        assert verify_signature(_token(issuer, "k1", aud=["https://kubernetes"]), keys,
                                ["gpu-supervisor"]) is not None
        assert verify_signature(_token(issuer, "k1", exp=time.time() - 3600), keys,
                                ["gpu-supervisor"]) is not None


def test_one_source_exhausting_its_allowance_leaves_others_alone() -> None:
    """Ten failures (twice the rate) and a source is blocked for a while; another source
    is not; the allowance refills at its rate."""
    clock = ManualClock()
    limits = SourceLimits(clock, failures_per_second=5, reviews_per_second=20)
    for _ in range(10):
        assert limits.blocked("10.0.0.1") == 0
        limits.failed("10.0.0.1")
    assert limits.blocked("10.0.0.1") == pytest.approx(0.2)
    assert limits.blocked("10.0.0.2") == 0
    clock.advance(0.2)
    assert limits.blocked("10.0.0.1") == 0
