"""``python -m probes.nvml_standin build`` prints the built library's path.

Why: shell-driven CI (``.ci/run``) needs the path to set ``LD_LIBRARY_PATH``
without embedding Python; ``libdir`` prints its directory directly.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from probes.nvml_standin import StandinBuildError, build


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit status."""
    parser = argparse.ArgumentParser(prog="python -m probes.nvml_standin")
    parser.add_argument(
        "command", choices=("build", "libdir"), help="print the .so path or its directory"
    )
    parser.add_argument("--cache-dir", type=Path, default=None, help="build cache root")
    args = parser.parse_args(argv)
    try:
        lib = build(args.cache_dir)
    except StandinBuildError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(lib if args.command == "build" else lib.parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
