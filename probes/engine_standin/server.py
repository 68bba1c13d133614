"""The stand-in engine itself (see the package docstring)."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

KV_BLOCKS = 4096  # blocks of 16 tokens: what kv_cache_usage_perc is a fraction of
BLOCK_TOKENS = 16


@dataclass
class _Request:
    prompt: int
    max_tokens: int
    prefilled: int = 0
    generated: int = 0
    done: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop()
                                       .create_future())

    @property
    def blocks(self) -> int:
        return -(-(self.prefilled + self.generated) // BLOCK_TOKENS)


# How long a step may wait for the workers before the engine gives up and exits: vLLM's
# VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS, 300 s by default (multi-process executors only).
EXECUTE_TIMEOUT_SECONDS = 300.0


class StandinEngine:
    def __init__(self, model: str, step_seconds: float, prefill_chunk: int,
                 execute_timeout: float = EXECUTE_TIMEOUT_SECONDS,
                 parallel: str = "pipeline") -> None:
        self.model = model
        self.execute_timeout = execute_timeout
        self.parallel = parallel  # how the workers split the model: pipeline or tensor
        self.step_seconds = step_seconds
        self.prefill_chunk = prefill_chunk
        self.hang = False
        self.unhealthy = False
        self.slow = 1.0
        self.load = 0
        self.load_prompt = 16
        self.load_tokens = 64
        self.steps = 0
        self.inflight = 0  # completions the API is answering (vLLM's /load)
        self.running: list[_Request] = []
        self.workers: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._load_tasks: set[asyncio.Task[None]] = set()
        self.registry = CollectorRegistry()
        labels = ["engine", "model_name"]
        r = self.registry
        self._running = Gauge("vllm:num_requests_running",
                              "Number of requests in model execution batches.", labels,
                              registry=r)
        self._waiting = Gauge("vllm:num_requests_waiting", "Number of requests waiting to be "
                              "processed.", labels, registry=r)
        self._kv = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent "
                         "usage.", labels, registry=r)
        self._gen = Counter("vllm:generation_tokens", "Number of generation tokens "
                            "processed.", labels, registry=r)
        self._prompt = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.",
                               labels, registry=r)
        self._success = Counter("vllm:request_success", "Count of successfully processed "
                                "requests.", [*labels, "finished_reason"], registry=r)
        self._preempt = Counter("vllm:num_preemptions", "Cumulative number of preemption "
                                "from the engine.", labels, registry=r)
        self._iteration = Histogram("vllm:iteration_tokens_total", "Histogram of number of "
                                    "tokens per engine_step.", labels, registry=r,
                                    buckets=(1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048))
        self._labels = ("0", model)
        for metric in (self._running, self._waiting, self._kv, self._gen, self._prompt,
                       self._preempt, self._iteration):
            metric.labels(*self._labels)
        self._success.labels(*self._labels, "length")

    # --- the scheduler --------------------------------------------------------------------

    async def join(self, workers: list[tuple[str, int]], bind_host: str,
                   timeout: float) -> None:
        """Connect to every worker (they start when the leader does, so each is retried until
        it listens): from ``bind_host``, the leader pod's own address, so a cut between the
        two pods' addresses cuts this link too."""
        deadline = asyncio.get_running_loop().time() + timeout
        for host, port in workers:
            while True:
                try:
                    link = await asyncio.open_connection(host, port,
                                                         local_addr=(bind_host, 0))
                    break
                except OSError:
                    if asyncio.get_running_loop().time() > deadline:
                        raise
                    await asyncio.sleep(0.2)
            self.workers.append(link)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.step_seconds * self.slow)
            if self.hang:
                continue
            if self.running and self.workers:
                await self._step_workers()
            self.step()

    async def _step_workers(self) -> None:
        """Every worker computes its share of the step (its pipeline stage, its tensor
        slice) before the step is done: one that is stopped or cut off holds the step, and
        the leader's counters, where they are — until ``execute_timeout``, after which the
        engine dies as vLLM's does when a step's RPC to its workers times out. One that is
        gone does the same with pipeline parallel (measured on vLLM 0.32, PP=2: a killed
        stage left /health 200 and every gauge frozen for the 300 s) and kills the engine at
        once with tensor parallel (its collectives fail in the same second)."""
        for _, writer in self.workers:
            writer.write(b"s\n")
        rank, lost = 0, ""
        try:
            async with asyncio.timeout(self.execute_timeout):
                for rank, (reader, writer) in enumerate(self.workers, start=1):
                    try:
                        await writer.drain()
                        if not await reader.readline():
                            raise ConnectionError(f"worker {rank} closed its connection")
                    except OSError as exc:
                        if self.parallel == "tensor":
                            raise
                        lost = f"{exc}; "
                        await asyncio.Event().wait()  # the step never completes
        except TimeoutError:
            self._die(f"{lost}worker {rank} did not answer a step within "
                      f"{self.execute_timeout:g} s (the execute-model timeout)")
        except OSError as exc:
            self._die(str(exc))

    @staticmethod
    def _die(why: str) -> None:
        print(json.dumps({"event": "engine dead", "error": why}), flush=True)
        os._exit(1)  # no cleanup, no answer: the API server goes with its engine

    def step(self) -> None:
        self.steps += 1
        output_tokens = 0
        for req in list(self.running):
            if req.prefilled < req.prompt:
                req.prefilled = min(req.prompt, req.prefilled + self.prefill_chunk)
                if req.prefilled == req.prompt:  # V1 counts the prompt when prefill ends
                    self._prompt.labels(*self._labels).inc(req.prompt)
                    output_tokens += req.prompt
                continue
            req.generated += 1
            output_tokens += 1
            self._gen.labels(*self._labels).inc()
            if req.generated >= req.max_tokens:
                self.running.remove(req)
                self._success.labels(*self._labels, "length").inc()
                if not req.done.done():
                    req.done.set_result(None)
        if output_tokens:
            self._iteration.labels(*self._labels).observe(output_tokens)
        self._publish()

    def _publish(self) -> None:
        self._running.labels(*self._labels).set(len(self.running))
        blocks = sum(r.blocks for r in self.running)
        self._kv.labels(*self._labels).set(min(1.0, blocks / KV_BLOCKS))

    async def generate(self, prompt: int, max_tokens: int) -> int:
        req = _Request(prompt=max(1, prompt), max_tokens=max(1, max_tokens))
        self.running.append(req)
        self._publish()
        await req.done
        return req.generated

    def set_load(self, n: int) -> None:
        self.load = n
        while len(self._load_tasks) < n:
            task = asyncio.get_running_loop().create_task(self._load_loop())
            self._load_tasks.add(task)
            task.add_done_callback(self._load_tasks.discard)

    async def _load_loop(self) -> None:
        while len(self._load_tasks) <= self.load:
            await self.generate(self.load_prompt, self.load_tokens)

    def metrics(self) -> bytes:
        return generate_latest(self.registry)


async def serve_worker(host: str, port: int) -> None:
    """A worker's process: no HTTP, one TCP stream from its leader, one answer per step.
    It exits when its leader goes (a headless vLLM worker without its engine has nothing to
    serve)."""
    done = asyncio.get_running_loop().create_future()

    async def leader(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.readline():
                writer.write(b"k\n")
                await writer.drain()
        except OSError:
            pass
        if not done.done():
            done.set_result(None)

    server = await asyncio.start_server(leader, host, port)
    bound = server.sockets[0].getsockname()
    print(json.dumps({"event": "listening", "host": bound[0], "port": bound[1]}), flush=True)
    async with server:
        await done


def build_app(engine: StandinEngine) -> web.Application:
    completion_ids = itertools.count(1)

    async def health(_: web.Request) -> web.Response:
        return web.Response(status=503 if engine.unhealthy else 200)

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=engine.metrics(),
                            content_type="text/plain", charset="utf-8")

    async def load(_: web.Request) -> web.Response:
        return web.json_response({"server_load": engine.inflight})

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": engine.model, "object": "model", "owned_by": "standin"}]})

    async def completions(request: web.Request) -> web.Response:
        body = await request.json()
        prompt = body.get("prompt", [])
        tokens = len(prompt) if isinstance(prompt, list) else len(str(prompt).split())
        engine.inflight += 1
        try:
            generated = await engine.generate(tokens, int(body.get("max_tokens") or 16))
        finally:
            engine.inflight -= 1
        return web.json_response({
            "id": f"cmpl-{next(completion_ids)}", "object": "text_completion",
            "created": int(time.time()), "model": engine.model,
            "choices": [{"index": 0, "text": " x" * generated, "finish_reason": "length"}],
            "usage": {"prompt_tokens": tokens, "completion_tokens": generated,
                      "total_tokens": tokens + generated}})

    async def control(request: web.Request) -> web.Response:
        if request.method == "POST":
            order: dict[str, Any] = await request.json()
            if order.get("crash"):
                os._exit(1)  # as abrupt as an engine dying: no cleanup, no answer
            for key in ("hang", "unhealthy"):
                if key in order:
                    setattr(engine, key, bool(order[key]))
            if "slow" in order:
                engine.slow = max(1.0, float(order["slow"]))
            if "prompt_tokens" in order:
                engine.load_prompt = int(order["prompt_tokens"])
            if "max_tokens" in order:
                engine.load_tokens = int(order["max_tokens"])
            if "load" in order:
                engine.set_load(int(order["load"]))
        return web.json_response({"hang": engine.hang, "unhealthy": engine.unhealthy,
                                  "slow": engine.slow, "load": engine.load,
                                  "running": len(engine.running), "steps": engine.steps})

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/load", load)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", completions)
    app.router.add_route("*", "/_control", control)
    return app
