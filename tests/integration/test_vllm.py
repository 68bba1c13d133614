"""The sidecar against a real vLLM (vLLM's CPU build serving a tiny random-weight Llama,
installed once into a cached venv by tests/vllm/install.sh).

What a hang looks like in real vLLM: SIGSTOP of ``VLLM::EngineCore`` under load leaves the
API server answering ``/health`` 200 in milliseconds, ``vllm:num_requests_running`` at the
number of clients, and every progress counter frozen — no timeout of vLLM's own fires for
minutes. The sidecar must see it within its stall window, and see it clear on SIGCONT.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from simulator.processes import CompletionLoad, SidecarProcess, VllmProcess

pytestmark = pytest.mark.vllm

SOLO = {"pod_name": "llama-0", "pod_namespace": "serving", "group_name": "llama",
        "group_index": "0", "group_size": 1, "rank": 0, "peers": ["127.0.0.1"]}


@pytest.fixture(scope="module", name="vllm")
def _vllm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmProcess]:
    server = VllmProcess(tmp_path_factory.mktemp("vllm")).start()
    yield server
    server.stop()


def sidecar(tmp_path: Path, vllm: VllmProcess) -> SidecarProcess:
    """Shipped engine defaults (preset vllm, 5 s stall window), canary off: the real
    engine is busy under load in these tests."""
    return SidecarProcess(tmp_path, "vllm", {
        "sidecar": SOLO, "engine": {"url": vllm.url, "canary": False}}).start()


def test_healthy_vllm_under_load_raises_nothing(tmp_path: Path, vllm: VllmProcess) -> None:
    """Four clients looping for 20 s: requests complete, the sidecar is ready and silent."""
    car = sidecar(tmp_path, vllm)
    try:
        with CompletionLoad(vllm.url, "tiny-llama") as load:
            car.wait_for(lambda: car.status()["engine"]["running"], what="requests running")
            time.sleep(20)
            assert load.done > 0 and load.errors == 0
        assert car.findings() == []
        assert car.get("/readyz")[0] == 200
    finally:
        assert car.stop() == 0


def test_engine_core_stopped_under_load_is_a_hang_with_health_200(
        tmp_path: Path, vllm: VllmProcess) -> None:
    """SIGSTOP of VLLM::EngineCore under load: vLLM's /health still answers 200, the
    sidecar raises engine_hang and drops out of traffic; SIGCONT: cleared, ready again."""
    car = sidecar(tmp_path, vllm)
    core = vllm.engine_core_pid()
    try:
        with CompletionLoad(vllm.url, "tiny-llama"):
            car.wait_for(lambda: car.status()["engine"]["running"], what="requests running")
            time.sleep(2)
            os.kill(core, signal.SIGSTOP)
            try:
                hang = car.wait_for(lambda: car.findings("engine_hang"), timeout=30,
                                    what="engine_hang")[0]
                assert vllm.health() == 200  # vLLM itself sees nothing wrong
                assert hang["reason"] == "EngineStalled"
                assert car.get("/readyz")[0] == 503
                assert not car.findings("engine_crash") and not car.findings(
                    "engine_unhealthy")
            finally:
                os.kill(core, signal.SIGCONT)
            car.wait_for(lambda: not car.findings("engine_hang"), timeout=30,
                         what="cleared after SIGCONT")
            assert car.get("/readyz")[0] == 200
    finally:
        assert car.stop() == 0


@pytest.mark.parametrize(("parallel", "worker"), [
    ("--pipeline-parallel-size", "Worker_PP1"), ("--tensor-parallel-size", "Worker_TP1")])
def test_a_stopped_worker_rank_under_load_is_a_hang_whatever_the_gauges_say(
        tmp_path: Path, parallel: str, worker: str) -> None:
    """vLLM with two ranks (pipeline or tensor parallel 2), as the example serves it with
    ``--enable-server-load-tracking``; four clients looping; SIGSTOP of the second rank's
    worker. Every engine metric freezes — at a snapshot that reads 0 running, 0 waiting
    when the stop came between batches — but the API server's own count of requests in
    flight does not: engine_hang with the shipped defaults, canary off (so the stall, not a
    canary, finds it). Then the rank is killed: a crash."""
    server = VllmProcess(tmp_path / "vllm", extra=[
        parallel, "2", "--enable-server-load-tracking"],
        eager=parallel != "--pipeline-parallel-size").start()
    car = sidecar(tmp_path, server)
    rank = server.process_pid(worker)
    try:
        with CompletionLoad(server.url, "tiny-llama") as load:
            car.wait_for(lambda: load.done >= 4, timeout=120, what="requests completing")
            os.kill(rank, signal.SIGSTOP)
            try:
                hang = car.wait_for(lambda: car.findings("engine_hang"), timeout=30,
                                    what="engine_hang")[0]
                assert hang["reason"] == "EngineStalled"
                assert hang["evidence"]["inflight"] == 4
                assert server.health() == 200  # vLLM itself sees nothing wrong
            finally:
                os.kill(rank, signal.SIGCONT)
            car.wait_for(lambda: not car.findings("engine_hang"), timeout=30,
                         what="cleared after SIGCONT")
            # The rank lost outright: here both ranks are the engine's own child processes,
            # whose death its executor notices — the engine shuts down and the API server
            # exits (engine_crash). (Across two nodes a lost pipeline rank is not noticed
            # for vLLM's 300 s RPC timeout: a stall meanwhile, as the stop above.)
            os.kill(rank, signal.SIGKILL)
            car.wait_for(lambda: car.findings("engine_crash"), timeout=30,
                         what="engine_crash")
    finally:
        assert car.stop() == 0
        server.stop()


def test_a_100000_token_prefill_is_not_a_hang(tmp_path: Path) -> None:
    """One 100,000-token prompt under chunked prefill: no token counter moves until it
    ends, and each chunk takes longer than the last as the context grows (seconds apart at
    the end on this CPU) — only the KV-cache gauge moves, ever more slowly. The shipped
    stall window widens with the engine's waits: no engine_hang at any point."""
    server = VllmProcess(tmp_path / "vllm", max_model_len=131_072).start()
    car = sidecar(tmp_path, server)
    body = json.dumps({"model": "tiny-llama", "prompt": [3 + i % 997 for i in range(100_000)],
                       "max_tokens": 1, "temperature": 0}).encode()
    answered: list[int] = []

    def send() -> None:
        req = urllib.request.Request(server.url + "/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=900) as resp:
            answered.append(resp.status)

    client = threading.Thread(target=send, daemon=True)
    try:
        client.start()
        car.wait_for(lambda: car.status()["engine"]["running"], what="the prompt running")
        started = time.monotonic()
        while client.is_alive() and time.monotonic() - started < 900:
            assert car.findings("engine_hang") == []
            time.sleep(0.5)
        assert answered == [200]
        assert car.findings("engine_hang") == []
        assert "EngineStalled" not in car.log()
    finally:
        assert car.stop() == 0
        server.stop()


def test_killed_engine_is_a_crash(tmp_path: Path, vllm: VllmProcess) -> None:
    """SIGKILL of VLLM::EngineCore: the API server exits after it, the port refuses,
    engine_crash. (Last in this module: it ends the shared server.)"""
    car = sidecar(tmp_path, vllm)
    try:
        car.wait_for(lambda: car.get("/readyz")[0] == 200, what="ready")
        os.kill(vllm.engine_core_pid(), signal.SIGKILL)
        crash = car.wait_for(lambda: car.findings("engine_crash"), timeout=60,
                             what="engine_crash")[0]
        assert crash["reason"] == "EngineNotListening"
        assert car.get("/readyz")[0] == 503
    finally:
        assert car.stop() == 0
