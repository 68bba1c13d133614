"""``python -m bench NAME [--option value ...]``: run one benchmark, print JSON last."""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
from pathlib import Path


def available() -> list[str]:
    here = Path(__file__).parent
    return sorted(m.name for m in pkgutil.iter_modules([str(here)])
                  if m.name not in ("__main__", "fleet", "netns"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("name", choices=available())
    parser.add_argument("--quick", action="store_true",
                        help="shorter run for smoke-testing the benchmark itself")
    args = parser.parse_args(argv)
    module = importlib.import_module(f"bench.{args.name}")
    figures = module.run(quick=args.quick)
    sys.stdout.flush()
    print(json.dumps(figures, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
