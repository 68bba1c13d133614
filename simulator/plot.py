"""The run as a picture: a band per fault, each step where it happened, a lane each.

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
           "restarted": "#ff7f0e", "recovered": "#2ca02c",
           "capacity_restored": "#bcbd22", "degraded": "#8c564b",
           "restored": "#17becf", "crash_loop": "#e377c2", "breaker": "#000000"}


def plot(outcome: Outcome, path: Path) -> None:
    """Write the timeline of ``outcome`` to ``path`` (PNG). Raises ImportError without
    matplotlib.

    Each fault has a band of lanes, one per step that followed it (in the order they came),
    so steps a fraction of a second apart never print their labels over each other; the
    legend sits outside the plot, right of it."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    records = [r for r in outcome.records if "injected" in r.times]
    steps_of = [sorted((v, s) for s in STEPS[1:] if (v := r.at(s)) is not None)
                for r in records]
    lanes = [1 + len(steps) for steps in steps_of]  # the injection's lane, then a step's each
    total = sum(lanes) + len(records)  # a blank lane between faults
    fig, ax = plt.subplots(figsize=(11, 1.4 + 0.24 * max(4, total)), dpi=110)
    base = min((r.times["injected"] for r in records), default=0.0)
    seen: set[str] = set()
    end = 1.0
    top = 0
    ticks: list[float] = []
    for record, steps in zip(records, steps_of, strict=True):
        start = record.times["injected"] - base
        last = start + max((after for after, _ in steps), default=0.0)
        end = max(end, last)
        ticks.append(top + len(steps) / 2)
        ax.hlines(top, start, last, color="#bbbbbb", linewidth=2, zorder=1)
        ax.plot([start], [top], marker="v", color="black", markersize=8, zorder=2,
                label="injected" if "injected" not in seen else None)
        seen.add("injected")
        for lane, (after, step) in enumerate(steps, start=1):
            at = start + after
            ax.vlines(at, top, top + lane, color=COLOURS[step], linewidth=0.8, alpha=0.5,
                      zorder=1)
            ax.plot([at], [top + lane], marker="o", markersize=7, color=COLOURS[step],
                    zorder=3, label=step.replace("_", " ") if step not in seen else None)
            seen.add(step)
            ax.annotate(f"{step.replace('_', ' ')} +{after:.2f}s", (at, top + lane),
                        textcoords="offset points", xytext=(7, 0), va="center",
                        fontsize=8)
        top += len(steps) + 2
    ax.set_yticks(ticks, [f"{r.fault.name}\n({r.fault.kind})" for r in records])
    ax.set_ylim(-1, max(1, top - 1))
    ax.invert_yaxis()
    # Room on the right for the last step's label.
    ax.set_xlim(-0.05 * end, end * 1.3)
    ax.set_xlabel("seconds after the first injection; labels: after the fault's own "
                  "injection (seen on the API server)")
    verdict = "passed" if outcome.passed else "FAILED"
    ax.set_title(f"gpu-supervisor simulate: {outcome.scenario.name} ({verdict})")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    fig.savefig(path, format="png", bbox_inches="tight")
    plt.close(fig)
