"""The sidecar against a real engine process (the stand-in, speaking vLLM's surface) on
loopback: hang, crash, unhealthy, a long prefill, an idle hang caught by the canary, an
engine loading its model, a group's worker process stopped or killed behind its leader —
and the pod's traffic signal (/readyz) following them while /livez stays about the
sidecar."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from simulator.processes import EngineProcess, EngineWorkerProcess, SidecarProcess, free_port

SOLO = {"pod_name": "llama-0", "pod_namespace": "serving", "group_name": "llama",
        "group_index": "0", "group_size": 1, "rank": 0, "peers": ["127.0.0.1"]}


@pytest.fixture(name="engine")
def _engine(tmp_path: Path) -> Iterator[EngineProcess]:
    engine = EngineProcess(tmp_path).start()
    yield engine
    engine.stop()


def sidecar(tmp_path: Path, engine: EngineProcess, **engine_settings: Any) -> SidecarProcess:
    return SidecarProcess(tmp_path, "solo", {
        "sidecar": SOLO, "engine": {"url": engine.url, **engine_settings}}).start()


def reasons(car: SidecarProcess) -> set[str]:
    return {f["reason"] for f in car.findings()}


def test_hung_engine_is_found_while_its_health_says_200(tmp_path: Path,
                                                        engine: EngineProcess) -> None:
    """Under load the engine stops stepping (counters flat, requests running, /health 200):
    engine_hang within stall_seconds, /readyz 503, /livez 200; it resumes: cleared, ready."""
    car = sidecar(tmp_path, engine, stall_seconds=2.0)
    try:
        engine.control(load=4)
        car.wait_for(lambda: car.get("/readyz")[0] == 200, what="ready")
        time.sleep(3)  # well past the stall window: a working engine raises nothing
        assert car.findings() == []
        engine.control(hang=True)
        hang = car.wait_for(lambda: car.findings("engine_hang"), what="engine_hang")[0]
        assert hang["severity"] == "critical" and hang["reason"] == "EngineStalled"
        assert hang["evidence"]["running"] == 4
        assert car.get("/readyz")[0] == 503
        assert car.get("/livez")[0] == 200
        assert not car.findings("engine_unhealthy")  # its /health kept answering 200
        engine.control(hang=False)
        car.wait_for(lambda: not car.findings("engine_hang"), what="hang cleared")
        car.wait_for(lambda: car.get("/readyz")[0] == 200, what="ready again")
    finally:
        assert car.stop() == 0


def test_crashed_engine_is_found_and_unready(tmp_path: Path, engine: EngineProcess) -> None:
    """The engine process dies: its port refuses; engine_crash after two probes."""
    car = sidecar(tmp_path, engine)
    try:
        car.wait_for(lambda: car.get("/readyz")[0] == 200, what="ready")
        engine.control(crash=True)
        crash = car.wait_for(lambda: car.findings("engine_crash"), what="engine_crash")[0]
        assert crash["reason"] == "EngineNotListening"
        assert car.get("/readyz")[0] == 503
        assert car.get("/livez")[0] == 200
    finally:
        assert car.stop() == 0


def test_a_refused_probe_is_confirmed_at_once_not_a_period_later(
        tmp_path: Path, engine: EngineProcess) -> None:
    """With a 10 s probe period a crash is found at the next probe, not the one after: the
    second of the two refusals engine_crash needs is asked for right after the first, not
    a period later (which would take 10 to 20 s)."""
    car = sidecar(tmp_path, engine, probe_seconds=10.0)
    try:
        car.wait_for(lambda: car.get("/readyz")[0] == 200, what="ready")
        engine.control(crash=True)
        crash = car.wait_for(lambda: car.findings("engine_crash"), timeout=15,
                             what="engine_crash")[0]
        assert crash["evidence"]["probes"] == 2
    finally:
        assert car.stop() == 0


def test_an_engine_that_dies_between_probes_is_probed_when_its_port_closes(
        tmp_path: Path, engine: EngineProcess) -> None:
    """With a 30 s probe period, the engine dies a moment after the first probe: the idle
    connection the sidecar holds to its port ends, the port refuses a new one, and the
    probe loop looks at once — engine_crash long before the next period (which would be
    25 s or more away)."""
    car = sidecar(tmp_path, engine, probe_seconds=30.0)
    try:
        car.wait_for(lambda: car.get("/readyz")[0] == 200, what="ready")
        assert car.status()["engine"]["watch_wakes"] == 0
        engine.control(crash=True)
        crash = car.wait_for(lambda: car.findings("engine_crash"), timeout=10,
                             what="engine_crash before the next periodic probe")[0]
        assert crash["evidence"]["probes"] == 2
        assert car.status()["engine"]["watch_wakes"] >= 1
    finally:
        assert car.stop() == 0


def test_an_engine_that_closes_idle_connections_is_not_a_finding(tmp_path: Path) -> None:
    """vLLM closes an idle connection after 5 s; the stand-in here after 0.3 s, over and over:
    the watch reconnects, the port answers, nothing is woken, nothing is found."""
    engine = EngineProcess(tmp_path, extra=["--idle-close-seconds", "0.3"]).start()
    car = sidecar(tmp_path, engine, probe_seconds=0.5)
    try:
        car.wait_for(lambda: car.get("/readyz")[0] == 200, what="ready")
        time.sleep(4)  # a dozen closed watch connections
        assert car.findings() == []
        assert car.status()["engine"]["watch_wakes"] == 0
        assert car.get("/readyz")[0] == 200
    finally:
        assert car.stop() == 0
        engine.stop()


def test_failing_health_is_unhealthy(tmp_path: Path, engine: EngineProcess) -> None:
    """/health answers 503: engine_unhealthy, not a crash."""
    car = sidecar(tmp_path, engine)
    try:
        engine.control(unhealthy=True)
        finding = car.wait_for(lambda: car.findings("engine_unhealthy"), what="unhealthy")[0]
        assert finding["reason"] == "EngineHealthFailing"
        assert not car.findings("engine_crash")
        engine.control(unhealthy=False)
        car.wait_for(lambda: not car.findings(), what="cleared")
    finally:
        assert car.stop() == 0


def test_long_prefill_is_not_a_hang(tmp_path: Path) -> None:
    """Prompts of 40,000 tokens in 512-token chunks: each request spends ~1.6 s in
    prefill with no token produced, longer than a 1 s stall window; the KV cache grows
    every step, so nothing is raised."""
    engine = EngineProcess(tmp_path, step_ms=20).start()
    car = sidecar(tmp_path, engine, stall_seconds=1.0, probe_seconds=0.2)
    try:
        engine.control(load=1, prompt_tokens=40_000, max_tokens=2)
        time.sleep(6)
        assert car.findings() == []
        assert car.status()["engine"]["running"] == 1
    finally:
        car.stop()
        engine.stop()


def test_idle_engine_that_hangs_is_caught_by_the_canary(tmp_path: Path,
                                                        engine: EngineProcess) -> None:
    """No requests, so no stall to see; the engine hangs anyway. The canary (one token,
    from token ids) does not finish within its deadline: engine_hang."""
    car = sidecar(tmp_path, engine, canary_idle_seconds=1.0, canary_interval_seconds=1.0,
                  canary_timeout_seconds=1.0)
    try:
        car.wait_for(lambda: car.status()["engine"]["canaries"]["ok"] >= 1,
                     what="a canary that succeeds")
        engine.control(hang=True)
        finding = car.wait_for(lambda: car.findings("engine_hang"), what="canary hang")[0]
        assert finding["reason"] == "EngineCanaryFailed"
        engine.control(hang=False)
        car.wait_for(lambda: not car.findings("engine_hang"), timeout=20, what="cleared")
    finally:
        assert car.stop() == 0


@contextlib.contextmanager
def two_pods(tmp_path: Path, *leader_flags: str
             ) -> Iterator[tuple[EngineProcess, EngineWorkerProcess]]:
    """A group of two as the example lays it out: the worker pod's process (no HTTP) on
    127.0.1.2, the leader's engine on 127.0.1.1 stepping only with it."""
    worker = EngineWorkerProcess(tmp_path / "worker", "127.0.1.2", free_port()).start()
    try:
        leader = EngineProcess(tmp_path / "leader", extra=[
            "--workers", worker.address, "--bind", "127.0.1.1", *leader_flags]).start()
        try:
            yield leader, worker
        finally:
            leader.stop()
    finally:
        worker.stop()


@pytest.fixture(name="pipeline")
def _pipeline(tmp_path: Path) -> Iterator[tuple[EngineProcess, EngineWorkerProcess]]:
    with two_pods(tmp_path) as pair:
        yield pair


def test_a_stopped_worker_freezes_its_leader_whose_sidecar_sees_the_hang(
        tmp_path: Path, pipeline: tuple[EngineProcess, EngineWorkerProcess]) -> None:
    """SIGSTOP of the worker pod's process (no endpoint of its own): the leader's engine
    waits for it at the next step, its counters freeze with the requests running and its
    /health stays 200 — the leader's sidecar raises engine_hang; SIGCONT clears it."""
    leader, worker = pipeline
    car = sidecar(tmp_path, leader, stall_seconds=2.0)
    try:
        leader.control(load=4)
        car.wait_for(lambda: car.get("/readyz")[0] == 200, what="ready")
        steps = leader.control()["steps"]
        time.sleep(1)
        assert leader.control()["steps"] > steps  # the pipeline steps
        worker.signal(signal.SIGSTOP)
        hang = car.wait_for(lambda: car.findings("engine_hang"), what="engine_hang")[0]
        assert hang["reason"] == "EngineStalled" and hang["evidence"]["running"] == 4
        frozen = leader.control()["steps"]
        time.sleep(0.5)
        assert leader.control()["steps"] == frozen
        assert car.get("/readyz")[0] == 503
        assert not car.findings("engine_unhealthy") and not car.findings("engine_crash")
        worker.signal(signal.SIGCONT)
        car.wait_for(lambda: not car.findings("engine_hang"), what="hang cleared")
    finally:
        worker.signal(signal.SIGCONT)
        assert car.stop() == 0


def test_a_killed_pipeline_stage_holds_its_leader_as_a_hang_then_ends_it(
        tmp_path: Path) -> None:
    """SIGKILL of the worker's process with pipeline parallel (the example's split across
    nodes): as vLLM 0.32 does, the leader's engine holds its step — /health 200, counters
    frozen — so its sidecar sees a hang, not a crash; at the execute-model timeout (2 s
    here) the engine exits and the port refusing is a crash."""
    with two_pods(tmp_path, "--execute-timeout-seconds", "4") as (leader, worker):
        car = sidecar(tmp_path, leader, stall_seconds=1.0)
        try:
            leader.control(load=1)
            car.wait_for(lambda: car.get("/readyz")[0] == 200, what="ready")
            worker.signal(signal.SIGKILL)
            car.wait_for(lambda: car.findings("engine_hang"), what="engine_hang")
            assert not car.findings("engine_crash")
            assert leader.proc is not None and leader.proc.wait(30) == 1
            log = leader.log_path.read_text()
            assert "worker 1 closed its connection; worker 1 did not answer a step" in log
            car.wait_for(lambda: car.findings("engine_crash"), what="engine_crash")
        finally:
            assert car.stop() == 0


def test_a_killed_tensor_parallel_worker_takes_its_leader_down_at_once(
        tmp_path: Path) -> None:
    """With ``--parallel tensor`` the leader's engine loses a rank at its next step and
    exits, as vLLM's does; the leader's sidecar finds its port refusing: engine_crash."""
    with two_pods(tmp_path, "--parallel", "tensor") as (leader, worker):
        car = sidecar(tmp_path, leader)
        try:
            leader.control(load=1)
            car.wait_for(lambda: car.get("/readyz")[0] == 200, what="ready")
            worker.signal(signal.SIGKILL)
            crash = car.wait_for(lambda: car.findings("engine_crash"),
                                 what="engine_crash")[0]
            assert crash["reason"] == "EngineNotListening"
            assert leader.proc is not None and leader.proc.wait(5) == 1
        finally:
            assert car.stop() == 0


def test_a_leader_held_by_a_stopped_worker_past_the_execute_timeout_exits(
        tmp_path: Path) -> None:
    """vLLM's own last resort, played: a step that waits for a stopped worker longer than
    the execute-model timeout (300 s in vLLM; 2 s here) ends the engine, which says why —
    the hang turns into a crash, as it does on vLLM minutes later."""
    with two_pods(tmp_path, "--execute-timeout-seconds", "2") as (leader, worker):
        car = sidecar(tmp_path, leader, stall_seconds=1.0)
        try:
            leader.control(load=2)
            car.wait_for(lambda: car.get("/readyz")[0] == 200, what="ready")
            worker.signal(signal.SIGSTOP)
            car.wait_for(lambda: car.findings("engine_hang"), what="engine_hang")
            assert leader.proc is not None and leader.proc.wait(30) == 1
            assert "did not answer a step within 2 s" in leader.log_path.read_text()
            crash = car.wait_for(lambda: car.findings("engine_crash"),
                                 what="engine_crash")[0]
            assert crash["reason"] == "EngineNotListening"
        finally:
            assert car.stop() == 0


def test_an_engine_loading_its_model_is_not_ready_and_not_a_finding(tmp_path: Path) -> None:
    """The port bound but unanswered for 6 s (a model loading; probes time out, as on vLLM
    before it serves): no finding however many probes fail, /readyz 503 on engine-started;
    once it answers, ready."""
    engine = EngineProcess(tmp_path, extra=["--load-seconds", "6"]).start()
    car = sidecar(tmp_path, engine, probe_seconds=0.3, timeout_seconds=0.5)
    try:
        time.sleep(4)
        code, body = car.get("/readyz")
        assert code == 503 and "engine-started" in body
        assert car.findings() == []
        assert car.status()["engine"]["probes"] >= 2
        car.wait_for(lambda: car.get("/readyz")[0] == 200, timeout=20, what="ready once loaded")
        assert car.findings() == []
    finally:
        assert car.stop() == 0
        engine.stop()


def test_sidecar_without_a_group_exits_2_naming_the_field(tmp_path: Path) -> None:
    """Not in an LWS pod and no group configured: exit 2 before anything starts."""
    config = tmp_path / "c.yaml"
    config.write_text("sidecar: {pod_name: p, pod_namespace: n}\n")
    proc = subprocess.run([sys.executable, "-m", "supervisor", "sidecar", "--config",
                           str(config)], capture_output=True, text=True, timeout=30,
                          env={"PATH": "/usr/bin:/bin"}, check=False)
    assert proc.returncode == 2
    assert "sidecar.group_size" in proc.stderr


def test_an_engine_that_dies_while_loading_its_model_is_a_crash(tmp_path: Path) -> None:
    """The engine binds its port and loads for a minute; the sidecar's watch connection is
    accepted (a process is there). It dies mid-load: the port refuses, engine_crash — not
    half an hour of "loading" (engine.startup_seconds) for a process that is gone."""
    engine = EngineProcess(tmp_path, extra=["--load-seconds", "60"]).start()
    car = sidecar(tmp_path, engine, probe_seconds=0.3, timeout_seconds=0.5)
    try:
        time.sleep(2)  # loading: probes unanswered, no finding
        assert car.findings() == []
        assert car.status()["engine"]["started"] is False
        assert engine.proc is not None
        engine.proc.kill()  # SIGKILL
        crash = car.wait_for(lambda: car.findings("engine_crash"), what="engine_crash")[0]
        assert crash["evidence"]["loading"] is True
        assert car.get("/readyz")[0] == 503
    finally:
        assert car.stop() == 0
        engine.stop()
