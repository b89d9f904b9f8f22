"""Mount, bind and unmount through the system calls themselves, and read the mount table.

fusecsi calls mount(2)/umount2(2) directly (no mount(8) exec): a publish is then a few
microseconds of kernel work instead of a process start, and errors arrive as errno values we
can classify. Every function here is blocking; callers on the event loop go through
`strategies.system.blocking.run_blocking`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from dataclasses import dataclass
from pathlib import Path

from strategies.errors import InvalidArgument, MountFailed

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_RELATIME = 0x200000
MS_STRICTATIME = 0x1000000
MNT_FORCE = 0x1
MNT_DETACH = 0x2

# The per-mount flags a bind mount can carry, by the names mount(8) and CSI callers use.
MOUNT_FLAG_BITS: dict[str, int] = {
    "ro": MS_RDONLY,
    "rw": 0,
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME,
    "relatime": MS_RELATIME,
    "strictatime": MS_STRICTATIME,
    "suid": 0,
    "dev": 0,
    "exec": 0,
    "atime": 0,
    "defaults": 0,
    "bind": 0,
    "rbind": 0,
}

# errno values that mean "the FUSE server behind this path is gone or stuck".
DEAD_MOUNT_ERRNOS = frozenset({errno.ENOTCONN, errno.ECONNABORTED, errno.EIO, errno.ESTALE})


def parse_mount_flags(flags: tuple[str, ...], *, field: str) -> int:
    """Turn CSI mount flags into MS_* bits; an unknown flag is the caller's error."""
    bits = 0
    for flag in flags:
        name = flag.strip()
        if name not in MOUNT_FLAG_BITS:
            allowed = ", ".join(sorted(MOUNT_FLAG_BITS))
            raise InvalidArgument(field, f"unsupported mount flag {flag!r}; allowed: {allowed}")
        bits |= MOUNT_FLAG_BITS[name]
    return bits


def _check(result: int, what: str, path: str | os.PathLike[str]) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what} {os.fspath(path)}: {os.strerror(code)}", os.fspath(path))


def mount(source: str, target: Path, fstype: str | None, flags: int, data: str | None) -> None:
    """mount(2); raises OSError with errno."""
    result = _libc.mount(
        os.fsencode(source),
        os.fsencode(target),
        fstype.encode() if fstype else None,
        flags,
        data.encode() if data else None,
    )
    _check(result, "mount", target)


def bind(source: Path, target: Path, *, flags: int = 0) -> None:
    """Bind-mount `source` on `target`, then apply per-mount flags (read-only, noexec, ...).

    A bind ignores flags other than MS_REC on its first call, so the flags are applied by a
    second MS_REMOUNT|MS_BIND call, which changes only this mount, not the source's.
    """
    try:
        mount(os.fspath(source), target, None, MS_BIND, None)
    except OSError as exc:
        raise MountFailed(f"bind mount of {source} on {target} failed: {exc.strerror}") from exc
    if flags:
        try:
            mount("none", target, None, MS_BIND | MS_REMOUNT | flags, None)
        except OSError as exc:
            unmount(target, detach=True)
            raise MountFailed(f"applying mount flags on {target} failed: {exc.strerror}") from exc


def unmount(target: Path, *, detach: bool = False) -> bool:
    """Unmount `target`; returns False when nothing was mounted there.

    A busy mount is detached (MNT_DETACH): kubelet has already stopped the containers, and a
    lingering reference (an open fd in a dying process) must not block the pod's teardown.
    """
    flags = MNT_DETACH if detach else 0
    result = _libc.umount2(os.fsencode(target), flags)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOENT):
        return False
    if code == errno.EBUSY and not detach:
        return unmount(target, detach=True)
    raise MountFailed(f"unmount of {target} failed: {os.strerror(code)}")


@dataclass(frozen=True, slots=True)
class MountEntry:
    """One line of /proc/self/mountinfo."""

    mount_id: int
    parent_id: int
    device: str
    root: str
    mount_point: str
    options: frozenset[str]
    fstype: str
    source: str
    super_options: frozenset[str]

    @property
    def readonly(self) -> bool:
        return "ro" in self.options

    @property
    def is_fuse(self) -> bool:
        return self.fstype == "fuse" or self.fstype.startswith(("fuse.", "fuseblk"))


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal (\040 ...).
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str, *, mount_point: str | None = None) -> list[MountEntry]:
    """Parse the text of a mountinfo file (see proc(5)); only the lines of `mount_point`, if given.

    The filter runs before an entry is built: a publish asks about one path, and a busy node's
    table has hundreds of lines.
    """
    entries = []
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        if mount_point is not None and _unescape(fields[4]) != mount_point:
            continue
        sep = fields.index("-")
        entries.append(
            MountEntry(
                mount_id=int(fields[0]),
                parent_id=int(fields[1]),
                device=fields[2],
                root=_unescape(fields[3]),
                mount_point=_unescape(fields[4]),
                options=frozenset(fields[5].split(",")),
                fstype=fields[sep + 1],
                source=_unescape(fields[sep + 2]),
                super_options=frozenset(fields[sep + 3].split(","))
                if len(fields) > sep + 3
                else frozenset(),
            )
        )
    return entries


def _read_mountinfo() -> str:
    return Path("/proc/self/mountinfo").read_text()


def mount_table() -> list[MountEntry]:
    """The calling process's mount table; reading it never touches a FUSE server."""
    return parse_mountinfo(_read_mountinfo())


def mounts_at(path: Path, table: list[MountEntry] | None = None) -> list[MountEntry]:
    """Every mount stacked on `path`, bottom first (one read of the table when none is given)."""
    where = os.path.normpath(os.fspath(path))
    if table is None:
        return parse_mountinfo(_read_mountinfo(), mount_point=where)
    return [entry for entry in table if entry.mount_point == where]


def mounted_at(path: Path, table: list[MountEntry] | None = None) -> MountEntry | None:
    """The top mount on `path`, or None when `path` is not a mount point."""
    stacked = mounts_at(path, table)
    return stacked[-1] if stacked else None


def probe(path: Path) -> OSError | None:
    """stat `path`; None when it answers, the OSError when it does not (dead FUSE: ENOTCONN).

    Blocking and possibly hanging: call through run_blocking.
    """
    try:
        os.stat(path)
    except OSError as exc:
        return exc
    return None
