"""The controller's own lag: what makes it say it is behind, and for how long."""

from __future__ import annotations

from supervisor.controller.selfwatch import BEHIND_WINDOW_SECONDS, SelfWatch
from supervisor.runtime.clock import ManualClock


def test_a_watch_event_long_after_its_change_makes_the_controller_behind_for_a_while() -> None:
    """An event whose object changed 90 s before it arrived: behind, naming the watch;
    no longer once the window has passed without another."""
    clock = ManualClock(wall_offset=1767225600.0 + 90 - 1000.0)  # that stamp, 90 s later
    watch = SelfWatch(clock)
    stamp = "2026-01-01T00:00:00Z"
    watch.watch_event("pods", {"metadata": {"managedFields": [
        {"manager": "kubelet", "time": "2025-12-31T23:59:00Z"}, {"time": stamp}]}})
    (why,) = watch.behind()
    assert why.startswith("watch of pods: 90.0")
    clock.advance(BEHIND_WINDOW_SECONDS + 1)
    assert watch.behind() == []


def test_fresh_events_and_young_reports_are_not_behind() -> None:
    """Lags under their limits are recorded in the histograms and say nothing."""
    clock = ManualClock(wall_offset=1767225601.0 - 1000.0)
    watch = SelfWatch(clock, reviews_waiting=lambda: 3)
    watch.watch_event("nodes", {"metadata": {"managedFields": [
        {"time": "2026-01-01T00:00:00Z"}]}})
    watch.decided_on(4.0)
    assert watch.behind() == []
    assert watch.watch_lag["nodes"].count == 1 and watch.report_age.count == 1


def test_a_decision_on_old_news_and_a_long_review_queue_are_behind() -> None:
    """A report two minutes old behind a decision; 150 TokenReviews waiting at once."""
    clock = ManualClock()
    waiting = [150]
    watch = SelfWatch(clock, reviews_waiting=lambda: waiting[0])
    watch.decided_on(120.0)
    assert [w.split(":")[0] for w in watch.behind()] == ["report age at decision",
                                                        "token review queue"]
