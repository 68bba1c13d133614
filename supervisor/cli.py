"""``gpu-supervisor``: one command, one role per sub-command.

Exit codes (also in ``--help`` and the README): 0 clean stop, 1 a failure while running
(one log line saying what, e.g. a port already in use), 2 bad usage or configuration
(reported before anything starts, naming the field and the rule broken).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import structlog

from supervisor import __version__
from supervisor.config import Settings, load, reference
from supervisor.errors import ConfigError, SupervisorError
from supervisor.runtime import logging as logsetup

EXIT_CONFIG = 2


DESCRIPTION = """\
GPU health and fault-tolerance supervisor for models served across GPU nodes on
Kubernetes. One command, one role per sub-command: agent (per node), sidecar (per
inference pod), controller (per cluster)."""

EPILOG = """\
settings: a YAML file (--config), GPUSUP_SECTION__KEY environment variables, then flags;
`gpu-supervisor config-reference` lists every setting.
exit codes: 0 clean stop; 1 a failure while running (one log line saying what, e.g. a
port already in use); 2 bad usage or configuration (naming the field, before anything
starts)."""


def _role_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML settings file")
    parser.add_argument("--listen", help="override http.listen (host:port, port 0 = any)")
    parser.add_argument("--log-format", choices=("json", "console"), default="json",
                        help="json: one object per line, for log pipelines (default); "
                             "console: for people (coloured on a terminal)")
    parser.add_argument("--log-level", choices=logsetup.LEVELS,
                        help="override log_level (default info)")


def _parser(with_simulate: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpu-supervisor", description=DESCRIPTION,
                                     epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)

    def role(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        _role_flags(p)
        return p

    agent = role("agent", "per-node GPU health agent (DaemonSet)")
    agent.add_argument("--node-name", help="override node_name")
    agent.add_argument("--simulate-gpus", type=int, metavar="N",
                       help="run on the NVML stand-in with N healthy GPUs (1-64; no driver "
                            "needed)")
    agent.add_argument("--simulate-dir", metavar="DIR",
                       help="stand-in state directory, kept with its faults across runs "
                            "(default: a temporary directory, removed on exit)")

    controller = role("controller", "cluster controller (Deployment, 2+ replicas)")
    controller.add_argument("--kubeconfig", help="override kubernetes.kubeconfig (from a "
                            "laptop; in a pod the ServiceAccount is used)")
    controller.add_argument("--identity", help="override controller.identity")
    controller.add_argument("--policy", help="override controller.policy_file")

    role("sidecar", "per-pod engine and group watcher (a native sidecar container in each "
                    "inference pod)")

    check = sub.add_parser(
        "check-config", help="validate a role's settings (and the controller's policy and "
        "topology) as the daemon would, without starting it; exit 2 naming the field",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    check.add_argument("role", choices=("agent", "controller", "sidecar"))
    check.add_argument("--config", type=Path, help="YAML settings file")
    check.add_argument("--policy", help="override controller.policy_file")

    sub.add_parser("config-reference", help="print every setting with default, unit and doc")

    simulate = sub.add_parser(
        "simulate", help="the whole supervisor against a simulated GPU cluster on a real "
        "control plane: inject faults, watch them handled (runs from a clone; needs Go)",
        epilog="exit codes: 0 every expectation held; 1 one failed, or the cluster could not "
        "start; 2 a bad scenario or flag.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    if with_simulate:  # the simulator stays out of the daemons' processes
        from simulator import cli as simulator_cli

        simulator_cli.add_arguments(simulate)
    return parser


def _check_controller(settings: Settings) -> None:
    """Policy and topology files are part of the configuration: validate them up front."""
    from policies.schema import PolicyError, load_policy_file
    from supervisor.controller.topology import load_topology

    path = settings.controller.policy_file
    if path:
        try:
            load_policy_file(Path(path))
        except PolicyError as exc:
            raise ConfigError(f"controller.policy_file ({path}) {exc.field}", exc.rule) from exc
        except OSError as exc:
            raise ConfigError("controller.policy_file", f"cannot read {path}: {exc}") from exc
    load_topology(settings.controller.topology_file)
    _check_kubeconfig(settings)
    c = settings.controller
    if c.tls_cert_file:
        from supervisor.tls import ServerCertificate

        ServerCertificate(c.tls_cert_file, c.tls_key_file)


def _check_sidecar(settings: Settings) -> None:
    """The sidecar must know its pod and group before it starts (exit 2 otherwise)."""
    from supervisor.sidecar.identity import identify

    identify(settings)
    _check_agent(settings)


def _check_kubeconfig(settings: Settings) -> None:
    """A kubeconfig that cannot be read is a configuration error (exit 2), not a failure
    found once the daemon runs."""
    if not settings.kubernetes.kubeconfig:
        return
    from supervisor.errors import KubePermanentError
    from supervisor.kube import check_kubeconfig

    try:
        check_kubeconfig(settings.kubernetes.kubeconfig)
    except KubePermanentError as exc:
        raise ConfigError("kubernetes.kubeconfig", str(exc)) from exc


def _check_agent(settings: Settings) -> None:
    _check_kubeconfig(settings)
    url = settings.reporting.controller_url
    if url.startswith("https://"):
        from supervisor.tls import client_context

        client_context(settings.reporting.ca_file)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser(with_simulate=argv[:1] == ["simulate"]).parse_args(argv)
    if args.command == "config-reference":
        lines = ["| setting | default | unit | meaning |", "|---|---|---|---|"]
        lines += [f"| `{name}` | `{default}` | {unit} | {doc} |"
                  for name, default, unit, doc in reference()]
        try:
            print("\n".join(lines), flush=True)
        except BrokenPipeError:
            # The reader stopped early (| head): not an error. Point stdout at /dev/null
            # so that the interpreter's final flush does not fail again on exit.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0

    if args.command == "simulate":
        from simulator import cli as simulator_cli

        return simulator_cli.main(args)

    overrides = dict(os.environ)
    if getattr(args, "listen", None):
        overrides["GPUSUP_HTTP__LISTEN"] = args.listen
    if getattr(args, "log_level", None):
        overrides["GPUSUP_LOG_LEVEL"] = args.log_level
    for flag, env in (("node_name", "NODE_NAME"), ("kubeconfig", "GPUSUP_KUBERNETES__KUBECONFIG"),
                      ("identity", "GPUSUP_CONTROLLER__IDENTITY"),
                      ("policy", "GPUSUP_CONTROLLER__POLICY_FILE")):
        if getattr(args, flag, None):
            overrides[env] = getattr(args, flag)
    role = args.role if args.command == "check-config" else args.command
    try:
        settings = load(args.config, overrides)
        if role == "controller":
            _check_controller(settings)
        elif role == "sidecar":
            _check_sidecar(settings)
        else:
            _check_agent(settings)
            simulate = getattr(args, "simulate_gpus", None)
            if simulate is not None and not 1 <= simulate <= 64:
                raise ConfigError("--simulate-gpus", f"must be between 1 and 64, got {simulate}")
    except ConfigError as exc:
        print(f"gpu-supervisor: invalid configuration: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check-config":
        checked = [str(args.config) if args.config else "defaults and environment"]
        if role == "controller" and settings.controller.policy_file:
            checked.append(f"policy {settings.controller.policy_file}")
        if role == "controller" and settings.controller.topology_file:
            checked.append(f"topology {settings.controller.topology_file}")
        print(f"gpu-supervisor: {role} configuration is valid ({', '.join(checked)})")
        return 0
    logsetup.configure(settings.log_level, json=args.log_format == "json")
    log = structlog.get_logger("supervisor.cli")

    try:
        # Each role's modules are imported only now: NVML, aiohttp and the rest stay out of
        # config validation and out of the other roles' processes.
        if args.command == "controller":
            from supervisor.controller import run as controller

            return controller.run(settings)
        if args.command == "sidecar":
            from supervisor.sidecar import run as sidecar

            return sidecar.run(settings)
        from supervisor.agent import run as agent

        return agent.run(settings, simulate_gpus=args.simulate_gpus,
                         simulate_dir=args.simulate_dir)
    except SupervisorError as exc:
        log.error("fatal", error=str(exc), error_type=type(exc).__name__)
        return 1
    except KeyboardInterrupt:
        return 0
