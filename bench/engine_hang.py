"""How fast the sidecar sees an engine stop, per layout the engine runs in.

``python -m bench engine_hang`` (``--quick``: 3 trials per layout instead of 20). Real
processes throughout: a sidecar with the shipped defaults (5 s stall window, 1 s probes,
canary on) beside the engine's API, four clients looping on it, then the engine stopped
and the time from the stop to the sidecar's ``engine_hang`` (its ``first_seen``) taken;
resumed, cleared, again. Layouts:

- ``standin``: the stand-in engine, one process, told to hang;
- ``standin_pp2``: the stand-in laid out as the simulator's groups — the leader's API and a
  worker process (no HTTP) on another address, which every step needs; the worker stopped
  (SIGSTOP);
- ``vllm``: real vLLM (CPU build, a tiny random-weight Llama), ``VLLM::EngineCore`` stopped;
- ``vllm_pp2``, ``vllm_tp2``: real vLLM with two ranks (pipeline or tensor parallel 2,
  ``--enable-server-load-tracking`` as the example serves it), the second rank's worker
  (``VLLM::Worker_PP1`` / ``VLLM::Worker_TP1``) stopped. Its gauges freeze with it (at 0
  running and 0 waiting when the stop fell between batches): the API server's in-flight
  count is what shows it busy.

Prints ``engine_hang_detect_s_p99_<layout>``, ``engine_hang_trials_<layout>``, and
``engine_hang_detect_s_p99`` (the worst layout). A p99 over 20 trials is their maximum.
"""

from __future__ import annotations

import os
import signal
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from simulator.processes import (
    CompletionLoad,
    EngineProcess,
    EngineWorkerProcess,
    SidecarProcess,
    VllmProcess,
    free_port,
)

SOLO = {"pod_name": "llama-0", "pod_namespace": "serving", "group_name": "llama",
        "group_index": "0", "group_size": 1, "rank": 0, "peers": ["127.0.0.1"]}
TRIALS = 20


def p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 3)


def _trial(car: SidecarProcess, stop: Callable[[], object], resume: Callable[[], object]
           ) -> float:
    time.sleep(2.0)  # progress under load first
    started = time.time()
    stop()
    try:
        found = car.wait_for(lambda: car.findings("engine_hang"), timeout=60,
                             what="engine_hang", poll=0.1)[0]
    finally:
        resume()
    car.wait_for(lambda: not car.findings("engine_hang"), timeout=60, what="cleared",
                 poll=0.1)
    return float(found["first_seen"]) - started


def _sidecar(workdir: Path, url: str) -> SidecarProcess:
    return SidecarProcess(workdir, "solo", {"sidecar": SOLO, "engine": {"url": url}}).start()


def standin(workdir: Path, trials: int) -> list[float]:
    engine = EngineProcess(workdir / "standin").start()
    car = _sidecar(workdir / "standin", engine.url)
    try:
        engine.control(load=4)
        return [_trial(car, lambda: engine.control(hang=True),
                       lambda: engine.control(hang=False)) for _ in range(trials)]
    finally:
        car.stop()
        engine.stop()


def standin_pp2(workdir: Path, trials: int) -> list[float]:
    worker = EngineWorkerProcess(workdir / "pp2", "127.0.1.2", free_port()).start()
    engine = EngineProcess(workdir / "pp2", extra=["--workers", worker.address,
                                                   "--bind", "127.0.1.1"]).start()
    car = _sidecar(workdir / "pp2", engine.url)
    try:
        with CompletionLoad(engine.url, "standin-model"):
            return [_trial(car, lambda: worker.signal(signal.SIGSTOP),
                           lambda: worker.signal(signal.SIGCONT)) for _ in range(trials)]
    finally:
        car.stop()
        worker.stop()
        engine.stop()


def vllm(workdir: Path, trials: int, extra: list[str] | None = None,
         process: str = "EngineCore") -> list[float]:
    # Pipeline parallel runs compiled: vLLM 0.32's CPU runner fails PP under --enforce-eager.
    server = VllmProcess(workdir / f"vllm-{process}", extra=extra,
                         eager="--pipeline-parallel-size" not in (extra or [])).start()
    car = _sidecar(workdir / f"vllm-{process}", server.url)
    try:
        pid = server.process_pid(process)
        with CompletionLoad(server.url, "tiny-llama"):
            return [_trial(car, lambda: os.kill(pid, signal.SIGSTOP),
                           lambda: os.kill(pid, signal.SIGCONT)) for _ in range(trials)]
    finally:
        car.stop()
        server.stop()


def layouts(workdir: Path, trials: int) -> dict[str, list[float]]:
    tracking = "--enable-server-load-tracking"
    return {
        "standin": standin(workdir, trials),
        "standin_pp2": standin_pp2(workdir, trials),
        "vllm": vllm(workdir, trials),
        "vllm_pp2": vllm(workdir, trials, ["--pipeline-parallel-size", "2", tracking],
                         "Worker_PP1"),
        "vllm_tp2": vllm(workdir, trials, ["--tensor-parallel-size", "2", tracking],
                         "Worker_TP1"),
    }


def figures(samples: dict[str, list[float]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, values in samples.items():
        out[f"engine_hang_detect_s_p99_{name}"] = p99(values)
        out[f"engine_hang_trials_{name}"] = len(values)
    every = [v for values in samples.values() for v in values]
    out["engine_hang_detect_s_p99"] = max(p99(v) for v in samples.values())
    out["engine_hang_detect_s_median"] = round(statistics.median(every), 3)
    out["engine_hang_trials"] = len(every)
    return out


def run(quick: bool = False) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-engine-hang-") as tmp:
        return figures(layouts(Path(tmp), 3 if quick else TRIALS))
