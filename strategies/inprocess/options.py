"""The options of fusecsi's passthrough filesystem, and the one command line that sets them.

Kept apart from `serve` (which imports pyfuse3) so that the CLI can describe `fusecsi fuse`
without loading FUSE bindings into every process.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

_FD_MOUNTPOINT_PREFIX = "/dev/fd/"


@dataclass(frozen=True)
class FilesystemOptions:
    """How to serve one passthrough mount."""

    source: Path
    """Backing directory that is mirrored."""
    mountpoint: Path
    """Where to mount, or ``/dev/fd/N`` for a /dev/fuse fd that a privileged process mounted."""
    capacity_bytes: int = 0
    """Capacity when no capacity file says otherwise; 0 means unlimited."""
    capacity_file: Path | None = None
    """JSON file ``{"capacityBytes": N}`` re-read on SIGHUP and when its mtime changes."""
    read_only: bool = False
    """Refuse every change with EROFS (and mount read-only when we mount ourselves)."""
    fsname: str = "fusecsi"
    """Source column of the mount table, so the node plugin can recognise its mounts."""
    allow_other: bool = True
    """Let users other than the server's own (i.e. the pods) use the mount."""
    ready_fd: int | None = None
    """Pipe fd that receives ``ready\\n`` once the mount is live, then is closed."""
    debug: bool = False
    """Log at debug level, with pyfuse3's messages and libfuse's trace of every request."""
    rescan_interval: float = 60.0
    """Seconds between usage rescans that correct changes made by other writers."""
    cache_timeout: float = 1.0
    """Seconds the kernel may cache entries and attributes (other nodes' changes lag this)."""
    read_ahead_kb: int = 4096
    """Kernel readahead for this mount (0 keeps the kernel's 128 KiB). FUSE reads arrive in
    readahead-sized pieces, so a bigger window means 1 MiB requests and several in flight,
    which matters more for a Python server than for a C one. Needs root and our own mount."""
    writeback_cache: bool = False
    """Kernel write-back caching: faster small writes, but ENOSPC then surfaces at close/fsync
    instead of write(), and other nodes see our writes later. Off unless asked for."""

    @property
    def mounts_fd(self) -> bool:
        """True when the mountpoint is an already mounted /dev/fuse fd (nothing to unmount)."""
        return str(self.mountpoint).startswith(_FD_MOUNTPOINT_PREFIX)


def add_filesystem_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `fusecsi fuse` (and `python -m strategies.inprocess.serve`)."""
    parser.add_argument("source", type=Path, help="backing directory")
    parser.add_argument(
        "mountpoint",
        type=Path,
        help="where to mount, or /dev/fd/N for an already mounted /dev/fuse fd",
    )
    parser.add_argument("--capacity", type=int, default=0, help="capacity in bytes (0: unlimited)")
    parser.add_argument(
        "--capacity-file", type=Path, help="JSON file with capacityBytes, re-read when it changes"
    )
    parser.add_argument("--read-only", action="store_true", help="refuse every change with EROFS")
    parser.add_argument("--fsname", default="fusecsi", help="source name shown in the mount table")
    parser.add_argument(
        "--ready-fd", type=int, help="write 'ready' to this fd once the mount is live"
    )
    parser.add_argument(
        "--rescan-interval", type=float, default=60.0, help="seconds between usage rescans"
    )
    parser.add_argument(
        "--read-ahead-kb", type=int, default=4096, help="kernel readahead of the mount"
    )
    parser.add_argument("--writeback-cache", action="store_true", help="kernel write-back caching")
    parser.add_argument("--debug", action="store_true", help="log every FUSE request")


def filesystem_options(args: argparse.Namespace) -> FilesystemOptions:
    return FilesystemOptions(
        source=args.source,
        mountpoint=args.mountpoint,
        capacity_bytes=args.capacity,
        capacity_file=args.capacity_file,
        read_only=args.read_only,
        fsname=args.fsname,
        ready_fd=args.ready_fd,
        debug=args.debug,
        rescan_interval=args.rescan_interval,
        read_ahead_kb=args.read_ahead_kb,
        writeback_cache=args.writeback_cache,
    )
