"""What a new user meets first, through the real command in a real subprocess: mistakes get
one line naming the problem and a documented exit code (never a traceback), anyone who can
reach a port cannot fill the logs, and the console output reads well."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

from probes.nvml_standin.control import StandinControl
from simulator.processes import AgentProcess

ROOT = Path(__file__).resolve().parents[2]
EXIT_RUNTIME, EXIT_CONFIG = 1, 2


def gpu_supervisor(*args: str, env: dict[str, str] | None = None, timeout: float = 60,
                   cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "supervisor", *args], capture_output=True,
                          text=True, timeout=timeout, check=False, cwd=cwd or ROOT,
                          env={**os.environ, **(env or {})})


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def fatal(proc: subprocess.CompletedProcess[str]) -> dict[str, object]:
    """The one error line of a run that failed: JSON, event "fatal", no traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [json.loads(line) for line in lines(proc.stderr)
              if json.loads(line).get("level") == "error"]
    assert len(errors) == 1, proc.stderr
    assert errors[0]["event"] == "fatal"
    return errors[0]


class TestStartupMistakes:
    def test_a_port_already_in_use_is_one_line_and_exit_1(self) -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            proc = gpu_supervisor("agent", "--simulate-gpus", "1", "--listen",
                                  f"127.0.0.1:{port}")
        assert proc.returncode == EXIT_RUNTIME
        error = fatal(proc)
        assert error["error"] == (f"cannot listen on 127.0.0.1:{port} (http.listen): "
                                  "Address already in use")

    def test_an_address_that_is_not_one_is_one_line_and_exit_1(self) -> None:
        proc = gpu_supervisor("agent", "--simulate-gpus", "1", "--listen", "999.1.1.1:80")
        assert proc.returncode == EXIT_RUNTIME
        assert "cannot listen on 999.1.1.1:80 (http.listen)" in str(fatal(proc)["error"])

    def test_a_listen_value_without_a_port_is_a_config_error(self) -> None:
        proc = gpu_supervisor("agent", "--listen", "localhost")
        assert proc.returncode == EXIT_CONFIG
        assert lines(proc.stderr) == [
            "gpu-supervisor: invalid configuration: http.listen: must be host:port, got "
            "'localhost'"]

    def test_a_kubeconfig_that_is_not_yaml_is_a_config_error_naming_line_and_column(
            self, tmp_path: Path) -> None:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text("apiVersion: v1\nclusters: [\n")
        proc = gpu_supervisor("controller", "--kubeconfig", str(kubeconfig),
                              env={"GPUSUP_CONTROLLER__TLS_CERT_FILE": "",
                                   "GPUSUP_CONTROLLER__TLS_KEY_FILE": ""})
        assert proc.returncode == EXIT_CONFIG
        (line,) = lines(proc.stderr)
        assert line.startswith("gpu-supervisor: invalid configuration: kubernetes.kubeconfig: "
                               f"cannot read kubeconfig {kubeconfig}: not valid YAML: ")
        assert re.search(r"at line \d+, column \d+$", line)
        assert "Mark" not in line and "object at 0x" not in line

    def test_simulating_no_gpus_is_refused(self) -> None:
        proc = gpu_supervisor("agent", "--simulate-gpus", "0")
        assert proc.returncode == EXIT_CONFIG
        assert "--simulate-gpus: must be between 1 and 64, got 0" in proc.stderr


class TestCheckConfig:
    def test_valid_settings_and_policy_pass_without_starting_anything(
            self, tmp_path: Path) -> None:
        config = tmp_path / "controller.yaml"
        config.write_text("controller:\n  tls_cert_file: ''\n  tls_key_file: ''\n")
        proc = gpu_supervisor("check-config", "controller", "--config", str(config),
                              "--policy", str(ROOT / "policies" / "default.yaml"), timeout=30)
        assert proc.returncode == 0, proc.stderr
        assert "controller configuration is valid" in proc.stdout
        assert "policies/default.yaml" in proc.stdout

    def test_a_bad_setting_or_policy_exits_2_naming_the_field(self, tmp_path: Path) -> None:
        config = tmp_path / "agent.yaml"
        config.write_text("nvml:\n  probe_interval_seconds: -1\n")
        proc = gpu_supervisor("check-config", "agent", "--config", str(config))
        assert proc.returncode == EXIT_CONFIG
        assert "nvml.probe_interval_seconds: must be greater than 0" in proc.stderr
        policy = tmp_path / "policy.yaml"
        policy.write_text("rules:\n  - name: x\n    when: {fault_classes: [gpu_lost]}\n"
                          "    then: [{action: reboot}]\n")
        proc = gpu_supervisor("check-config", "controller", "--policy", str(policy),
                              env={"GPUSUP_CONTROLLER__TLS_CERT_FILE": "",
                                   "GPUSUP_CONTROLLER__TLS_KEY_FILE": ""})
        assert proc.returncode == EXIT_CONFIG
        assert f"controller.policy_file ({policy}) rules[0].then[0].action" in proc.stderr


class TestHelp:
    def test_help_is_plain_text_with_the_exit_codes_and_every_flag_explained(self) -> None:
        for args in ([], ["agent"], ["controller"], ["sidecar"]):
            proc = gpu_supervisor(*args, "--help")
            assert proc.returncode == 0
            assert "``" not in proc.stdout
            assert "exit codes: 0 clean stop; 1 a failure while running" in \
                " ".join(proc.stdout.split())
        agent = " ".join(gpu_supervisor("agent", "--help").stdout.split())
        for flag in ("--log-format", "--log-level", "--simulate-dir"):
            assert re.search(re.escape(flag) + r"[^-]+\w", agent), flag
        assert "json: one object per line" in agent


class TestLogs:
    def test_malformed_requests_log_one_warning_per_kind_and_no_traceback(
            self, tmp_path: Path) -> None:
        """Fifty unparseable requests: one warning line saying why (and later, how many
        were held back), no traceback, and the daemon still answers."""
        agent = AgentProcess(tmp_path, gpus=1).start()
        try:
            host, port = agent.url.removeprefix("http://").rsplit(":", 1)
            for _ in range(50):
                with socket.create_connection((host, int(port)), timeout=5) as conn:
                    conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n")
                    assert conn.recv(64).startswith(b"HTTP/1.0 400")
            assert agent.status()["gpus"]
        finally:
            agent.stop()
        log = agent.log_path.read_text()
        assert "Traceback" not in log
        refused = [json.loads(line) for line in log.splitlines()
                   if "malformed HTTP request" in line]
        assert len(refused) == 1
        assert refused[0]["level"] == "warning"
        assert refused[0]["kind"] == "BadHttpMessage"
        assert "Content-Length" in refused[0]["reason"]

    def test_console_logs_have_no_colour_codes_when_redirected_and_obey_the_level(
            self, tmp_path: Path) -> None:
        proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor", "agent", "--simulate-gpus", "1", "--listen",
             "127.0.0.1:0", "--log-format", "console", "--log-level", "warning"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        time.sleep(3)
        proc.terminate()
        _, err = proc.communicate(timeout=30)
        assert "\x1b[" not in err
        assert "agent started" not in err  # info, below the level asked for
        proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor", "agent", "--simulate-gpus", "1", "--listen",
             "127.0.0.1:0", "--log-format", "console"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        time.sleep(3)
        proc.terminate()
        _, err = proc.communicate(timeout=30)
        assert "agent started" in err and "\x1b[" not in err

    def test_an_xid_storm_is_a_few_log_lines_and_a_critical_finding_is_an_error(
            self, tmp_path: Path) -> None:
        """10,000 XID 79 events on one GPU: one finding, its raise logged at error, and the
        "xid" lines coalesced to a handful (the first at once, the rest per window)."""
        agent = AgentProcess(tmp_path, gpus=2).start()
        try:
            for _ in range(100):
                agent.control.inject_xid(1, 79, count=100)
            agent.wait_finding("xid", 1)
            time.sleep(1)
        finally:
            agent.stop()
        records = [json.loads(line) for line in agent.log_path.read_text().splitlines()
                   if line.startswith("{")]
        xid_lines = [r for r in records if r["event"] == "xid"]
        assert 1 <= len(xid_lines) <= 3, xid_lines
        assert sum(int(r["count"]) for r in xid_lines) == 10_000
        (raised,) = [r for r in records if r["event"] == "finding raised"
                     and r["fault_class"] == "xid"]
        assert raised["level"] == "error" and raised["severity"] == "critical"


class TestSimulation:
    def test_a_temporary_stand_in_directory_is_removed_on_exit(self, tmp_path: Path) -> None:
        proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor", "agent", "--simulate-gpus", "1", "--listen",
             "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=ROOT)
        time.sleep(3)
        proc.terminate()
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0
        (started,) = [json.loads(line) for line in err.splitlines()
                      if "simulating GPUs" in line]
        assert started["state_dir"] and not Path(str(started["state_dir"])).exists()

    def test_a_reused_directory_keeps_its_faults_and_says_so(self, tmp_path: Path) -> None:
        state = tmp_path / "sim"
        control = StandinControl(state)
        control.reset(2)
        control.set(1, temp=91)
        proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor", "agent", "--simulate-gpus", "2",
             "--simulate-dir", str(state), "--listen", "127.0.0.1:0"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        time.sleep(3)
        proc.terminate()
        _, err = proc.communicate(timeout=30)
        (kept,) = [json.loads(line) for line in err.splitlines()
                   if "kept from an earlier run" in line]
        assert kept["level"] == "warning" and kept["kept"] == {"gpu.1.temp": "91"}
        assert state.exists()  # the user's directory is theirs to remove



def test_config_reference_into_a_reader_that_stops_early_is_not_an_error() -> None:
    """``gpu-supervisor config-reference | head -1``: the reader closes the pipe before the
    table is written; the command exits 0 without a BrokenPipeError traceback."""
    read, write = os.pipe()
    os.close(read)  # a reader that is already gone
    try:
        proc = subprocess.run([sys.executable, "-m", "supervisor", "config-reference"],
                              stdout=write, stderr=subprocess.PIPE, text=True, timeout=60,
                              check=False, cwd=ROOT)
    finally:
        os.close(write)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
