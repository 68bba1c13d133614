"""The architecture's import rules hold (import-linter contracts in pyproject.toml)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_import_contracts_are_kept() -> None:
    """Only probes.nvml imports pynvml, only probes.collective imports torch, only
    supervisor.kube the Kubernetes client, and probes/policies never import supervisor."""
    exe = shutil.which("lint-imports")
    assert exe is not None, "import-linter is a test dependency"
    proc = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "4 kept, 0 broken" in proc.stdout
