"""The engine detector on a hand-moved clock: crash, unhealthy, stall, prefill, canary."""

from __future__ import annotations

import pytest

from probes.engine import PRESETS, EngineLoad, parse_load
from supervisor.config import EngineSettings
from supervisor.detectors.engine import EngineDetector
from supervisor.findings import FindingBook, Subject


def load(running: float, *progress: float, waiting: float = 0) -> EngineLoad:
    return EngineLoad(running, waiting, tuple(progress))


class Rig:
    def __init__(self, **settings: object) -> None:
        self.det = EngineDetector(Subject("pod", "serving/llama-0"),
                                  EngineSettings(**settings))  # type: ignore[arg-type]
        self.book = FindingBook()
        self.t = 0.0

    def feed(self, verdicts: list[object]) -> None:
        self.book.apply(verdicts, self.t)  # type: ignore[arg-type]

    def reasons(self) -> set[str]:
        return {f.reason for f in self.book.active()}

    def scrape(self, sample: EngineLoad, every: float = 1.0, times: int = 1) -> None:
        for _ in range(times):
            self.t += every
            self.feed(self.det.load(sample, self.t))


class TestStall:
    def test_running_requests_without_progress_are_a_hang(self) -> None:
        """Requests running and every progress metric flat for stall_seconds: engine_hang,
        whatever /health says."""
        rig = Rig(stall_seconds=5)
        rig.scrape(load(4, 100, 10))
        rig.scrape(load(4, 120, 10))  # progressing
        rig.feed(rig.det.health_ok())
        rig.scrape(load(4, 120, 10), times=4)
        assert rig.reasons() == set()
        rig.scrape(load(4, 120, 10))
        assert rig.reasons() == {"EngineStalled"}
        rig.feed(rig.det.health_ok())  # a 200 from /health does not clear it
        assert rig.reasons() == {"EngineStalled"}
        rig.scrape(load(4, 121, 10))  # progress again
        assert rig.reasons() == set()

    def test_long_prefill_that_grows_the_kv_cache_is_not_a_stall(self) -> None:
        """A long chunked prefill emits no tokens for a long time, but its KV-cache use
        grows every step: no finding however long it takes."""
        rig = Rig(stall_seconds=5)
        for i in range(30):
            rig.scrape(load(1, 500, 3, 0.01 * i))  # tokens flat, kv usage rising
        assert rig.reasons() == set()

    def test_a_prefill_whose_chunks_slow_down_widens_the_window(self) -> None:
        """A 100,000-token prompt on a slow engine: each chunk takes longer than the last
        (2 s, then 4, 6, 8, 10 s) and nothing else moves between them. The window grows to
        3x the longest wait seen, so no chunk is a stall; a real stop afterwards is still
        found, once the widened window has passed."""
        rig = Rig(stall_seconds=5, stall_step_multiple=3)
        kv = 0.0
        rig.scrape(load(1, 500, kv))
        for wait in (2, 4, 6, 8, 10):
            rig.scrape(load(1, 500, kv), times=wait - 1)
            kv += 0.01
            rig.scrape(load(1, 500, kv))
            assert rig.reasons() == set()
        assert rig.det.stall_window() == 30
        rig.scrape(load(1, 500, kv), times=29)
        assert rig.reasons() == set()
        rig.scrape(load(1, 500, kv))
        assert rig.reasons() == {"EngineStalled"}

    def test_a_stall_that_ends_does_not_widen_the_window(self) -> None:
        """A hang found and then resumed is not a slow step: the next hang is found in
        stall_seconds again."""
        rig = Rig(stall_seconds=5, stall_step_multiple=3)
        for i in range(5):
            rig.scrape(load(4, 100 + i))
        rig.scrape(load(4, 104), times=8)
        assert rig.reasons() == {"EngineStalled"}
        rig.scrape(load(4, 105))
        assert rig.reasons() == set()
        assert rig.det.stall_window() == 5

    def test_quick_steps_keep_the_shipped_window(self) -> None:
        """Decode steps every second: the window stays stall_seconds."""
        rig = Rig(stall_seconds=5, stall_step_multiple=3)
        for i in range(10):
            rig.scrape(load(4, 100 + i))
        assert rig.det.stall_window() == 5

    def test_an_idle_engine_is_never_stalled(self) -> None:
        """No requests: flat counters are expected."""
        rig = Rig(stall_seconds=5)
        rig.scrape(load(0, 100), times=60)
        assert rig.reasons() == set()

    def test_the_window_starts_when_the_engine_gets_busy(self) -> None:
        """An engine idle for a minute is not 'stalled' on its first request: the window
        counts from when it became busy."""
        rig = Rig(stall_seconds=5)
        rig.scrape(load(0, 100), times=60)
        rig.scrape(load(1, 100), times=4)
        assert rig.reasons() == set()
        rig.scrape(load(1, 100), times=2)
        assert rig.reasons() == {"EngineStalled"}

    def test_requests_in_flight_at_the_api_server_count_as_busy_when_the_gauges_say_zero(
            self) -> None:
        """vLLM's gauges freeze with the engine, often at a snapshot of 0 running and 0
        waiting; the API server's own in-flight count does not: busy, and a stall."""
        rig = Rig(stall_seconds=3)
        rig.scrape(EngineLoad(4, 0, (100.0,), inflight=4))
        rig.scrape(EngineLoad(0, 0, (101.0,), inflight=4))  # the last snapshot, then frozen
        rig.scrape(EngineLoad(0, 0, (101.0,), inflight=4), times=2)
        assert rig.reasons() == set()
        rig.scrape(EngineLoad(0, 0, (101.0,), inflight=4))
        assert rig.reasons() == {"EngineStalled"}
        finding = rig.book.active()[0]
        assert finding.evidence["inflight"] == 4
        assert "4 in flight at its API server" in finding.message

    def test_an_engine_whose_api_answers_nothing_is_idle(self) -> None:
        rig = Rig(stall_seconds=3)
        rig.scrape(EngineLoad(0, 0, (101.0,), inflight=0), times=10)
        assert rig.reasons() == set()

    def test_waiting_requests_count_as_busy(self) -> None:
        """Requests queued but none running and nothing moving: the scheduler is stuck."""
        rig = Rig(stall_seconds=3)
        rig.scrape(load(0, 7, waiting=2), times=4)
        assert rig.reasons() == {"EngineStalled"}


class TestHealth:
    def test_refused_connections_are_a_crash_after_the_threshold(self) -> None:
        """One refused probe is not enough; two in a row are engine_crash."""
        rig = Rig(failure_threshold=2)
        rig.feed(rig.det.health_ok())
        rig.feed(rig.det.health_failed("connection refused", refused=True, now=rig.t))
        assert rig.reasons() == set()
        rig.feed(rig.det.health_failed("connection refused", refused=True, now=rig.t))
        assert rig.reasons() == {"EngineNotListening"}
        rig.feed(rig.det.health_ok())
        assert rig.reasons() == set()

    def test_error_status_is_unhealthy_not_a_crash(self) -> None:
        """503s from a listening engine are engine_unhealthy; a crash replaces it."""
        rig = Rig(failure_threshold=2)
        rig.feed(rig.det.health_ok())
        for _ in range(2):
            rig.feed(rig.det.health_failed("answered 503", refused=False, now=rig.t, status=503))
        assert rig.reasons() == {"EngineHealthFailing"}
        for _ in range(2):
            rig.feed(rig.det.health_failed("connection refused", refused=True, now=rig.t))
        assert rig.reasons() == {"EngineNotListening"}


class TestStartup:
    def test_an_engine_loading_its_model_is_neither_crashed_nor_unhealthy(self) -> None:
        """Refused, unanswered or 503 before the engine has ever answered: loading, for
        startup_seconds — no finding, however many probes fail."""
        rig = Rig(failure_threshold=2, startup_seconds=600)
        for _ in range(599):
            rig.t += 1
            rig.feed(rig.det.health_failed("connection refused", refused=True, now=rig.t))
            rig.feed(rig.det.health_failed("timed out", refused=False, now=rig.t))
            rig.feed(rig.det.load_failed("timed out"))
        assert rig.reasons() == set()
        assert not rig.det.started

    def test_an_engine_whose_port_was_open_and_now_refuses_crashed_while_loading(
            self) -> None:
        """Unanswered while loading is no finding; but once its port accepted a connection,
        refusals are the loading process gone: engine_crash without waiting for the startup
        window (the pod's container exited; the group must be recreated)."""
        rig = Rig(failure_threshold=2, startup_seconds=600)
        rig.feed(rig.det.health_failed("timed out", refused=False, now=1.0))
        rig.det.port_open()
        rig.feed(rig.det.health_failed("timed out", refused=False, now=2.0))
        rig.feed(rig.det.health_failed("timed out", refused=False, now=3.0))
        assert rig.reasons() == set()
        rig.feed(rig.det.health_failed("connection refused", refused=True, now=4.0))
        assert rig.reasons() == set()  # one refusal: not yet
        rig.feed(rig.det.health_failed("connection refused", refused=True, now=4.2))
        assert rig.reasons() == {"EngineNotListening"}
        assert not rig.det.started

    def test_an_engine_that_never_answers_is_unhealthy_after_the_startup_window(self) -> None:
        rig = Rig(failure_threshold=2, startup_seconds=600)
        rig.feed(rig.det.health_failed("timed out", refused=False, now=0.0))
        rig.feed(rig.det.health_failed("timed out", refused=False, now=600.0))
        assert rig.reasons() == {"EngineNeverStarted"}
        rig.feed(rig.det.health_ok())  # it got there in the end
        assert rig.reasons() == set()

    def test_once_it_has_answered_a_refusal_is_a_crash_again(self) -> None:
        """The window is the first start only: a crash after serving is a crash."""
        rig = Rig(failure_threshold=2, startup_seconds=600)
        rig.feed(rig.det.health_failed("connection refused", refused=True, now=0.0))
        rig.feed(rig.det.health_ok())
        for _ in range(2):
            rig.feed(rig.det.health_failed("connection refused", refused=True, now=1.0))
        assert rig.reasons() == {"EngineNotListening"}


class TestCanary:
    def test_canary_only_when_idle_long_enough_and_not_too_often(self) -> None:
        """Idle 30 s before the first canary, then at most one a minute; none while busy."""
        rig = Rig(canary_idle_seconds=30, canary_interval_seconds=60)
        rig.scrape(load(0, 1), times=30)  # idle since the first scrape: 29 s
        assert not rig.det.canary_due(rig.t, None)
        rig.scrape(load(0, 1))
        assert rig.det.canary_due(rig.t, None)
        assert not rig.det.canary_due(rig.t, rig.t - 59)
        rig.scrape(load(1, 2))
        assert not rig.det.canary_due(rig.t, None)

    def test_a_failed_canary_is_a_hang_until_the_engine_moves(self) -> None:
        """The canary not finishing is engine_hang; progress clears it."""
        rig = Rig()
        rig.scrape(load(0, 5))
        rig.feed(rig.det.canary_failed("no answer within 10s"))
        assert rig.reasons() == {"EngineCanaryFailed"}
        rig.scrape(load(0, 6))
        assert rig.reasons() == set()


def test_presets_read_vllm_metrics_summed_over_engines() -> None:
    """Two engine cores' series are summed; a progress metric an engine does not export
    is reported missing rather than taken as zero."""
    text = """# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 2.0
vllm:num_requests_running{engine="1",model_name="m"} 1.0
# TYPE vllm:generation_tokens counter
vllm:generation_tokens_total{engine="0",model_name="m"} 10.0
vllm:generation_tokens_total{engine="1",model_name="m"} 5.0
"""
    sample = parse_load(text, PRESETS["vllm"])
    assert (sample.running, sample.waiting) == (3.0, 0.0)
    assert sample.progress[0] == 15.0
    assert "vllm:kv_cache_usage_perc" in sample.missing


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_names_where_to_look(name: str) -> None:
    """Each preset has paths and at least one running and one progress metric."""
    preset = PRESETS[name]
    assert preset.health_path.startswith("/") and preset.metrics_path.startswith("/")
    assert preset.running and preset.progress
