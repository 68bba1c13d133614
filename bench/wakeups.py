"""What a wake-up costs: a bare TLS server, on the plain event loop and on the controller's
coalescing one (``supervisor.runtime.wakeups``).

The server is nothing but an asyncio protocol that decodes each message as JSON and counts
it, in a process of its own on one core (the load on the other). 1,024 TLS connections
each send a tick-sized message every 10 s — the controller's load at 1,024 nodes, without
the controller. Figures, per variant, over 20 s after a 12 s warm-up:

- ``cpu_us_per_message_plain``: the server's CPU per message, a wake-up per message;
- ``cpu_us_per_message_coalesced``: the same on the coalescing loop (the controller's
  defaults: 10 events per wake-up, at most 100 ms of hold).
"""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.controller_scale import _place
from simulator.processes import report_tls, tls_client

CONNECTIONS = 1024
GAP = 10.0  # seconds between one connection's messages: the default heartbeat
WARMUP = 12.0
MEASURE = 20.0


def serve(tls_dir: str, window: str) -> None:
    """The server process: prints ``listening PORT``, then counts messages; ``STAT`` from
    a client is answered with the server's CPU time and message count."""
    from supervisor.runtime.wakeups import loop_factory
    from supervisor.tls import lean_tls_buffers

    lean_tls_buffers()  # as the controller
    count = 0

    class Counter(asyncio.Protocol):
        transport: asyncio.Transport

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            nonlocal count
            if data.startswith(b"STAT"):
                reply = {"cpu": time.process_time(), "count": count}
                self.transport.write(json.dumps(reply).encode() + b"\n")
                return
            json.loads(data)
            count += 1

    async def main() -> None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(f"{tls_dir}/tls.crt", f"{tls_dir}/tls.key")
        server = await asyncio.get_running_loop().create_server(
            Counter, "127.0.0.1", 0, ssl=context, backlog=4096)
        print("listening", server.sockets[0].getsockname()[1], flush=True)
        await server.serve_forever()

    with asyncio.Runner(loop_factory=loop_factory(float(window))) as runner:
        runner.run(main())


async def _load(port: int, tls: ssl.SSLContext) -> dict[str, float]:
    async def stat() -> dict[str, Any]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls)
        writer.write(b"STAT")
        await writer.drain()
        answer: dict[str, Any] = json.loads(await reader.readline())
        writer.close()
        return answer

    async def one(index: int, stop: float) -> None:
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls)
        await asyncio.sleep(index / CONNECTIONS * GAP)  # spread over the period
        sequence = 0
        while time.monotonic() < stop:
            sequence += 1
            writer.write(json.dumps({"kind": "Tick", "sequence": sequence,
                                     "sent_at": time.time()}).encode())
            await writer.drain()
            await asyncio.sleep(GAP)
        writer.close()

    stop = time.monotonic() + WARMUP + MEASURE + GAP
    senders = [asyncio.create_task(one(i, stop)) for i in range(CONNECTIONS)]
    await asyncio.sleep(WARMUP)
    before = await stat()
    await asyncio.sleep(MEASURE)
    after = await stat()
    await asyncio.gather(*senders)
    messages = after["count"] - before["count"]
    return {"cpu_us_per_message": round((after["cpu"] - before["cpu"]) * 1e6
                                        / max(1, messages), 1)}


def _variant(tls_dir: Path, window: float) -> dict[str, float]:
    server = subprocess.Popen(
        [sys.executable, "-c", "import sys; from bench.wakeups import serve; "
         "serve(*sys.argv[1:])", str(tls_dir), str(window)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        word, _, port = server.stdout.readline().partition(" ")
        if word != "listening":
            raise RuntimeError("the server did not start")
        _place(server.pid, [])  # the server on a core of its own, as the controller is
        return asyncio.run(_load(int(port), tls_client(tls_dir)))
    finally:
        server.terminate()
        server.wait(timeout=30)


def run(quick: bool = False) -> dict[str, Any]:
    del quick  # one size: ~70 s
    with tempfile.TemporaryDirectory(prefix="bench-wakeups-") as tmp:
        tls_dir = report_tls(Path(tmp) / "tls")
        plain = _variant(tls_dir, 0.0)
        coalesced = _variant(tls_dir, 0.1)
    return {"connections": CONNECTIONS, "messages_per_second": round(CONNECTIONS / GAP, 1),
            "cpu_us_per_message_plain": plain["cpu_us_per_message"],
            "cpu_us_per_message_coalesced": coalesced["cpu_us_per_message"]}
