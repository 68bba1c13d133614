#!/usr/bin/env python3
"""Keep the chart and the plain manifests in step with their sources.

The Helm chart (deploy/chart/gpu-supervisor) is the one description of a deployment. Three
files it ships are written elsewhere and copied into its files/ (Helm reads nothing
outside the chart directory):

    policies/default.yaml                      -> files/policy.yaml
    deploy/prometheus/gpu-supervisor.rules.yaml -> files/gpu-supervisor.rules.yaml
    deploy/grafana/gpu-supervisor.json          -> files/dashboard.json

and deploy/manifests/gpu-supervisor.yaml is the chart rendered with
deploy/manifests/values.yaml, for users without Helm (`kubectl apply -f` it: Helm orders
the objects so the namespace and RBAC come before what uses them).

    python deploy/render.py           # write them
    python deploy/render.py --check   # exit 1 naming what is out of date (CI runs this)

helm: $HELM, else scripts/build-helm.sh (builds it from its Go module once, then cached).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "deploy" / "chart" / "gpu-supervisor"
COPIES = {
    ROOT / "policies" / "default.yaml": CHART / "files" / "policy.yaml",
    ROOT / "deploy" / "prometheus" / "gpu-supervisor.rules.yaml":
        CHART / "files" / "gpu-supervisor.rules.yaml",
    ROOT / "deploy" / "grafana" / "gpu-supervisor.json": CHART / "files" / "dashboard.json",
}
MANIFESTS = ROOT / "deploy" / "manifests"
PLAIN_VALUES = MANIFESTS / "values.yaml"
PLAIN_OUT = MANIFESTS / "gpu-supervisor.yaml"
HEADER = """\
# gpu-supervisor for `kubectl apply -f deploy/manifests/gpu-supervisor.yaml`: the Helm chart
# deploy/chart/gpu-supervisor rendered with deploy/manifests/values.yaml by
# `python deploy/render.py`. Do not edit: change the chart or the values and re-render.
#
# Before applying, make the report path's TLS Secret and CA ConfigMap
# (deploy/tls/make-report-cert.sh prints the two kubectl commands).
"""


def helm_binary() -> str:
    given = os.environ.get("HELM")
    if given:
        return given
    out = subprocess.run(["bash", str(ROOT / "scripts" / "build-helm.sh")], check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    return out.strip().splitlines()[-1]


def render_plain(helm: str) -> str:
    proc = subprocess.run(
        [helm, "template", "gpu-supervisor", str(CHART), "--namespace", "gpu-supervisor",
         "--values", str(PLAIN_VALUES)],
        check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"helm template failed: {proc.stderr.strip()}")
    # Helm's "# Source:" comments name chart paths, useful to read; the chart label carries
    # the chart version already.
    return HEADER + proc.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if a copy or the manifests are stale")
    args = parser.parse_args()
    wanted: dict[Path, str] = {dst: src.read_text() for src, dst in COPIES.items()
                               if src.exists()}
    stale = [dst for dst, text in wanted.items()
             if not dst.exists() or dst.read_text() != text]
    if not args.check:
        for dst in stale:
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_text(wanted[dst])
    plain = render_plain(helm_binary())
    if not PLAIN_OUT.exists() or PLAIN_OUT.read_text() != plain:
        stale.append(PLAIN_OUT)
        if not args.check:
            PLAIN_OUT.write_text(plain)
    for path in stale:
        verb = "stale" if args.check else "wrote"
        print(f"{verb}: {path.relative_to(ROOT)}")
    if args.check and stale:
        print("run: python deploy/render.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
