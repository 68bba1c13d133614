"""The shipped Prometheus alert rules are valid, each is unit-tested both ways, each names
the node it is about, and each points at a runbook that exists in the README."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).parents[2]
RULES = ROOT / "deploy" / "prometheus"
ALERTS: list[dict[str, Any]] = [
    r for g in yaml.safe_load((RULES / "gpu-supervisor.rules.yaml").read_text())["groups"]
    for r in g["rules"] if "alert" in r]
# Alerts about the supervisor as a whole or a model, where no single node is the subject.
CLUSTER_WIDE = {"GPUSupervisorControllerDown", "GPUSupervisorNoLeader",
                "GPUSupervisorControllerSuspect", "GPUSupervisorCircuitBreakerOpen",
                "GPUSupervisorRemediationFailing", "GPUSupervisorPolicyReloadFailing",
                "GPUSupervisorDegraded", "GPUSupervisorModelDown",
                "GPUSupervisorReportsRejected", "GPUSupervisorReportOverreach",
                "GPUSupervisorIssuerKeysUnavailable", "GPUSupervisorControllerBehind",
                "GPUSupervisorWorkloadCrashLoop", "GPUSupervisorDegradeBlocked"}


def test_rules_pass_promtool_check_with_at_least_twelve_alerts() -> None:
    """`promtool check rules` accepts the file; it holds an alert per fault family and per
    way the supervisor can fail (at least 12)."""
    proc = subprocess.run(["promtool", "check", "rules", "gpu-supervisor.rules.yaml"],
                          cwd=RULES, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in proc.stdout
    assert len(ALERTS) >= 12


def test_rule_unit_tests_pass() -> None:
    """`promtool test rules` runs every scenario (fires, stays quiet, labels, text)."""
    proc = subprocess.run(["promtool", "test", "rules", "gpu-supervisor.rules.test.yaml"],
                          cwd=RULES, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_alert_is_tested_firing_and_quiet() -> None:
    """Each alert has a promtool case where it fires and one where it must not."""
    tests = yaml.safe_load((RULES / "gpu-supervisor.rules.test.yaml").read_text())["tests"]
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in tests:
        for check in case.get("alert_rule_test", []):
            (fires if check["exp_alerts"] else quiet).add(check["alertname"])
    names = {a["alert"] for a in ALERTS}
    assert names - fires == set(), "never shown firing"
    assert names - quiet == set(), "never shown quiet"


def test_every_alert_about_a_node_names_it_not_a_pod_ip() -> None:
    """Node-scoped alerts keep the `node` label (the Kubernetes node name) and say it (or
    the group) in their summary; none aggregates by `instance`, which is a pod IP."""
    for alert in ALERTS:
        expr = alert["expr"]
        assert "by (instance" not in expr and ", instance" not in expr, alert["alert"]
        if alert["alert"] not in CLUSTER_WIDE:
            assert re.search(r"by \([^)]*\bnode\b", expr) or expr.startswith("up{"), \
                alert["alert"]
            summary = alert["annotations"]["summary"]
            # Group-wide findings (collectives) are named by group; the node label stays.
            assert "{{ $labels.node }}" in summary or "{{ $labels.group }}" in summary, \
                alert["alert"]


def test_every_alert_has_a_runbook_in_the_readme() -> None:
    """Each alert carries severity, summary, description and a runbook_url whose anchor is
    a heading of the README's runbook section."""
    readme = (ROOT / "README.md").read_text()
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
               for h in re.findall(r"^#+ (.+)$", readme, re.MULTILINE)}
    for alert in ALERTS:
        assert alert["labels"]["severity"] in {"critical", "warning"}
        notes = alert["annotations"]
        assert notes["summary"] and notes["description"]
        page, _, anchor = notes["runbook_url"].partition("#")
        assert page == "README.md"
        assert anchor == alert["alert"].lower()
        assert anchor in anchors, f"README has no heading for {alert['alert']}"
