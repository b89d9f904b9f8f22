"""Publishing a directory at a target by bind mount, releasing a target, measuring a mount.

Shared by every strategy whose last step is a bind mount (all of them but the sidecar's direct
FUSE mount). Each function is idempotent and safe on dead FUSE mounts; each system call that
can touch a FUSE server runs through `run_blocking`.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from strategies.base import VolumeStats
from strategies.errors import AlreadyExists, FailedPrecondition, NotFound
from strategies.system import mounts
from strategies.system.blocking import run_blocking

# A bound on the mounts released from one target: each umount2 takes one off, and a target
# never holds more than a few (a stale one under a new one).
_MAX_STACKED = 64


def _bind_root(source: Path, table: list[mounts.MountEntry]) -> tuple[str, str] | None:
    """(device, root inside that device) a bind of `source` shows in mountinfo."""
    best: mounts.MountEntry | None = None
    text = os.fspath(source)
    for entry in table:
        point = entry.mount_point
        if (text == point or text.startswith(point.rstrip("/") + "/")) and (
            best is None or len(point) >= len(best.mount_point)
        ):
            best = entry
    if best is None:
        return None
    rest = os.path.relpath(text, best.mount_point)
    root = os.path.normpath(os.path.join(best.root, rest)) if rest != "." else best.root
    return best.device, root


def bind_flags(*, readonly: bool, mount_flags: tuple[str, ...]) -> int:
    """The MS_* bits of a publish request's read-only bit and mount flags."""
    flags = mounts.parse_mount_flags(mount_flags, field="volume_capability.mount.mount_flags")
    if readonly:
        flags |= mounts.MS_RDONLY
    return flags


def bind_blocking(source: Path, target: Path, flags: int) -> bool:
    """Bind unless the target already shows exactly this source; True when a mount was made.

    Blocking: call through `run_blocking` (or use `bind_target`). The usual case, an empty
    target, costs one statx (`mounts.is_mount_point`); only a target that already holds a
    mount (or one statx cannot judge) is looked up in the mount table.
    """
    if mounts.is_mount_point(target) is False:
        mounts.bind(source, target, flags=flags)
        return True
    current = mounts.mounted_at(target)
    if current is not None:
        broken = mounts.probe(target)
        wanted = _bind_root(source, mounts.mount_table())
        if broken is None and wanted == (current.device, current.root):
            return False
        if broken is None:
            raise AlreadyExists(
                f"{target} already holds another mount ({current.source} {current.root})"
            )
        # A dead mount (FUSE server gone) is replaced: that is how a target recovers.
        while mounts.mounted_at(target) is not None:
            mounts.unmount(target, detach=True)
    mounts.bind(source, target, flags=flags)
    return True


async def bind_target(
    source: Path, target: Path, *, readonly: bool, mount_flags: tuple[str, ...]
) -> bool:
    """Bind-mount `source` at `target` with the request's flags; a no-op when already done."""
    flags = bind_flags(readonly=readonly, mount_flags=mount_flags)
    return await run_blocking(f"bind mount at {target}", bind_blocking, source, target, flags)


def release_blocking(target: Path) -> int:
    """Unmount every mount stacked on `target`, top first; blocking (see `release_target`).

    Each umount2 on the path takes the top of the stack off. When statx can tell that
    `target` is a mount point, it is unmounted until nothing is left (UMOUNT_NOFOLLOW, as the
    table lookup never follows a symlink either); when it is not one, nothing is done; else
    the mount table is read once and one umount2 is made per mount stacked there.
    """
    count = 0
    mounted = mounts.is_mount_point(target)
    if mounted is False:
        return 0
    if mounted:
        while count < _MAX_STACKED and mounts.unmount(target, follow=False):
            count += 1
        return count
    for _ in mounts.mounts_at(target):
        if not mounts.unmount(target):
            break
        count += 1
    return count


async def release_target(target: Path) -> int:
    """Unmount everything stacked on `target` (dead FUSE mounts included); returns how many."""
    return await run_blocking(f"unmount of {target}", release_blocking, target)


def check_directory_blocking(path: Path, what: str) -> None:
    """Raise NotFound unless `path` is an existing directory; blocking (see `check_directory`)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise NotFound(f"{what} {path} does not exist") from exc
        raise FailedPrecondition(f"{what} {path} cannot be read: {exc.strerror}") from exc
    if not stat.S_ISDIR(mode):
        raise NotFound(f"{what} {path} is not a directory")


async def check_directory(path: Path, what: str) -> None:
    """Raise NotFound unless `path` is an existing directory (with a hang guard)."""
    await run_blocking(f"checking {path}", check_directory_blocking, path, what)


def _stats_blocking(path: Path) -> VolumeStats:
    mounted = mounts.is_mount_point(path)
    if mounted is None:
        mounted = mounts.mounted_at(path) is not None
    if not mounted:
        return VolumeStats(abnormal=True, message=f"{path} is not mounted")
    try:
        st = os.statvfs(path)
    except OSError as exc:
        return VolumeStats(abnormal=True, message=f"mount at {path} is broken: {exc.strerror}")
    size = st.f_frsize or st.f_bsize
    return VolumeStats(
        total_bytes=st.f_blocks * size,
        used_bytes=(st.f_blocks - st.f_bfree) * size,
        available_bytes=st.f_bavail * size,
        total_inodes=st.f_files,
        used_inodes=st.f_files - st.f_ffree,
        available_inodes=st.f_favail,
    )


async def filesystem_stats(path: Path) -> VolumeStats:
    """statvfs of a mount; an abnormal result (not an error) when the mount is dead or gone."""
    try:
        return await run_blocking(f"statfs of {path}", _stats_blocking, path)
    except Exception as exc:  # a hung mount is a condition to report, not a failed call
        return VolumeStats(abnormal=True, message=str(exc))
