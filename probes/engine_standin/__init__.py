"""A stand-in inference engine speaking vLLM's HTTP surface, cheap enough to run dozens of.

The sidecar must be tested against hung, crashed and slow engines and against a long
prefill that is *not* a hang; a real vLLM on CPU takes a minute to start and two CPU
cores to run, so partition tests, benchmarks and the simulator use this instead (the
real vLLM is tested too, see ``tests/integration/test_vllm.py``).

It answers like vLLM 0.32:

- ``GET /health`` 200 (503 when told ``unhealthy``); a hung engine still answers 200, as
  vLLM's does;
- ``GET /metrics``: vLLM's own metric names and types through the same client library
  vLLM uses — gauges ``vllm:num_requests_running``, ``vllm:num_requests_waiting``,
  ``vllm:kv_cache_usage_perc``; counters ``vllm:generation_tokens_total``,
  ``vllm:prompt_tokens_total``, ``vllm:request_success_total``,
  ``vllm:num_preemptions_total``; the histogram ``vllm:iteration_tokens_total`` (one
  observation per step that produced output);
- ``GET /load``: ``{"server_load": N}``, the completions its API is answering (vLLM with
  ``--enable-server-load-tracking``);
- ``GET /v1/models``; ``POST /v1/completions`` with ``prompt`` as token ids (or text,
  counted as one token per word) and ``max_tokens``.

A scheduler loop runs one *step* every ``--step-ms``: requests in prefill advance by
``--prefill-chunk`` prompt tokens (chunked prefill: the KV cache grows, no output, the
prompt is counted when prefill ends — as in vLLM V1), requests in decode emit one token.

Control, ``POST /_control`` with a JSON object (any subset):

- ``{"hang": true}``: the scheduler stops — requests stay running, counters stay flat,
  ``/health`` stays 200 — until ``{"hang": false}``;
- ``{"crash": true}``: the process exits at once (the port then refuses connections);
- ``{"unhealthy": true}``: ``/health`` answers 503;
- ``{"slow": 4.0}``: every step takes 4 times as long (still progressing);
- ``{"load": N, "prompt_tokens": P, "max_tokens": T}``: keep N synthetic requests running
  (each a prompt of P tokens, T generated), so a test needs no client of its own.

``GET /_control`` returns the current settings and counters.

Laid out as a multi-node group runs (``--workers``): the leader pod's process serves the API
and rank 0; each worker pod runs ``python -m probes.engine_standin worker`` — no HTTP, one
TCP stream from the leader, one answer per step. The leader steps only once every worker
has answered that step (a pipeline stage, a tensor slice), so a worker stopped with SIGSTOP
or cut off from the leader freezes the leader's counters with its requests still running —
what the leader's sidecar must see — for up to ``--execute-timeout-seconds`` (300, vLLM's
execute-model timeout), after which the leader exits. A worker that dies does the same to a
pipeline (``--parallel pipeline``, the default: a stage, as the example splits the model
across nodes, and as vLLM 0.32 was measured to do), and takes the engine with it at once
with ``--parallel tensor`` (as vLLM does when it loses a tensor-parallel rank).
``--load-seconds S``: the port is bound at once but answered only S seconds after the
workers joined — a model loading, during which a health check waits unanswered, as vLLM's
does.
``python -m probes.engine_standin --port 0`` prints ``{"event": "listening", "port": P}``.
"""
