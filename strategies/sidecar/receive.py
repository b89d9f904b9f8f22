"""`fusecsi sidecar`: wait for the node plugin's /dev/fuse fd, then serve the volume through it.

Runs unprivileged in the app pod (a native sidecar injected by the webhook). The node plugin
mounted the target and listens on this volume's socket; this process connects (retrying while
the plugin is not there yet), receives the fd and what to serve, and runs fusecsi's passthrough
filesystem on `/dev/fd/N`. It never mounts anything itself.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from pathlib import Path

from loguru import logger

from strategies.inprocess.options import FilesystemOptions
from strategies.system.fusefd import receive_fd

CONNECT_RETRY = 0.2  # seconds between attempts while the node plugin has not published yet
CONNECT_PATIENCE = 600.0  # then exit and let kubelet restart the sidecar (visible in Events)


def add_sidecar_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", type=Path, required=True, help="the volume's handoff socket")
    parser.add_argument(
        "--source", type=Path, help="directory to serve when the node plugin does not say"
    )


def receive(socket_path: Path, patience: float = CONNECT_PATIENCE) -> tuple[int, dict[str, object]]:
    deadline = time.monotonic() + patience
    while True:
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            connection.connect(str(socket_path))
            return receive_fd(connection)
        except (FileNotFoundError, ConnectionRefusedError, ConnectionResetError) as exc:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no node plugin answered on {socket_path}: {exc}") from exc
            time.sleep(CONNECT_RETRY)
        finally:
            connection.close()


def run_sidecar(args: argparse.Namespace) -> int:
    from strategies.inprocess.serve import run_filesystem

    logger.remove()
    logger.add(sys.stderr, level="INFO")
    logger.info("waiting for the FUSE fd on {}", args.socket)
    try:
        fd, message = receive(args.socket)
    except (TimeoutError, OSError, ValueError) as exc:
        logger.error("{}", exc)
        return 1
    source = Path(str(message.get("source") or args.source or ""))
    if not str(source):
        logger.error("the node plugin named no source directory and --source is not given")
        return 1
    capacity_file = message.get("capacityFile")
    options = FilesystemOptions(
        source=source,
        mountpoint=Path(f"/dev/fd/{fd}"),
        capacity_bytes=int(str(message.get("capacityBytes") or 0)),
        capacity_file=Path(str(capacity_file)) if capacity_file else None,
        read_only=bool(message.get("readOnly")),
        fsname=str(message.get("fsname") or "fusecsi"),
        read_ahead_kb=0,  # setting readahead needs root; the mount is the node plugin's
    )
    logger.info("serving {} on fd {}", source, fd)
    return run_filesystem(options)
