"""The run as a picture: one row per fault, each step where it happened.

matplotlib draws it (the ``simulate`` extra: ``pip install -e '.[simulate]'``); a PNG any
viewer opens, kept beside the JSON report.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from simulator.timeline import STEPS

if TYPE_CHECKING:
    from simulator.run import Outcome

COLOURS = {"detected": "#1f77b4", "traffic_off": "#d62728", "quarantined": "#9467bd",
           "restarted": "#ff7f0e", "recovered": "#2ca02c", "degraded": "#8c564b",
           "restored": "#17becf", "crash_loop": "#e377c2", "breaker": "#000000"}


def plot(outcome: Outcome, path: Path) -> None:
    """Write the timeline of ``outcome`` to ``path`` (PNG). Raises ImportError without
    matplotlib."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    records = [r for r in outcome.records if "injected" in r.times]
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.7 * max(1, len(records))), dpi=110)
    base = min((r.times["injected"] for r in records), default=0.0)
    seen: set[str] = set()
    end = 1.0
    for row, record in enumerate(records):
        start = record.times["injected"] - base
        times = {s: (start + v, v) for s in STEPS[1:] if (v := record.at(s)) is not None}
        last = max((at for at, _ in times.values()), default=start)
        end = max(end, last)
        ax.hlines(row, start, last, color="#bbbbbb", linewidth=2, zorder=1)
        ax.plot([start], [row], marker="v", color="black", markersize=9, zorder=2,
                label="injected" if "injected" not in seen else None)
        seen.add("injected")
        for i, (step, (at, after)) in enumerate(times.items()):
            ax.plot([at], [row], marker="o", markersize=9, color=COLOURS[step], zorder=3,
                    label=step.replace("_", " ") if step not in seen else None)
            seen.add(step)
            # Labels alternate above and below: steps a fraction of a second apart.
            ax.annotate(f"+{after:.1f}s", (at, row), textcoords="offset points",
                        xytext=(0, 9 if i % 2 == 0 else -16), ha="center", fontsize=8)
    ax.set_yticks(range(len(records)),
                  [f"{r.fault.name}\n({r.fault.kind})" for r in records])
    ax.set_ylim(-0.8, max(0, len(records) - 1) + 0.8)
    ax.invert_yaxis()
    ax.set_xlim(-0.05 * end, end * 1.1)
    ax.set_xlabel("seconds after the first injection; labels: after the fault's own "
                  "injection (seen on the API server)")
    verdict = "passed" if outcome.passed else "FAILED"
    ax.set_title(f"gpu-supervisor simulate: {outcome.scenario.name} ({verdict})")
    ax.legend(loc="lower right", fontsize=8, ncol=3)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
