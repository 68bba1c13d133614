"""What all-reduce outcomes mean: hung ranks named, bandwidth against the baseline, and the
slow member found by bisection in O(log n) rounds (synthetic outcomes shaped exactly as
probes.collective's; the real thing runs in tests/integration/test_collective.py)."""

from __future__ import annotations

from typing import Any

import pytest

from supervisor.config import CollectiveSettings
from supervisor.detectors.collective import CollectiveJudge, busbw_gbps
from supervisor.findings import Subject

SIZES = [65536, 1048576, 16777216]


def judge(n: int, **settings: Any) -> CollectiveJudge:
    return CollectiveJudge("ns/g/0", n, CollectiveSettings(**settings),
                           lambda r: Subject("pod", f"ns/g-0-{r}"))


def outcome(groups: list[list[int]], sizes: list[int], slow: set[int] = frozenset(),
            fast: float = 0.01, factor: float = 10.0, missing: dict[int, str] | None = None
            ) -> dict[str, Any]:
    """Each group takes ``fast`` seconds per size, ``factor`` times that if it holds a slow
    rank; ``missing`` ranks: "alive" (timed out), "hung" (arrived, no marker), "absent"."""
    missing = missing or {}
    results, alive, arrived = {}, {}, []
    for group in groups:
        t = fast * (factor if set(group) & slow else 1.0)
        for r in group:
            state = missing.get(r)
            if state != "absent":
                arrived.append(r)
            if state == "alive":
                alive[str(r)] = {"error": "timeout"}
            elif state is None:
                results[str(r)] = {"ok": True, "times": [t] * len(sizes), "group": group}
    return {"groups": groups, "sizes": sizes, "deadline": 5.0, "results": results,
            "alive": alive, "arrived": arrived, "nodes": {str(r): f"n{r}" for r in
                                                          range(max(map(max, groups)) + 1)}}


def test_busbw_is_computed_as_nccl_tests_does() -> None:
    """algbw * 2(n-1)/n: 1 GB in 1 s across 8 ranks is 1.75 GB/s of bus bandwidth."""
    assert busbw_gbps(10**9, 1.0, 8) == pytest.approx(1.75)
    assert busbw_gbps(10**9, 1.0, 2) == pytest.approx(1.0)


class TestHang:
    def test_the_rank_that_arrived_and_left_no_marker_is_named(self) -> None:
        """Ranks 1 and 3 timed out waiting (alive markers); rank 2 arrived and then went
        silent: it is the one named, with its node."""
        j = judge(4)
        a = j.assess(outcome([[0, 1, 2, 3]], SIZES,
                             missing={1: "alive", 3: "alive", 0: "alive", 2: "hung"}))
        assert (a.kind, a.hung, a.never_arrived) == ("hang", [2], [])
        verdict = j.hang_verdict(a, 5.0)
        assert "rank 2 (ns/g-0-2 on n2) arrived but never finished" in verdict.message
        assert verdict.evidence["hung_ranks"] == [2]

    def test_ranks_that_never_arrived_are_named_as_such(self) -> None:
        """A member whose worker never came to the rendezvous."""
        a = judge(4).assess(outcome([[0, 1, 2, 3]], SIZES,
                                    missing={3: "absent", 0: "alive", 1: "alive", 2: "alive"}))
        assert (a.never_arrived, a.hung) == ([3], [])

    def test_everyone_timing_out_points_at_a_link(self) -> None:
        """Every rank alive and waiting: nobody stopped, the path between them is cut."""
        j = judge(2)
        a = j.assess(outcome([[0, 1]], SIZES, missing={0: "alive", 1: "alive"}))
        assert "a link between them" in j.hang_verdict(a, 5.0).message


class TestBaseline:
    def test_configured_baseline_judges_at_once(self) -> None:
        """With 460 GB/s configured, a check at 100 GB/s is slow without any learning."""
        j = judge(8, baseline_busbw_gbps=460.0)
        t = 16777216 / (100e9 / 1.75)  # the time that gives 100 GB/s of bus bandwidth
        a = j.assess(outcome([list(range(8))], SIZES, fast=t))
        assert a.kind == "slow" and a.busbw[16777216] == pytest.approx(100.0)

    def test_baseline_is_learned_from_healthy_checks(self) -> None:
        """The first learn_checks healthy checks are learning; then a check at a third of
        their bandwidth is slow, and slow checks are not learned from."""
        j = judge(4, learn_checks=3)
        for _ in range(3):
            a = j.assess(outcome([[0, 1, 2, 3]], SIZES))
            assert a.kind == "learning"
            j.learn(a)
        assert j.assess(outcome([[0, 1, 2, 3]], SIZES)).kind == "ok"
        slow = j.assess(outcome([[0, 1, 2, 3]], SIZES, fast=0.03))
        assert slow.kind == "slow"
        j.learn(slow)
        assert len(j.history[16777216]) == 3


def localize(j: CollectiveJudge, slow: set[int]) -> tuple[list[int] | None, int]:
    loc = j.start_localization()
    while (plan := j.next_plan(loc)) is not None:
        j.after_round(loc, outcome(plan["groups"], plan["sizes"], slow=slow))
    return loc.found, loc.rounds


class TestLocalization:
    @pytest.mark.parametrize("slow", range(8))
    def test_one_slow_member_of_eight_in_three_rounds(self, slow: int) -> None:
        """Halves, halves, then each candidate topped up with a known-good member."""
        assert localize(judge(8), {slow}) == ([slow], 3)

    @pytest.mark.parametrize(("n", "rounds"), [(4, 2), (5, 3), (6, 3), (16, 4)])
    def test_rounds_grow_as_log_n(self, n: int, rounds: int) -> None:
        """Every member of groups of 4 to 16 is found in at most ceil(log2 n) rounds."""
        for slow in range(n):
            found, used = localize(judge(n), {slow})
            assert found == [slow] and used <= rounds

    def test_slowness_of_everyone_is_not_pinned_on_anyone(self) -> None:
        """When both halves are as slow, the finding names the group, not a member."""
        j = judge(8)
        found, rounds = localize(j, set(range(8)))
        assert (found, rounds) == ([], 1)

    def test_slow_verdict_names_the_member_and_its_node(self) -> None:
        """collective_slow is about the slow member, on its node (for quarantine)."""
        j = judge(8, baseline_busbw_gbps=1.0)
        a = j.assess(outcome([list(range(8))], SIZES, slow={5}, fast=1.0))
        loc = j.start_localization()
        while (plan := j.next_plan(loc)) is not None:
            j.after_round(loc, outcome(plan["groups"], plan["sizes"], slow={5}))
        verdict = j.slow_verdict(a, loc)
        assert (verdict.subject.id, verdict.subject.node) == ("ns/g-0-5", "n5")
        assert "localized in 3 round(s) to rank 5" in verdict.message
