"""``python -m bench NAME [--quick]``: run one benchmark, print JSON last.

``python -m bench`` alone runs the end-to-end benchmarks on the simulated cluster (``e2e``
then ``soak``) and writes their figures as a Markdown table and a plot into
``bench-results/`` (``--out DIR`` elsewhere); its last line is every figure as one JSON
object.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
from pathlib import Path
from typing import Any

END_TO_END = ("e2e", "soak")
# figure → (target, what is compared): the end-to-end table's rows.
TARGETS: dict[str, tuple[str, str]] = {
    "xid_fatal": ("≤ 0.25", "XID 79 on a worker's GPU"),
    "engine_crash": ("≤ 1", "the leader's engine exits"),
    "nccl_hang": ("≤ 8", "a worker pod's engine process stopped with requests running"),
    "partition": ("≤ 3", "a worker's links to its group cut both ways"),
}


def available() -> list[str]:
    here = Path(__file__).parent
    return sorted(m.name for m in pkgutil.iter_modules([str(here)])
                  if m.name not in ("__main__", "fleet", "netns"))


def table(figures: dict[str, Any]) -> str:
    """The end-to-end figures as the README shows them."""
    rows = ["| fault | traffic off p50 (s) | p99 (s) | target | today's stack (documented "
            "timer, s) | requests lost (failed or hung), p99 | recovered p50 (s), with the model "
            "load |",
            "|---|---|---|---|---|---|---|"]
    for name, (target, what) in TARGETS.items():
        if f"{name}_traffic_off_s_p99" not in figures:
            continue
        rows.append(f"| {what} (`{name}`) | {figures[f'{name}_traffic_off_s_p50']} | "
                    f"{figures[f'{name}_traffic_off_s_p99']} | {target} | "
                    f"{figures[f'baseline_{name}_traffic_off_s']:g} | "
                    f"{figures[f'{name}_requests_lost_p99']:g} | "
                    f"{figures[f'{name}_recovered_s_p50']} |")
    if "unnecessary_actions" in figures:
        rows.append(f"\nSoak: {figures['minutes']} minutes, {figures['noise_events']} noise "
                    f"events, {figures['heartbeat_loss'] * 100:g} % heartbeat loss: "
                    f"`unnecessary_actions` = {figures['unnecessary_actions']}.")
    return "\n".join(rows) + "\n"


def plot(figures: dict[str, Any], path: Path) -> None:
    """Traffic off p99 next to today's timers, log scale (matplotlib: the test extras)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in TARGETS if f"{n}_traffic_off_s_p99" in figures]
    fig, ax = plt.subplots(figsize=(8, 3.5), dpi=110)
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [figures[f"{n}_traffic_off_s_p99"] for n in names], 0.4,
           label="gpu-supervisor, p99 (measured)")
    ax.bar([x + 0.2 for x in xs], [figures[f"baseline_{n}_traffic_off_s"] for n in names], 0.4,
           label="today's stack (documented timer)", color="#bbbbbb")
    ax.set_xticks(list(xs), names)
    ax.set_yscale("log")
    ax.set_ylabel("fault → traffic off (s)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("name", nargs="?", choices=available(),
                        help="one benchmark; none: the end-to-end ones with a table and plot")
    parser.add_argument("--quick", action="store_true",
                        help="shorter run for smoke-testing the benchmark itself")
    parser.add_argument("--out", type=Path, default=Path("bench-results"),
                        help="where `python -m bench` alone writes its table and plot")
    args = parser.parse_args(argv)
    figures: dict[str, Any] = {}
    for name in [args.name] if args.name else END_TO_END:
        module = importlib.import_module(f"bench.{name}")
        figures |= module.run(quick=args.quick)
    if not args.name:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "end-to-end.md").write_text(table(figures))
        plot(figures, args.out / "end-to-end.png")
        print(f"bench: wrote {args.out / 'end-to-end.md'} and {args.out / 'end-to-end.png'}",
              file=sys.stderr)
    sys.stdout.flush()
    print(json.dumps(figures, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
