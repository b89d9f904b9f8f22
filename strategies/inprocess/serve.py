"""Run the passthrough filesystem in this process until it is told to stop.

`run_filesystem` is the synchronous entry point behind `fusecsi fuse ...`: the node plugin (or a
sidecar that received a /dev/fuse fd) starts it in a child process and supervises it.

Readiness protocol: with `ready_fd`, the server writes ``b"ready\\n"`` to that fd and closes it
once the kernel's FUSE INIT handshake is done (the mount is live and answering). If mounting
fails, the fd is closed without writing, so the parent reads EOF.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import resource
import signal
import sys
from pathlib import Path

import anyio
import anyio.abc
import pyfuse3
import pyfuse3.asyncio
from loguru import logger

from strategies.inprocess.fs import CapacityTracker, PassthroughFilesystem
from strategies.inprocess.options import FilesystemOptions

__all__ = ("FilesystemOptions", "run_filesystem")

_PR_SET_PDEATHSIG = 1


def run_filesystem(options: FilesystemOptions) -> int:
    """Mount `options.source` at `options.mountpoint` and serve until SIGTERM/SIGINT or unmount.

    Returns the process exit status: 0 after a clean stop, 1 when mounting or serving failed.
    Changes this process's umask (to 0, so the modes clients ask for reach the backing files as
    they are; the kernel already applied the client's umask) and raises its RLIMIT_NOFILE soft
    limit; it is meant to own its process.
    """
    logger.remove()  # this process is the server: its stderr goes to the supervising plugin
    logger.add(sys.stderr, level="DEBUG" if options.debug else "INFO")
    _route_pyfuse3_logging(options.debug)
    _die_with_parent()
    _raise_open_file_limit()
    ready_pipe = _ReadyPipe(options.ready_fd)
    previous_umask = os.umask(0)
    try:
        return anyio.run(_serve, options, ready_pipe, backend="asyncio")
    finally:
        os.umask(previous_umask)
        ready_pipe.close()  # EOF without "ready" tells the parent we failed


async def _serve(options: FilesystemOptions, ready_pipe: _ReadyPipe) -> int:
    try:
        tracker = CapacityTracker(options.capacity_bytes, options.capacity_file)
    except ValueError as error:
        logger.error("{}", error)
        return 1
    tracker.reload()
    try:
        filesystem = PassthroughFilesystem(
            options.source,
            capacity=tracker,
            read_only=options.read_only,
            cache_timeout=options.cache_timeout,
            writeback_cache=options.writeback_cache,
        )
    except OSError as error:
        logger.error("cannot open source directory {}: {}", options.source, error)
        return 1
    status = 1
    try:
        async with anyio.create_task_group() as tasks:
            # Handlers go in before the mount exists: a SIGTERM that arrived between mounting
            # and installing them would kill us with the default action and leave a dead mount.
            session = _Session()
            await tasks.start(_handle_signals, filesystem, session)
            status = await _mount_and_serve(filesystem, session, tracker, options, ready_pipe)
            tasks.cancel_scope.cancel()
    finally:
        filesystem.close()
    return status


async def _mount_and_serve(
    filesystem: PassthroughFilesystem,
    session: _Session,
    tracker: CapacityTracker,
    options: FilesystemOptions,
    ready_pipe: _ReadyPipe,
) -> int:
    pyfuse3.asyncio.enable()
    # Resolved before mounting: afterwards every lookup under it would be a request to us.
    resolved = b""
    if not options.mounts_fd:
        await anyio.to_thread.run_sync(_detach_dead_mount, options.mountpoint)
        resolved = os.fsencode(await anyio.to_thread.run_sync(os.path.realpath, options.mountpoint))
    try:
        pyfuse3.init(filesystem, str(options.mountpoint), _mount_options(options))
    except RuntimeError as error:
        logger.error("mounting {} failed: {}", options.mountpoint, error)
        return 1
    session.started()
    logger.info(
        "serving {} at {} (capacity: {}{})",
        options.source,
        options.mountpoint,
        f"{tracker.capacity} bytes" if tracker.capacity else "unlimited",
        ", read-only" if options.read_only else "",
    )
    status = 0
    try:
        async with anyio.create_task_group() as background:
            background.start_soon(filesystem.track_usage, options.rescan_interval)
            background.start_soon(_when_live, filesystem, resolved, options, ready_pipe)
            try:
                await pyfuse3.main()
            finally:
                background.cancel_scope.cancel()
    except Exception:
        logger.exception("FUSE main loop failed")
        status = 1
    finally:
        pyfuse3.close(unmount=not options.mounts_fd)
    logger.info("stopped serving {}", options.mountpoint)
    return status


async def _when_live(
    filesystem: PassthroughFilesystem,
    resolved_mountpoint: bytes,
    options: FilesystemOptions,
    ready_pipe: _ReadyPipe,
) -> None:
    """After INIT: tune readahead (INIT would have reset it), then tell the parent we are up."""
    await filesystem.initialized.wait()
    if options.read_ahead_kb and not options.mounts_fd:
        await anyio.to_thread.run_sync(_tune_read_ahead, resolved_mountpoint, options.read_ahead_kb)
    ready_pipe.ready()


class _Session:
    """Whether pyfuse3 has a session to terminate (terminate() before init() would crash)."""

    def __init__(self) -> None:
        self._live = False
        self._stop_requested = False

    def started(self) -> None:
        self._live = True
        if self._stop_requested:
            pyfuse3.terminate()

    def stop(self) -> None:
        if self._live:
            pyfuse3.terminate()
        else:
            self._stop_requested = True


async def _handle_signals(
    filesystem: PassthroughFilesystem,
    session: _Session,
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """SIGTERM/SIGINT end the FUSE loop (which then unmounts); SIGHUP re-reads the capacity."""
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        task_status.started()
        async for signum in signals:
            if signum == signal.SIGHUP:
                logger.info("SIGHUP: re-reading capacity")
                await filesystem.reload_capacity()
                continue
            logger.info("{}: stopping", signal.Signals(signum).name)
            session.stop()


def _detach_dead_mount(mountpoint: Path) -> None:
    """A previous server of this mountpoint that died (a restarted Mount Pod container) left a
    dead FUSE mount there, on which mounting fails: detach it first."""
    from strategies.system import mounts

    if detached := mounts.detach_dead(mountpoint):
        logger.warning("detached {} dead mount(s) at {}", detached, mountpoint)


def _mount_device(mountpoint: bytes) -> str | None:
    """The "major:minor" of the newest mount at `mountpoint`, from /proc/self/mountinfo.

    Never stat the mountpoint from the server: a thread blocked on a request to our own mount
    keeps the process from exiting if it is killed (the /dev/fuse fd is only released once
    every thread is gone), leaving an unkillable process.
    """
    device = None
    with open("/proc/self/mountinfo", "rb") as table:
        for line in table:
            fields = line.split(b" ")
            if _MOUNTINFO_ESCAPE.sub(_unescape, fields[4]) == mountpoint:
                device = fields[2].decode()
    return device


_MOUNTINFO_ESCAPE = re.compile(rb"\\([0-7]{3})")


def _unescape(match: re.Match[bytes]) -> bytes:
    return bytes([int(match[1], 8)])


def _tune_read_ahead(mountpoint: bytes, read_ahead_kb: int) -> None:
    """Set the mount's readahead window through its backing-device entry in sysfs.

    The kernel offers FUSE a 128 KiB readahead at INIT and libfuse can only lower it, so sysfs
    is the one place to raise it.
    """
    try:
        device = _mount_device(mountpoint)
        if device is None:
            raise FileNotFoundError("mount not found in /proc/self/mountinfo")
        Path(f"/sys/class/bdi/{device}/read_ahead_kb").write_text(f"{read_ahead_kb}\n")
    except OSError as error:
        logger.info("kept the default readahead for {!r}: {}", mountpoint, error)
        return
    logger.debug("readahead of {!r} set to {} KiB", mountpoint, read_ahead_kb)


def _mount_options(options: FilesystemOptions) -> set[str]:
    """libfuse options. In fd mode the mount already exists, so only session options matter."""
    mount_options = set(pyfuse3.default_options)  # default_permissions: the kernel checks modes
    mount_options.add(f"fsname={options.fsname}")
    mount_options.add("subtype=fusecsi")
    if options.allow_other:
        mount_options.add("allow_other")
    if options.read_only:
        mount_options.add("ro")
    if options.debug:
        mount_options.add("debug")  # libfuse prints every request to stderr
    return mount_options


class _ReadyPipe:
    """The parent's ready pipe: written once, closed exactly once (a second close could hit an
    unrelated descriptor that reused the number)."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd

    def ready(self) -> None:
        if self._fd is None:
            return
        try:
            os.write(self._fd, b"ready\n")
        except OSError as error:
            logger.warning("could not report readiness on fd {}: {}", self._fd, error)
        self.close()

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


def _die_with_parent() -> None:
    """Ask the kernel to SIGTERM us when our parent dies.

    The node plugin supervises these servers; if it crashes or is killed, a server left behind
    would keep serving a mount nobody tracks. With SIGTERM we still unmount cleanly, and the
    restarted plugin recovers from the mount table. Note that the signal follows the parent
    *thread*: spawn the server from a long-lived thread (e.g. the event loop's).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        logger.warning("prctl(PR_SET_PDEATHSIG) failed: {}", os.strerror(ctypes.get_errno()))


def _raise_open_file_limit() -> None:
    """Open files each hold a backing fd; use the whole hard limit we are allowed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class _ToLoguru(logging.Handler):
    """Forward pyfuse3's standard-library log records to loguru."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.opt(exception=record.exc_info).log(level, "pyfuse3: {}", record.getMessage())


def _route_pyfuse3_logging(debug: bool) -> None:
    pyfuse3_logger = logging.getLogger("pyfuse3")
    pyfuse3_logger.handlers[:] = [_ToLoguru()]
    pyfuse3_logger.propagate = False
    pyfuse3_logger.setLevel(logging.DEBUG if debug else logging.INFO)
