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
_statx = getattr(_libc, "statx", None)  # glibc >= 2.28
if _statx is not None:
    _statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_SHARED = 0x100000
MS_RELATIME = 0x200000
MS_STRICTATIME = 0x1000000
MNT_FORCE = 0x1
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8

_AT_FDCWD = -100
_AT_SYMLINK_NOFOLLOW = 0x100
_AT_NO_AUTOMOUNT = 0x800
_AT_STATX_DONT_SYNC = 0x4000
_STATX_ATTR_MOUNT_ROOT = 0x2000
_STATX_SIZE = 256  # struct statx, with the kernel's spare room
_STATX_ATTRIBUTES = slice(8, 16)  # __u64 stx_attributes
_STATX_ATTRIBUTES_MASK = slice(56, 64)  # __u64 stx_attributes_mask

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


def make_shared(target: Path) -> None:
    """Put the mount at `target` in a peer group of its own (MS_SHARED)."""
    mount("none", target, None, MS_SHARED, None)


def unmount(target: Path, *, detach: bool = False, follow: bool = True) -> bool:
    """Unmount `target`; returns False when nothing was mounted there.

    A busy mount is detached (MNT_DETACH): kubelet has already stopped the containers, and a
    lingering reference (an open fd in a dying process) must not block the pod's teardown.
    `follow=False` (UMOUNT_NOFOLLOW): a symlink at `target` is not followed.
    """
    flags = (MNT_DETACH if detach else 0) | (0 if follow else UMOUNT_NOFOLLOW)
    result = _libc.umount2(os.fsencode(target), flags)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOENT):
        return False
    if code == errno.EBUSY and not detach:
        return unmount(target, detach=True, follow=follow)
    raise MountFailed(f"unmount of {target} failed: {os.strerror(code)}")


def is_mount_point(path: Path) -> bool | None:
    """Whether `path` (not following a final symlink) is the root of a mount; None: unknown.

    One statx(2) asking for STATX_ATTR_MOUNT_ROOT, instead of reading the mount table: the
    table costs the kernel microseconds per line to print (about 0.6 ms for 130 mounts on
    our 2-vCPU VMs, several on a node with hundreds of pods' mounts), the statx a few. The
    call is AT_STATX_DONT_SYNC: a FUSE filesystem then answers from its attribute cache
    without asking its server, so a hung FUSE mount on `path` cannot block it. None when the
    kernel or libc cannot tell (no statx, kernel before 5.8) or the statx fails (a dead mount):
    callers then read the mount table as before.
    """
    if _statx is None:
        return None
    buffer = ctypes.create_string_buffer(_STATX_SIZE)
    flags = _AT_SYMLINK_NOFOLLOW | _AT_NO_AUTOMOUNT | _AT_STATX_DONT_SYNC
    if _statx(_AT_FDCWD, os.fsencode(path), flags, 0, buffer) != 0:
        return None
    raw = buffer.raw
    if not int.from_bytes(raw[_STATX_ATTRIBUTES_MASK], "little") & _STATX_ATTR_MOUNT_ROOT:
        return None
    return bool(int.from_bytes(raw[_STATX_ATTRIBUTES], "little") & _STATX_ATTR_MOUNT_ROOT)


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
    propagation: tuple[str, ...] = ()
    """The optional fields: `shared:N`, `master:N`, ... (none for a private mount)."""

    @property
    def readonly(self) -> bool:
        return "ro" in self.options

    @property
    def shared(self) -> bool:
        return any(tag.startswith("shared:") for tag in self.propagation)

    @property
    def is_fuse(self) -> bool:
        return self.fstype == "fuse" or self.fstype.startswith(("fuse.", "fuseblk"))


def _escape(path: str) -> str:
    """A path as mountinfo writes it (space, tab, newline and backslash in octal)."""
    for char in "\\ \t\n":
        if char in path:
            path = path.replace(char, f"\\{ord(char):03o}")
    return path


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
    # A line can only be `mount_point`'s if it holds the escaped path between spaces: that
    # substring test skips the other lines without splitting them.
    needle = f" {_escape(mount_point)} " if mount_point is not None else ""
    for line in text.splitlines():
        if needle and needle not in line:
            continue
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
                propagation=tuple(fields[6:sep]),
            )
        )
    return entries


def _read_mountinfo() -> str:
    # os.read rather than Path.read_text: half the CPU (no file object, no incremental
    # decoder); read once or twice per publish and unpublish.
    fd = os.open("/proc/self/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode("utf-8", "surrogateescape")


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


def probe_statfs(path: Path) -> OSError | None:
    """statfs `path`; None when its filesystem answers, else the OSError (dead FUSE: ENOTCONN).

    Unlike stat (`probe`), statfs is never served from the kernel's attribute cache, so a dead
    FUSE server shows at once. Blocking and possibly hanging: call through run_blocking.
    """
    try:
        os.statvfs(path)
    except OSError as exc:
        return exc
    return None


def detach_dead(mountpoint: Path) -> int:
    """Detach the dead mounts stacked on `mountpoint` (a crashed FUSE server's) until the top
    one answers or none is left; returns how many. Blocking: call through run_blocking."""
    count = 0
    while mounted_at(mountpoint) is not None and probe_statfs(mountpoint) is not None:
        unmount(mountpoint, detach=True)
        count += 1
    return count
