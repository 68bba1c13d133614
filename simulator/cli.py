"""``gpu-supervisor simulate``: run a scenario on a simulated GPU cluster.

Exit codes: 0 every expectation held; 1 an expectation failed, or the simulated cluster
could not be built or started (one line saying what); 2 a bad scenario or flag (naming
the field); 3 the simulator itself went wrong (one line; the traceback in the work
directory's ``simulate-error.log``, which is then kept).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import shutil
import sys
import tempfile
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from simulator.controlplane.cluster import KubeTestClusterError
from simulator.scenario import (
    DEFAULT_SCENARIO,
    ENGINES,
    FAULT_KINDS,
    MODEL_LOAD_SECONDS,
    Scenario,
    load,
    seconds,
    shipped_names,
)
from supervisor.errors import ConfigError, SupervisorError
from supervisor.runtime import logging as logsetup

if TYPE_CHECKING:
    from simulator.run import Outcome

EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_INTERNAL = 3
EPILOG = ("exit codes: 0 every expectation held; 1 one failed, or the cluster could not "
          "start; 2 a bad scenario or flag; 3 the simulator itself went wrong (its "
          "traceback in DIR/simulate-error.log, the work directory then kept).")
ERROR_LOG = "simulate-error.log"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG  # the exit codes are ours to state
    parser.add_argument("--scenario", default=DEFAULT_SCENARIO, metavar="NAME|FILE",
                        help=f"a shipped scenario ({', '.join(shipped_names())}) or a "
                             f"scenario file (default: {DEFAULT_SCENARIO})")
    parser.add_argument("--report", type=Path, metavar="FILE",
                        help="write the JSON report here (every fault's injection, detection, "
                             "action and recovery times; requests to sick replicas)")
    parser.add_argument("--plot", type=Path, metavar="FILE",
                        help="draw the timeline as a PNG here (needs matplotlib: the "
                             "gpu-supervisor[simulate] extra)")
    parser.add_argument("--workdir", type=Path, metavar="DIR",
                        help="keep logs, kubeconfigs and state here (default: a temporary "
                             "directory, removed at the end)")
    parser.add_argument("--torch-python", metavar="PATH",
                        help="an interpreter with torch, for scenarios that run the "
                             "all-reduce checks (default: this one, if it has torch)")
    parser.add_argument("--load-seconds", metavar="DURATION",
                        help="how long a recreated group's engine loads its model, for every "
                             "model (default: each model's load_seconds, "
                             f"{MODEL_LOAD_SECONDS:g} s unless the scenario says); e.g. 5s "
                             "for a quick run")
    parser.add_argument("--engine", choices=ENGINES, metavar="|".join(ENGINES),
                        help="what the first model's groups run: the stand-in engine, or a "
                             "real vLLM (its CPU build, installed once into a cached venv: "
                             "minutes, ~6 GB) split over each group's pods by pipeline "
                             "parallel (default: what the scenario says, else standin)")
    parser.add_argument("--supervisor", choices=("on", "off"), default="on",
                        help="off: the same cluster and faults with none of our daemons — "
                             "today's stack (the upstream LWS + vLLM example's pods; the "
                             "kubelet's container restarts and LWS's group recreation "
                             "played), to compare what happens without us")
    parser.add_argument("--list", action="store_true",
                        help="list the shipped scenarios and fault kinds, then exit")


def main(args: argparse.Namespace) -> int:
    if args.list:
        names = shipped_names()
        width = max(len(name) for name in names)
        for name in names:
            print(f"{name:<{width}}  {load(name).summary}")
        print("\nfault kinds:")
        width = max(len(kind) for kind in FAULT_KINDS)
        for kind, what in FAULT_KINDS.items():
            print(f"  {kind:<{width}} {what}")
        return 0
    try:
        scenario = load(args.scenario)
        if args.engine is not None:
            scenario = scenario.on_engine(args.engine)
        if args.load_seconds is not None:
            scenario = scenario.loading(seconds(args.load_seconds, "--load-seconds"))
        if args.supervisor == "off":
            scenario = scenario.unsupervised()
        torch_python = _torch_python(scenario, args.torch_python)
    except ConfigError as exc:
        print(f"gpu-supervisor simulate: invalid scenario: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("gpu-supervisor simulate: --plot needs matplotlib: pip install -e "
                  "'.[simulate]'", file=sys.stderr)
            return EXIT_CONFIG
    # The daemons log to their own files under the work directory; ours stays quiet.
    logsetup.configure("warning", json=False)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gpu-supervisor-simulate-"))
    workdir.mkdir(parents=True, exist_ok=True)
    keep = args.workdir is not None
    try:
        outcome = asyncio.run(_simulate(scenario, workdir, args.report, args.plot,
                                        torch_python, args.supervisor == "on"))
    except (KubeTestClusterError, SupervisorError, TimeoutError, OSError) as exc:
        print(f"gpu-supervisor simulate: {exc}", file=sys.stderr)
        if args.workdir:
            print(f"gpu-supervisor simulate: logs in {workdir}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_FAILED
    except Exception as exc:  # a bug of ours: one line here, the traceback in the log
        keep = True
        log = workdir / ERROR_LOG
        log.write_text("".join(traceback.format_exception(exc)))
        print(f"gpu-supervisor simulate: internal error: {_one_line(exc)} (traceback in "
              f"{log})", file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0 if outcome.passed else EXIT_FAILED


def _one_line(exc: BaseException) -> str:
    """``KeyError: 'llama-70b-1'``; an exception group as its first exception (and how many
    more)."""
    if isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        more = len(exc.exceptions) - 1
        return _one_line(exc.exceptions[0]) + (f" (and {more} more)" if more else "")
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _torch_python(scenario: Scenario, given: str | None) -> str:
    """The interpreter of the sidecars' all-reduce workers, when the scenario runs them:
    ``--torch-python``, else this one if it can import torch."""
    if not scenario.collective:
        return ""
    if given:
        if shutil.which(given) is None:
            raise ConfigError("--torch-python", f"{given!r} is not an executable")
        return given
    if importlib.util.find_spec("torch") is not None:
        return sys.executable
    raise ConfigError("--torch-python", f"scenario {scenario.name} runs the all-reduce "
                      "checks, which need torch: pip install -e '.[collective]', or name an "
                      "interpreter that has it")


async def _simulate(scenario: Scenario, workdir: Path, report: Path | None,
                    plot: Path | None, torch_python: str, supervised: bool) -> Outcome:
    from simulator.run import simulate

    return await simulate(scenario, workdir, sys.stdout, report, plot, torch_python,
                          supervised)
