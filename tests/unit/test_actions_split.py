"""How degrade shares a route rule's weight between a model's serving groups and its
fallback, and how restore steps back from that share (``supervisor.controller.actions``)."""

from __future__ import annotations

import pytest

from supervisor.controller.actions import Traffic, _between, _shares_pods, _split


def w(primary: int, fallback: int) -> dict[str, int]:
    return {"primary": primary, "fallback": fallback}


@pytest.mark.parametrize(("before", "serving", "ready", "after"), [
    (w(100, 0), 1, 2, w(33, 67)),  # one group left of two, two fallback replicas
    (w(100, 0), 2, 2, w(50, 50)),
    (w(100, 0), 3, 1, w(75, 25)),
    (w(90, 10), 1, 2, w(33, 67)),  # the fallback's standing share is part of the sum
    (w(100, 0), 0, 2, w(0, 100)),  # no group serves: all to the fallback
    (w(100, 0), 99, 1, w(99, 1)),  # a side that serves gets at least 1
    (w(100, 0), 1, 99, w(1, 99)),
    (w(10, 50), 5, 1, w(10, 50)),  # never more for the primary than it had
    (w(1, 0), 1, 1, w(0, 1)),  # Gateway API's default weight: cannot be split
    (w(0, 0), 1, 1, w(0, 0)),
    (w(100, 0), 1, 0, w(100, 0)),  # the fallback serves nothing: the primary keeps all
])
def test_split_follows_what_each_side_serves_and_keeps_the_sum(
        before: dict[str, int], serving: int, ready: int, after: dict[str, int]) -> None:
    split = _split(before, serving, ready)
    assert split == after
    assert sum(split.values()) == sum(before.values())


def test_restore_steps_the_primary_up_from_its_split_share() -> None:
    """A quarter of the way at a time from the split back to before: the primary's share
    only grows, the sum stays, the last step is exactly where degrade started."""
    before, after = w(100, 0), w(33, 67)
    steps = [_between(after, before, k / 4) for k in range(5)]
    assert steps == [w(33, 67), w(50, 50), w(66, 34), w(83, 17), w(100, 0)]


def test_restore_from_an_annotation_written_before_splits_steps_as_it_did() -> None:
    """An annotation from before splits (the primary's "after" 0) steps back as then."""
    assert [_between(w(0, 100), w(90, 10), k / 4) for k in range(1, 5)] == [
        w(22, 78), w(45, 55), w(68, 32), w(90, 10)]


@pytest.mark.parametrize(("primary", "fallback", "shares"), [
    ("app=llm,model=big", "app=llm", True),  # the fallback's terms are the primary's
    ("app=llm,model=big", "app=llm,model=small", False),
    ("model=big", "app=llm", False),
    ("app=llm", "app=llm", False),  # the same pods: nothing to degrade to
])
def test_a_service_selector_picks_both_models_only_through_terms_both_share(
        primary: str, fallback: str, shares: bool) -> None:
    assert _shares_pods(Traffic("Service", "serving", "llm", primary, fallback)) is shares
