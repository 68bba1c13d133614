"""The agent pushes its state to the controller on change and as a heartbeat, with its
ServiceAccount token, and a missing controller never holds up probing."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from simulator.processes import AgentProcess


class ControllerStub:
    """A real HTTP server on loopback that records the reports it receives."""

    def __init__(self, port: int = 0) -> None:
        self.reports: list[tuple[dict[str, str], dict[str, Any]]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length))
                stub.reports.append((dict(self.headers), {"path": self.path, **body}))
                self.send_response(202)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(name="token_file")
def _token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text("test-sa-token\n")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def reporting_agent(tmp_path: Path, port: int, token_file: Path) -> AgentProcess:
    return AgentProcess(tmp_path, gpus=2, settings={"reporting": {
        "controller_url": f"http://127.0.0.1:{port}", "token_file": str(token_file),
        "heartbeat_seconds": 30.0, "timeout_seconds": 2.0}})


@pytest.fixture(name="controller")
def _controller() -> Iterator[ControllerStub]:
    stub = ControllerStub()
    yield stub
    stub.close()


def test_reports_on_change_with_bearer_token(tmp_path: Path, controller: ControllerStub,
                                             token_file: Path) -> None:
    """A new finding is pushed at once (not at the 30 s heartbeat), authenticated."""
    agent = reporting_agent(tmp_path, controller.port, token_file).start()
    try:
        agent.wait_for(lambda: controller.reports, what="first report")
        headers, first = controller.reports[0]
        assert headers["Authorization"] == "Bearer test-sa-token"
        assert first["path"] == "/v1/reports/node"
        assert first["kind"] == "NodeReport" and first["node"] == "node-under-test"
        assert [g["index"] for g in first["gpus"]] == [0, 1]
        agent.control.inject_xid(1, 79)
        agent.wait_for(lambda: any(f["fault_class"] == "xid" for _, r in controller.reports
                                   for f in r["findings"]), timeout=10, what="xid report")
        sequences = [r["sequence"] for _, r in controller.reports]
        assert sequences == sorted(sequences)
    finally:
        assert agent.stop() == 0


def test_down_controller_never_blocks_probing_and_gets_latest_state(
        tmp_path: Path, token_file: Path) -> None:
    """With the controller down the agent keeps detecting; once up it receives the latest
    state, not a backlog."""
    port = free_port()
    agent = reporting_agent(tmp_path, port, token_file).start()
    stub: ControllerStub | None = None
    try:
        agent.control.lose(0)
        agent.wait_finding("gpu_lost", 0)
        agent.control.inject_xid(1, 48)
        agent.wait_finding("xid", 1)
        assert agent.status()["reporting"]["failed"] >= 1
        assert agent.get("/readyz")[0] == 200
        stub = ControllerStub(port)
        agent.wait_for(lambda: stub is not None and stub.reports, timeout=40,
                       what="report after controller came up")
        _, report = stub.reports[0]
        classes = {f["fault_class"] for f in report["findings"]}
        assert classes >= {"gpu_lost", "xid"}
        assert len(stub.reports) <= 2  # the latest state, not every missed change
    finally:
        agent.stop()
        if stub is not None:
            stub.close()
