"""Mounting FUSE with a /dev/fuse fd the caller keeps, and passing such an fd to another process.

The privileged side (the node plugin) opens /dev/fuse and mounts with `fd=N`; an unprivileged
process that receives the fd over a unix socket (SCM_RIGHTS) serves the mount through libfuse's
`/dev/fd/N` mount point, without any privilege of its own.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from strategies.system import mounts

FUSE_DEVICE = "/dev/fuse"
MAX_MESSAGE = 65536


def mount_fuse_fd(
    target: Path, *, fsname: str, subtype: str, flags: int, allow_other: bool = True
) -> int:
    """Open /dev/fuse and mount it at `target`; returns the fd (close-on-exec), owned by the caller.

    Until a server answers on the fd, calls on the mount wait (FUSE's INIT handshake).
    """
    fd = os.open(FUSE_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    try:
        options = [f"fd={fd}", "rootmode=40000", "user_id=0", "group_id=0", "default_permissions"]
        if allow_other:
            options.append("allow_other")
        mounts.mount(
            fsname,
            target,
            f"fuse.{subtype}",
            flags | mounts.MS_NOSUID | mounts.MS_NODEV,
            ",".join(options),
        )
    except BaseException:
        os.close(fd)
        raise
    return fd


def short_socket_path(directory_fd: int, name: str) -> str:
    """A path to `name` in an open directory that fits sun_path (108 bytes) whatever the
    directory's own path length: kubelet's pod directories alone take about 100."""
    return f"/proc/self/fd/{directory_fd}/{name}"


def send_fd(connection: socket.socket, fd: int, message: dict[str, Any]) -> None:
    """Send `fd` with a JSON message (one datagram-like send on a stream socket)."""
    payload = json.dumps(message).encode()
    if len(payload) >= MAX_MESSAGE:
        raise ValueError("handoff message too long")
    socket.send_fds(connection, [payload], [fd])


def receive_fd(connection: socket.socket) -> tuple[int, dict[str, Any]]:
    """Receive the fd and its JSON message; raises ConnectionError if none came."""
    payload, fds, _flags, _address = socket.recv_fds(connection, MAX_MESSAGE, 1)
    if not fds:
        raise ConnectionError("the node plugin closed the socket without sending an fd")
    for extra in fds[1:]:
        os.close(extra)
    message: dict[str, Any] = json.loads(payload.decode()) if payload else {}
    return fds[0], message
