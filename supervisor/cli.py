"""``gpu-supervisor``: one command, one role per sub-command.

Exit codes: 0 clean stop, 1 runtime failure, 2 bad usage or configuration (reported
before anything starts, naming the field and the rule broken).
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpu-supervisor", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)

    agent = sub.add_parser("agent", help="per-node GPU health agent (DaemonSet)")
    agent.add_argument("--config", type=Path, help="YAML settings file")
    agent.add_argument("--listen", help="override http.listen (host:port, port 0 = any)")
    agent.add_argument("--node-name", help="override node_name")
    agent.add_argument("--simulate-gpus", type=int, metavar="N",
                       help="run on the NVML stand-in with N healthy GPUs (no driver needed)")
    agent.add_argument("--simulate-dir", metavar="DIR",
                       help="stand-in state directory (default: a new temporary directory)")
    agent.add_argument("--log-format", choices=("json", "console"), default="json")

    controller = sub.add_parser("controller", help="cluster controller (Deployment, 2+ replicas)")
    controller.add_argument("--config", type=Path, help="YAML settings file")
    controller.add_argument("--listen", help="override http.listen (host:port, port 0 = any)")
    controller.add_argument("--kubeconfig", help="override kubernetes.kubeconfig")
    controller.add_argument("--identity", help="override controller.identity")
    controller.add_argument("--policy", help="override controller.policy_file")
    controller.add_argument("--log-format", choices=("json", "console"), default="json")

    sidecar = sub.add_parser("sidecar", help="per-pod engine and group watcher (a native "
                             "sidecar container in each inference pod)")
    sidecar.add_argument("--config", type=Path, help="YAML settings file")
    sidecar.add_argument("--listen", help="override http.listen (host:port, port 0 = any)")
    sidecar.add_argument("--log-format", choices=("json", "console"), default="json")

    sub.add_parser("config-reference", help="print every setting with default, unit and doc")
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
    c = settings.controller
    if c.tls_cert_file:
        from supervisor.tls import ServerCertificate

        ServerCertificate(c.tls_cert_file, c.tls_key_file)


def _check_sidecar(settings: Settings) -> None:
    """The sidecar must know its pod and group before it starts (exit 2 otherwise)."""
    from supervisor.sidecar.identity import identify

    identify(settings)
    _check_agent(settings)


def _check_agent(settings: Settings) -> None:
    url = settings.reporting.controller_url
    if url.startswith("https://"):
        from supervisor.tls import client_context

        client_context(settings.reporting.ca_file)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "config-reference":
        print("| setting | default | unit | meaning |\n|---|---|---|---|")
        for name, default, unit, doc in reference():
            print(f"| `{name}` | `{default}` | {unit} | {doc} |")
        return 0

    overrides = dict(os.environ)
    if args.listen:
        overrides["GPUSUP_HTTP__LISTEN"] = args.listen
    for flag, env in (("node_name", "NODE_NAME"), ("kubeconfig", "GPUSUP_KUBERNETES__KUBECONFIG"),
                      ("identity", "GPUSUP_CONTROLLER__IDENTITY"),
                      ("policy", "GPUSUP_CONTROLLER__POLICY_FILE")):
        if getattr(args, flag, None):
            overrides[env] = getattr(args, flag)
    try:
        settings = load(args.config, overrides)
        if args.command == "controller":
            _check_controller(settings)
        elif args.command == "sidecar":
            _check_sidecar(settings)
        else:
            _check_agent(settings)
            if args.simulate_gpus is not None and not 0 <= args.simulate_gpus <= 64:
                raise ConfigError("--simulate-gpus", "must be between 0 and 64")
    except ConfigError as exc:
        print(f"gpu-supervisor: invalid configuration: {exc}", file=sys.stderr)
        return EXIT_CONFIG
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
