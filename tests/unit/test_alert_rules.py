"""The shipped Prometheus alert rules are valid and behave as their unit tests say."""

from __future__ import annotations

import subprocess
from pathlib import Path

RULES = Path(__file__).parents[2] / "deploy" / "prometheus"


def test_rules_pass_promtool_check() -> None:
    """`promtool check rules` accepts the rule file."""
    proc = subprocess.run(["promtool", "check", "rules", "gpu-supervisor.rules.yaml"],
                          cwd=RULES, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 6 rules found" in proc.stdout


def test_rule_unit_tests_pass() -> None:
    """`promtool test rules` runs the alert scenarios (fire, don't fire, labels, text)."""
    proc = subprocess.run(["promtool", "test", "rules", "gpu-supervisor.rules.test.yaml"],
                          cwd=RULES, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
