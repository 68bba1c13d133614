"""The ingest's own rules, without a network: freshness, token plausibility, rate limit."""

from __future__ import annotations

import base64
import json

import pytest

from supervisor.controller.auth import TokenBucket, jwt_plausible
from supervisor.controller.ingest import ReplayGuard, ReportInvalid, parse_node_report
from supervisor.runtime.clock import ManualClock


def jwt(claims: dict[str, object]) -> str:
    def part(obj: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")
    return f"{part({'alg': 'RS256'})}.{part(claims)}.c2lnbmF0dXJl"


class TestReplayGuard:
    @pytest.fixture
    def guard(self) -> tuple[ReplayGuard, ManualClock]:
        clock = ManualClock()
        return ReplayGuard(clock, max_skew=30), clock

    def accept(self, guard: ReplayGuard, boot: str, seq: int, sent: float) -> str | None:
        refused = guard.check("node/n1", boot, seq, sent)
        if refused is None:
            guard.accepted("node/n1", boot, seq, sent)
            return None
        return refused[0]

    def test_within_one_boot_only_a_higher_sequence_counts(
            self, guard: tuple[ReplayGuard, ManualClock]) -> None:
        """An exact replay, or any older sequence of the same boot, is stale."""
        g, clock = guard
        now = clock.wall()
        assert self.accept(g, "boot-a", 5, now) is None
        assert self.accept(g, "boot-a", 5, now) == "stale"
        assert self.accept(g, "boot-a", 4, now + 1) == "stale"
        assert self.accept(g, "boot-a", 6, now + 1) is None

    def test_a_new_boot_must_be_newer_than_the_last_report(
            self, guard: tuple[ReplayGuard, ManualClock]) -> None:
        """After a restart the sequence starts again: a new boot is accepted when its report
        is newer; a report of the previous boot replayed after it is not."""
        g, clock = guard
        now = clock.wall()
        assert self.accept(g, "old", 900, now - 5) is None
        assert self.accept(g, "new", 1, now) is None
        assert self.accept(g, "old", 901, now - 4) == "stale"
        assert self.accept(g, "new", 2, now + 1) is None

    def test_sent_at_outside_the_skew_is_refused(
            self, guard: tuple[ReplayGuard, ManualClock]) -> None:
        """Reports older (or further in the future) than the skew are refused even when
        nothing was seen from the sender: a controller restart does not open a replay
        window."""
        g, clock = guard
        now = clock.wall()
        assert self.accept(g, "a", 1, now - 31) == "skewed"
        assert self.accept(g, "a", 1, now + 31) == "skewed"
        assert self.accept(g, "a", 1, now - 29) is None


class TestTokenPlausibility:
    def test_garbage_and_non_jwt_tokens_are_not_plausible(self) -> None:
        """Random strings and three dotted parts that are not JSON cost no review."""
        assert jwt_plausible("not-a-token", ["gpu-supervisor"], 1000.0) == "not a JWT"
        assert jwt_plausible("a.b.c", ["gpu-supervisor"], 1000.0) == "not a JWT"

    def test_expired_or_foreign_audience_tokens_are_not_plausible(self) -> None:
        """A token past its expiry, or for another audience, cannot pass TokenReview."""
        assert jwt_plausible(jwt({"exp": 100, "aud": ["gpu-supervisor"]}),
                             ["gpu-supervisor"], 1000.0) == "expired"
        why = jwt_plausible(jwt({"exp": 2000, "aud": ["https://kubernetes.default.svc"]}),
                            ["gpu-supervisor"], 1000.0)
        assert why is not None and "audience" in why

    def test_a_token_for_us_is_plausible(self) -> None:
        """``aud`` may be a string or a list; no audiences configured skips the check."""
        assert jwt_plausible(jwt({"exp": 2000, "aud": "gpu-supervisor"}),
                             ["gpu-supervisor"], 1000.0) is None
        assert jwt_plausible(jwt({"exp": 2000, "aud": ["x", "gpu-supervisor"]}),
                             ["gpu-supervisor"], 1000.0) is None
        assert jwt_plausible(jwt({"exp": 2000, "aud": "x"}), [], 1000.0) is None


def test_token_bucket_allows_bursts_then_the_rate() -> None:
    """Twice the rate at once, then one per 1/rate seconds; the wait is told."""
    clock = ManualClock()
    bucket = TokenBucket(clock, rate=10, burst=20)
    assert all(bucket.take() == 0 for _ in range(20))
    assert bucket.take() == pytest.approx(0.1)
    clock.advance(0.1)
    assert bucket.take() == 0


def test_report_without_boot_identity_is_invalid() -> None:
    """The boot identity is part of every report: without it freshness cannot be judged."""
    with pytest.raises(ReportInvalid, match="boot"):
        parse_node_report({"kind": "NodeReport", "node": "n", "sequence": 1, "sent_at": 1.0,
                           "gpus": [], "findings": []})
