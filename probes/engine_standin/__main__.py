"""``python -m probes.engine_standin --port 0``: run the stand-in engine until killed;
``python -m probes.engine_standin worker --host H --port 0``: a worker rank's process, and
``--workers H:P,...`` on the engine: a leader that steps only with every worker."""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys

from aiohttp import web

from probes.engine_standin.server import (
    EXECUTE_TIMEOUT_SECONDS,
    StandinEngine,
    build_app,
    serve_worker,
)


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def _serve(args: argparse.Namespace) -> None:
    engine = StandinEngine(args.model, args.step_ms / 1000, args.prefill_chunk,
                           args.execute_timeout_seconds, args.parallel)
    # The port is bound at once and served only once the model is loaded, as vLLM's API
    # server does: a client meanwhile waits in the backlog, unanswered, not refused.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(128)
    port = sock.getsockname()[1]
    print(json.dumps({"event": "listening", "host": args.host, "port": port}), flush=True)
    if args.workers:
        await engine.join([_address(w) for w in args.workers.split(",")],
                          args.bind or args.host, args.join_timeout)
    await asyncio.sleep(args.load_seconds)
    # An idle connection is closed after --idle-close-seconds, as vLLM's uvicorn closes one
    # after 5 s (VLLM_HTTP_TIMEOUT_KEEP_ALIVE): a sidecar's watch connection must take that.
    runner = web.AppRunner(build_app(engine), access_log=None, handle_signals=True,
                           keepalive_timeout=args.idle_close_seconds)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    print(json.dumps({"event": "serving", "port": port}), flush=True)
    if args.load:
        engine.set_load(args.load)
    try:
        await engine.run()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m probes.engine_standin")
    parser.add_argument("role", nargs="?", choices=("engine", "worker"), default="engine",
                        help="engine: the API server and rank 0 (the leader pod); worker: "
                             "another rank's process, no HTTP (a worker pod)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model", default="standin-model")
    parser.add_argument("--step-ms", type=float, default=20.0,
                        help="one scheduler step (a decode token per running request)")
    parser.add_argument("--prefill-chunk", type=int, default=512,
                        help="prompt tokens a request advances per step while in prefill")
    parser.add_argument("--load", type=int, default=0,
                        help="synthetic requests kept running from the start")
    parser.add_argument("--workers", default="",
                        help="host:port,... of the worker processes every step needs")
    parser.add_argument("--bind", default="",
                        help="the address the leader reaches its workers from (default "
                             "--host)")
    parser.add_argument("--join-timeout", type=float, default=600.0,
                        help="seconds to wait for every worker to listen")
    parser.add_argument("--parallel", choices=("pipeline", "tensor"), default="pipeline",
                        help="how the workers split the model, which decides what a lost "
                             "worker does: pipeline (as the example splits it across "
                             "nodes): the step waits out the execute timeout; tensor: the "
                             "engine exits at once")
    parser.add_argument("--execute-timeout-seconds", type=float,
                        default=EXECUTE_TIMEOUT_SECONDS,
                        help="a step that waits this long for a worker ends the engine "
                             "(vLLM's VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS: 300)")
    parser.add_argument("--idle-close-seconds", type=float, default=5.0,
                        help="close a connection idle this long (vLLM: 5 s)")
    parser.add_argument("--load-seconds", type=float, default=0.0,
                        help="loading the model: the port is bound but not served for "
                             "this long after the workers joined")
    args = parser.parse_args(argv)
    try:
        if args.role == "worker":
            asyncio.run(serve_worker(args.host, args.port))
        else:
            asyncio.run(_serve(args))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
