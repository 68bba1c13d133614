"""``python -m probes.engine_standin --port 0``: run the stand-in engine until killed."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from aiohttp import web

from probes.engine_standin.server import StandinEngine, build_app


async def _serve(args: argparse.Namespace) -> None:
    engine = StandinEngine(args.model, args.step_ms / 1000, args.prefill_chunk)
    runner = web.AppRunner(build_app(engine), access_log=None, handle_signals=True)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(json.dumps({"event": "listening", "host": args.host, "port": port}), flush=True)
    if args.load:
        engine.set_load(args.load)
    try:
        await engine.run()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m probes.engine_standin")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model", default="standin-model")
    parser.add_argument("--step-ms", type=float, default=20.0,
                        help="one scheduler step (a decode token per running request)")
    parser.add_argument("--prefill-chunk", type=int, default=512,
                        help="prompt tokens a request advances per step while in prefill")
    parser.add_argument("--load", type=int, default=0,
                        help="synthetic requests kept running from the start")
    args = parser.parse_args(argv)
    try:
        asyncio.run(_serve(args))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
