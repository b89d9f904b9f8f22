"""`fusecsi`: the command line. Subcommands: node, controller, all, webhook, fuse."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

import anyio

from csi.client import add_client_parser, run_client
from csi.settings import Settings, SettingsError, load_settings
from strategies.inprocess.options import add_filesystem_arguments, filesystem_options
from strategies.sidecar.receive import add_sidecar_arguments

SERVE_COMMANDS = {
    "node": ("run the CSI node plugin (Identity + Node)", True, False),
    "controller": ("run the CSI controller plugin (Identity + Controller)", False, True),
    "all": ("run node and controller in one process, on one socket", True, True),
}


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML config file (keys: the settings below)")
    for spec in fields(Settings):
        flag = "--" + spec.metadata.get("flag", spec.name.replace("_", "-"))
        help_text = f"{spec.metadata['doc']} [env FUSECSI_{spec.name.upper()}]"
        if spec.metadata.get("multi"):
            parser.add_argument(flag, dest=spec.name, action="append", default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=spec.name, default=None, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusecsi",
        description="A CSI driver for shared FUSE filesystems, with per-volume mount strategies.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (description, _, _) in SERVE_COMMANDS.items():
        sub = commands.add_parser(name, help=description, description=description)
        _add_settings_flags(sub)
    webhook = commands.add_parser(
        "webhook",
        help="run the sidecar strategy's mutating admission webhook (HTTPS)",
        description="Serve POST /mutate (AdmissionReview: inject the sidecars of sidecar "
        "volumes) and GET /healthz over HTTPS; keep the TLS Secret and the webhook "
        "configuration's caBundle current. Uses the settings marked 'sidecar webhook', "
        "driver_name, default_strategy, roots, namespace, pod_name and kubeconfig.",
    )
    _add_settings_flags(webhook)
    fuse = commands.add_parser(
        "fuse",
        help="serve fusecsi's passthrough FUSE filesystem (what inprocess runs per volume)",
        description="Mount SOURCE at MOUNTPOINT through fusecsi's passthrough filesystem, which "
        "enforces a capacity and read-only mode. Runs until SIGTERM; unmounts on exit.",
    )
    add_filesystem_arguments(fuse)
    sidecar = commands.add_parser(
        "sidecar",
        help="serve a sidecar volume with the /dev/fuse fd the node plugin hands over",
        description="Wait on SOCKET for the node plugin's /dev/fuse fd, then serve the volume "
        "through it (what the sidecar strategy injects into app pods; needs no privilege).",
    )
    add_sidecar_arguments(sidecar)
    add_client_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "client":
        return run_client(args)
    if args.command == "sidecar":
        from strategies.sidecar.receive import run_sidecar

        return run_sidecar(args)
    if args.command == "fuse":
        from strategies.inprocess.serve import run_filesystem

        return run_filesystem(filesystem_options(args))
    flags = {spec.name: getattr(args, spec.name) for spec in fields(Settings)}
    try:
        settings = load_settings(config_file=args.config, environ=os.environ, flags=flags)
    except SettingsError as exc:
        print(f"fusecsi: {exc}", file=sys.stderr)
        return 2

    from csi.logging import configure_logging

    configure_logging(settings)
    if args.command == "webhook":
        from csi.webhook import main as run_webhook

        return run_webhook(settings)

    from csi.driver import run_driver

    _, node, controller = SERVE_COMMANDS[args.command]
    anyio.run(lambda: run_driver(settings, node=node, controller=controller), backend="asyncio")
    return 0
