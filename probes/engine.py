"""An inference engine's own HTTP surface: ``/health``, its Prometheus metrics, and a
one-token completion — read, never judged (``supervisor.detectors.engine`` judges).

A hung engine keeps answering ``/health`` (vLLM's returns 200 unless the engine process
has died: it makes no round trip to the engine core), so the data plane is read from the
engine's own counters: are the requests it says are running making progress? Each engine
names those counters differently; a *preset* says which to read.

Every gauge and counter below is computed by the engine core and only *published* by the
API server, so all of them freeze together when a rank stops — at whatever the last
snapshot said, which reads 0 running and 0 waiting with requests in flight when the stop
fell between two batches. The API server's own count of requests it is answering does not
freeze with the engine: vLLM keeps it at ``GET /load`` (``{"server_load": N}``, counted by
the serving routes themselves) when started with ``--enable-server-load-tracking``; without
that flag it reads 0 and the gauges are all there is. A preset names that path
(``inflight_path``), and busy means any of the three (running, waiting, in flight) above
zero.

Presets, checked against each engine's source:

- ``vllm`` — vLLM V1, ``vllm/v1/metrics/loggers.py`` (0.32.0): gauges
  ``vllm:num_requests_running`` and ``vllm:num_requests_waiting``; counters
  ``vllm:generation_tokens_total``, ``vllm:prompt_tokens_total``,
  ``vllm:request_success_total``, ``vllm:num_preemptions_total``; the histogram
  ``vllm:iteration_tokens_total`` (one observation per batch of engine outputs: its
  ``_count`` counts steps). A long prefill produces no output until its last chunk
  (``vllm/v1/metrics/stats.py`` counts the prompt when prefill ends), so the gauge
  ``vllm:kv_cache_usage_perc`` — which grows with every chunk's KV blocks — is part of the
  progress signal: a long prefill that advances is not a stall.
- ``sglang`` — ``python/sglang/srt/observability/metrics_collector.py``: gauges
  ``sglang:num_running_reqs``, ``sglang:num_queue_reqs``; ``sglang:realtime_tokens_total``
  advances every decode iteration and prefill batch (newer versions);
  ``sglang:prompt_tokens_total``, ``sglang:generation_tokens_total``,
  ``sglang:num_requests_total`` only when requests finish; ``sglang:cuda_graph_passes_total``
  and the forward-time counters per pass. Needs ``--enable-metrics``.
- ``trtllm`` — TensorRT-LLM's ``trtllm-serve``, ``tensorrt_llm/metrics/collector.py``:
  Prometheus text at ``/prometheus/metrics`` (``/metrics`` is JSON iteration stats), with
  ``return_perf_metrics``. Its counters move only when a request finishes and its gauges are
  refreshed only then, so no per-step signal exists: the stall window must exceed the
  longest request, and the idle canary carries more of the weight.
- ``nim`` — NVIDIA NIM for LLMs (documented names, no prefix): ``num_requests_running``,
  ``num_requests_waiting``, ``prompt_tokens_total``, ``generation_tokens_total``,
  ``request_finish_total``, ``gpu_cache_usage_perc``; health ``/v1/health/ready``, metrics
  ``/v1/metrics``.

Every engine above accepts ``POST /v1/completions`` with ``prompt`` as a list of token ids,
so the canary needs no tokenizer.

Between probes, an idle TCP connection held to the engine's port (:meth:`EngineClient.
connect`) says at once when the port may have closed: a process that exits, however it
dies, has the kernel close every socket it held, so the connection ends that moment — the
sidecar then probes without waiting for its next period. It is only a hint to look: the
probe judges (an engine closes idle connections on its own too, vLLM's after 5 s).
"""

from __future__ import annotations

import asyncio
import errno
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from urllib.parse import urlsplit

import aiohttp
from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True, slots=True)
class EnginePreset:
    """Where an engine answers, and which of its metrics say busy and progressing."""

    name: str
    health_path: str
    metrics_path: str
    completions_path: str
    running: tuple[str, ...]  # sample names summed: requests being computed
    waiting: tuple[str, ...]  # sample names summed: requests queued
    progress: tuple[str, ...]  # sample names: any change means the engine moved
    inflight_path: str = ""  # JSON: requests the API server is answering; "" = none


PRESETS: dict[str, EnginePreset] = {
    "vllm": EnginePreset(
        "vllm", "/health", "/metrics", "/v1/completions",
        running=("vllm:num_requests_running",), waiting=("vllm:num_requests_waiting",),
        progress=("vllm:generation_tokens_total", "vllm:prompt_tokens_total",
                  "vllm:iteration_tokens_total_count", "vllm:kv_cache_usage_perc",
                  "vllm:request_success_total", "vllm:num_preemptions_total"),
        inflight_path="/load"),
    "sglang": EnginePreset(
        "sglang", "/health", "/metrics", "/v1/completions",
        running=("sglang:num_running_reqs",), waiting=("sglang:num_queue_reqs",),
        progress=("sglang:realtime_tokens_total", "sglang:cuda_graph_passes_total",
                  "sglang:forward_execution_seconds_total",
                  "sglang:gpu_execution_seconds_total", "sglang:generation_tokens_total",
                  "sglang:prompt_tokens_total", "sglang:num_requests_total")),
    "trtllm": EnginePreset(
        "trtllm", "/health", "/prometheus/metrics", "/v1/completions",
        running=("trtllm_num_requests_running",), waiting=("trtllm_num_requests_waiting",),
        progress=("trtllm_num_requests_completed_total", "trtllm_request_success_total",
                  "trtllm_generation_tokens_total", "trtllm_prompt_tokens_total")),
    "nim": EnginePreset(
        "nim", "/v1/health/ready", "/v1/metrics", "/v1/completions",
        running=("num_requests_running",), waiting=("num_requests_waiting",),
        progress=("generation_tokens_total", "prompt_tokens_total", "request_finish_total",
                  "gpu_cache_usage_perc")),
}


class EngineCallFailed(Exception):
    """The engine answered with an error status, garbage, or not at all. ``refused`` is
    True when nothing listens on its port (the process is gone)."""

    def __init__(self, message: str, *, status: int | None = None,
                 refused: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.refused = refused


@dataclass(frozen=True, slots=True)
class HealthAnswer:
    status: int
    seconds: float


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """What the engine's metrics say right now."""

    running: float
    waiting: float
    progress: tuple[float | None, ...]  # in the preset's order; None: not exported
    missing: tuple[str, ...] = field(default=())  # progress metrics it does not export
    inflight: float | None = None  # what the API server is answering; None: not exported

    @property
    def busy(self) -> bool:
        return self.running + self.waiting > 0 or (self.inflight or 0) > 0


def parse_load(text: str, preset: EnginePreset) -> EngineLoad:
    """Sum each named sample over its label sets (engines export one series per engine
    core, rank or model)."""
    wanted = set(preset.running) | set(preset.waiting) | set(preset.progress)
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                sums[sample.name] = sums.get(sample.name, 0.0) + float(sample.value)
    progress = tuple(sums.get(name) for name in preset.progress)
    return EngineLoad(
        running=sum(sums.get(n, 0.0) for n in preset.running),
        waiting=sum(sums.get(n, 0.0) for n in preset.waiting),
        progress=progress,
        missing=tuple(n for n, v in zip(preset.progress, progress, strict=True) if v is None))


def _refused(exc: BaseException) -> bool:
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ConnectionRefusedError) or \
                getattr(cause, "errno", None) == errno.ECONNREFUSED:
            return True
        cause = cause.__cause__ or getattr(cause, "os_error", None)
    return False


class EngineConnection:
    """An idle TCP connection to the engine's port, held to learn when it ends."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def closed(self) -> None:
        """Return once the engine's end closed (or reset) the connection. Unbounded by
        design: it is a watch, not a call; the caller cancels it."""
        try:
            while await self._reader.read(4096):
                pass  # nothing is asked, so nothing is expected; whatever comes is dropped
        except OSError:
            pass  # a reset is an end as well
        finally:
            self._writer.close()


class EngineClient:
    """HTTP calls to one engine. No deadlines here: the caller runs each call under one."""

    def __init__(self, base_url: str, preset: EnginePreset,
                 session: aiohttp.ClientSession) -> None:
        self.base_url = base_url.rstrip("/")
        self.preset = preset
        self._session = session

    async def _get(self, path: str) -> tuple[int, str]:
        try:
            async with self._session.get(self.base_url + path) as resp:
                return resp.status, await resp.text()
        except aiohttp.ClientError as exc:
            raise EngineCallFailed(f"GET {path}: {exc}", refused=_refused(exc)) from exc

    async def connect(self) -> EngineConnection:
        """An idle connection to the engine's port (no request sent on it)."""
        url = urlsplit(self.base_url)
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            reader, writer = await asyncio.open_connection(url.hostname, port)
        except OSError as exc:
            raise EngineCallFailed(f"connect {url.hostname}:{port}: {exc}",
                                   refused=_refused(exc)) from exc
        return EngineConnection(reader, writer)

    async def health(self) -> HealthAnswer:
        started = time.monotonic()
        status, _ = await self._get(self.preset.health_path)
        return HealthAnswer(status, time.monotonic() - started)

    async def load(self) -> EngineLoad:
        status, text = await self._get(self.preset.metrics_path)
        if status != 200:
            raise EngineCallFailed(f"GET {self.preset.metrics_path} answered {status}",
                                   status=status)
        try:
            load = parse_load(text, self.preset)
        except ValueError as exc:
            raise EngineCallFailed(f"{self.preset.metrics_path} is not Prometheus text: "
                                   f"{exc}") from exc
        if not self.preset.inflight_path:
            return load
        return replace(load, inflight=await self.inflight())

    async def inflight(self) -> float | None:
        """Requests the API server is answering, by its own count (None: it keeps none)."""
        status, text = await self._get(self.preset.inflight_path)
        if status != 200:
            return None
        try:
            value = json.loads(text)["server_load"]
        except (ValueError, KeyError, TypeError):
            return None
        return float(value) if isinstance(value, int | float) else None

    async def model(self) -> str:
        """The first model the engine serves (``/v1/models``), for the canary."""
        status, text = await self._get("/v1/models")
        try:
            return str(json.loads(text)["data"][0]["id"])
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise EngineCallFailed(f"/v1/models answered {status} without a model",
                                   status=status) from exc

    async def complete(self, model: str, prompt: Sequence[int], max_tokens: int = 1) -> None:
        """One completion of ``max_tokens`` from token ids (no tokenizer needed)."""
        body = {"model": model, "prompt": list(prompt), "max_tokens": max_tokens,
                "temperature": 0}
        try:
            async with self._session.post(self.base_url + self.preset.completions_path,
                                          json=body) as resp:
                text = await resp.text()
                if resp.status != 200:
                    raise EngineCallFailed(f"completion answered {resp.status}: "
                                           f"{text[:200]}", status=resp.status)
        except aiohttp.ClientError as exc:
            raise EngineCallFailed(f"completion: {exc}", refused=_refused(exc)) from exc
