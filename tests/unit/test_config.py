"""Settings: defaults, file and environment layering, and errors that name the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.config import Settings, load, reference
from supervisor.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


class TestLoad:
    def test_defaults_are_valid(self) -> None:
        """With no file and no environment, the defaults load and validate."""
        settings = load(None, {})
        assert settings.nvml.probe_interval_seconds == 1.0
        assert settings.node_name  # falls back to the hostname

    def test_file_overrides_defaults(self, tmp_path: Path) -> None:
        """A value in the file replaces the default; others stay."""
        settings = load(write(tmp_path, "nvml:\n  probe_interval_seconds: 2.5\n"), {})
        assert settings.nvml.probe_interval_seconds == 2.5
        assert settings.nvml.call_timeout_seconds == 5.0

    def test_environment_overrides_file(self, tmp_path: Path) -> None:
        """GPUSUP_SECTION__FIELD beats the file; NODE_NAME sets node_name; lists split on commas."""
        path = write(tmp_path, "nvml:\n  probe_interval_seconds: 2.5\n")
        settings = load(path, {"GPUSUP_NVML__PROBE_INTERVAL_SECONDS": "0.5",
                               "NODE_NAME": "gpu-node-7",
                               "GPUSUP_DETECTORS__THROTTLE_REASONS": "hw_slowdown, sw_thermal"})
        assert settings.nvml.probe_interval_seconds == 0.5
        assert settings.node_name == "gpu-node-7"
        assert settings.detectors.throttle_reasons == ["hw_slowdown", "sw_thermal"]

    @pytest.mark.parametrize(
        ("text", "field", "rule"),
        [
            ("nvml:\n  probe_interval_seconds: -1\n", "nvml.probe_interval_seconds",
             "greater than 0"),
            ("nvml:\n  probe_interval_seconds: soon\n", "nvml.probe_interval_seconds",
             "must be a number"),
            ("nvml:\n  probe_intervall: 1\n", "nvml.probe_intervall", "unknown setting"),
            ("detectors:\n  throttle_reasons: [hw_slowdown, too_hot]\n",
             "detectors.throttle_reasons[1]", "must be one of"),
            ("http:\n  listen: 8080\n", "http.listen", "must be a string"),
            ("http:\n  listen: nowhere\n", "http.listen", "host:port"),
            ("kubernetes:\n  enabled: maybe\n", "kubernetes.enabled", "must be one of"),
            ("reporting:\n  controller_url: ftp://x\n", "reporting.controller_url",
             "http(s) URL"),
            ("reporting:\n  controller_addresses: [127.0.0.2, controller-0]\n",
             "reporting.controller_addresses[1]", "IP address"),
            ("nvml: 3\n", "nvml", "mapping"),
            ("- a\n- b\n", "<root>", "mapping"),
            ("nvml: [\n", "--config", "not valid YAML"),
        ],
    )
    def test_bad_value_names_field_and_rule(self, tmp_path: Path, text: str, field: str,
                                            rule: str) -> None:
        """Every invalid setting raises ConfigError naming the dotted field and the rule."""
        with pytest.raises(ConfigError) as info:
            load(write(tmp_path, text), {})
        assert info.value.field == field
        assert rule in info.value.rule

    def test_bad_environment_value_names_variable(self) -> None:
        """A bad override names the setting and the variable it came from."""
        with pytest.raises(ConfigError) as info:
            load(None, {"GPUSUP_NVML__CALL_TIMEOUT_SECONDS": "0"})
        assert "nvml.call_timeout_seconds" in str(info.value)
        assert "GPUSUP_NVML__CALL_TIMEOUT_SECONDS" in str(info.value)

    def test_unknown_environment_setting_is_rejected(self) -> None:
        """A typo in an override variable is an error, not silently ignored."""
        with pytest.raises(ConfigError, match="names no setting"):
            load(None, {"GPUSUP_NVML__PROBE_INTERVAL": "1"})

    def test_every_setting_is_documented(self) -> None:
        """The reference lists every leaf setting with a non-empty explanation."""
        rows = reference()
        assert len(rows) >= 30
        assert all(doc for _, _, _, doc in rows)
        assert {name for name, *_ in rows} >= {"nvml.probe_interval_seconds", "http.listen",
                                                "reporting.heartbeat_seconds"}
        assert Settings().reporting.heartbeat_seconds == 10.0


class TestCommandLine:
    def test_bad_config_file_exits_2_naming_the_field(self, tmp_path: Path) -> None:
        """`gpu-supervisor agent --config bad.yaml` exits 2 before starting anything."""
        path = write(tmp_path, "nvml:\n  call_timeout_seconds: 120\n")
        proc = subprocess.run(
            [sys.executable, "-m", "supervisor", "agent", "--config", str(path),
             "--simulate-gpus", "1"],
            capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 2
        assert "nvml.call_timeout_seconds" in proc.stderr
        assert "at most 60" in proc.stderr

    def test_readme_documents_every_setting(self) -> None:
        """README's configuration table is the generated reference, so it cannot drift."""
        readme = (Path(__file__).parents[2] / "README.md").read_text()
        for name, default, _unit, _doc in reference():
            assert f"| `{name}` | `{default}` |" in readme, name
