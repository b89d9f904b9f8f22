"""The passthrough FUSE filesystem: real mounts served by a real server process.

Mount tests start `python -m strategies.inprocess` with a ready pipe, like the node plugin
does, and always unmount in teardown (lazily if the server is gone). A few tests drive the
filesystem object or the capacity tracker directly and need no root.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pyfuse3
import pytest

from strategies.inprocess.fs import CapacityTracker, PassthroughFilesystem, scan_usage

REPO = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024
READY_TIMEOUT = 10.0


def _fuse_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to mount FUSE filesystems (run the unit tests as root)"
    if not os.path.exists("/dev/fuse"):
        return "needs /dev/fuse (FUSE is not available on this machine)"
    if shutil.which("umount") is None:
        return "needs umount(8) to clean up mounts"
    return None


_MISSING = _fuse_unavailable()
requires_fuse = pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")


def is_mounted(mountpoint: Path) -> bool:
    """Look in the mount table: stat() on a dead FUSE mount fails, so it cannot tell."""
    target = os.fsencode(os.path.realpath(mountpoint))
    with open("/proc/self/mountinfo", "rb") as table:
        for line in table:
            field = line.split(b" ")[4]
            if field.replace(b"\\040", b" ").replace(b"\\134", b"\\") == target:
                return True
    return False


def lazy_unmount(mountpoint: Path) -> None:
    subprocess.run(["umount", "-l", os.fspath(mountpoint)], check=False, capture_output=True)


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    source: Path
    mountpoint: Path
    log: Path

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float = 5.0) -> int:
        return self.process.wait(timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


ServeFactory = Callable[..., Server]


def spawn_server(source: Path, mountpoint: Path, log: Path, *args: str) -> tuple[Server, int]:
    """Start a server; returns it and the read end of its ready pipe."""
    read_end, write_end = os.pipe()
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "strategies.inprocess",
                os.fspath(source),
                os.fspath(mountpoint),
                "--ready-fd",
                str(write_end),
                *args,
            ],
            cwd=REPO,
            pass_fds=(write_end,),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    os.close(write_end)
    return Server(process, source, mountpoint, log), read_end


def read_ready(read_end: int, timeout: float = READY_TIMEOUT) -> bytes:
    try:
        readable, _, _ = select.select([read_end], [], [], timeout)
        return os.read(read_end, 16) if readable else b"<timeout>"
    finally:
        os.close(read_end)


def stop_server(server: Server) -> None:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(5)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(5)
    if is_mounted(server.mountpoint):
        lazy_unmount(server.mountpoint)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[ServeFactory]:
    """Start servers on demand (tmp_path/source at tmp_path/mnt by default); clean them up."""
    servers: list[Server] = []

    def start(*args: str, source: Path | None = None, mountpoint: Path | None = None) -> Server:
        source = source or tmp_path / "source"
        mountpoint = mountpoint or tmp_path / "mnt"
        source.mkdir(parents=True, exist_ok=True)
        mountpoint.mkdir(parents=True, exist_ok=True)
        server, read_end = spawn_server(
            source, mountpoint, tmp_path / f"server-{len(servers)}.log", *args
        )
        servers.append(server)
        answer = read_ready(read_end)
        assert answer == b"ready\n", f"server not ready ({answer!r}):\n{server.output()}"
        assert is_mounted(mountpoint)
        return server

    yield start
    for server in servers:
        stop_server(server)


def write_bytes(path: Path, data: bytes, flags: int = os.O_WRONLY | os.O_CREAT) -> int:
    """One write() call, so a short write or an errno is visible to the test."""
    fd = os.open(path, flags, 0o644)
    try:
        return os.write(fd, data)
    finally:
        os.close(fd)


def renameat2(old: Path, new: Path, flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd = -100
    if libc.renameat2(at_fdcwd, os.fsencode(old), at_fdcwd, os.fsencode(new), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def write_capacity_file(path: Path, capacity: int) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps({"capacityBytes": capacity}))
    temporary.replace(path)


# ---------------------------------------------------------------- passthrough


@pytest.mark.root
@requires_fuse
def test_passthrough_reads_writes_and_changes_the_namespace(serve: ServeFactory) -> None:
    server = serve()
    mnt, src = server.mountpoint, server.source
    (mnt / "hello.txt").write_bytes(b"hello world")
    assert (src / "hello.txt").read_bytes() == b"hello world"
    (src / "from-backing.txt").write_bytes(b"backing side")
    assert (mnt / "from-backing.txt").read_bytes() == b"backing side"

    (mnt / "dir" / "sub").mkdir(parents=True)
    (mnt / "dir" / "sub" / "file").write_bytes(b"x" * 10_000)
    (mnt / "dir").rename(mnt / "moved")
    assert (src / "moved" / "sub" / "file").stat().st_size == 10_000
    assert (mnt / "moved" / "sub" / "file").read_bytes() == b"x" * 10_000  # path follows rename

    (mnt / "moved" / "link").symlink_to("sub/file")
    assert os.readlink(mnt / "moved" / "link") == "sub/file"
    assert (mnt / "moved" / "link").read_bytes() == b"x" * 10_000

    (mnt / "hello.txt").chmod(0o600)
    assert stat.S_IMODE((src / "hello.txt").stat().st_mode) == 0o600
    os.truncate(mnt / "hello.txt", 5)
    assert (src / "hello.txt").read_bytes() == b"hello"
    os.utime(mnt / "hello.txt", ns=(1_000_000_000, 2_000_000_000))
    assert (src / "hello.txt").stat().st_mtime_ns == 2_000_000_000

    (mnt / "hello.txt").unlink()
    (mnt / "moved" / "link").unlink()
    shutil.rmtree(mnt / "moved")
    assert sorted(os.listdir(src)) == ["from-backing.txt"]
    assert sorted(os.listdir(mnt)) == ["from-backing.txt"]


@pytest.mark.root
@requires_fuse
def test_hardlinks_fifos_rename_flags_and_xattrs_pass_through(serve: ServeFactory) -> None:
    mnt = serve().mountpoint
    (mnt / "a").write_bytes(b"aaa")
    os.link(mnt / "a", mnt / "b")
    assert (mnt / "a").stat().st_ino == (mnt / "b").stat().st_ino
    assert (mnt / "b").stat().st_nlink == 2

    (mnt / "c").write_bytes(b"ccc")
    (mnt / "c").replace(mnt / "a")  # rename over one of the two links
    assert (mnt / "a").read_bytes() == b"ccc"
    assert (mnt / "b").read_bytes() == b"aaa"
    assert (mnt / "b").stat().st_nlink == 1

    (mnt / "x").write_bytes(b"x")
    renameat2(mnt / "x", mnt / "b", pyfuse3.RENAME_EXCHANGE)
    assert (mnt / "b").read_bytes() == b"x"
    assert (mnt / "x").read_bytes() == b"aaa"
    with pytest.raises(OSError) as exists:
        renameat2(mnt / "x", mnt / "b", pyfuse3.RENAME_NOREPLACE)
    assert exists.value.errno == errno.EEXIST
    renameat2(mnt / "x", mnt / "y", pyfuse3.RENAME_NOREPLACE)
    assert (mnt / "y").read_bytes() == b"aaa"

    os.mkfifo(mnt / "fifo")
    assert stat.S_ISFIFO((mnt / "fifo").lstat().st_mode)
    with pytest.raises(OSError) as refused:
        os.mknod(mnt / "dev", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    assert refused.value.errno == errno.EPERM

    os.setxattr(mnt / "y", "user.colour", b"blue")
    assert os.getxattr(mnt / "y", "user.colour") == b"blue"
    assert "user.colour" in os.listxattr(mnt / "y")
    os.removexattr(mnt / "y", "user.colour")
    with pytest.raises(OSError) as missing:
        os.getxattr(mnt / "y", "user.colour")
    assert missing.value.errno == errno.ENODATA


@pytest.mark.root
@requires_fuse
def test_large_directories_list_completely(serve: ServeFactory, tmp_path: Path) -> None:
    source = tmp_path / "source"
    (source / "many").mkdir(parents=True)
    names = {f"entry-{index:04d}-{'x' * (index % 40)}" for index in range(500)}
    for name in names:
        (source / "many" / name).touch()
    mnt = serve().mountpoint
    assert set(os.listdir(mnt / "many")) == names
    with os.scandir(mnt / "many") as entries:
        assert sum(1 for entry in entries if entry.is_file(follow_symlinks=False)) == 500


@pytest.mark.root
@requires_fuse
def test_the_page_cache_is_kept_only_while_the_file_looks_unchanged(
    serve: ServeFactory,
) -> None:
    server = serve()
    shared = server.mountpoint / "shared"

    def read_without_stat() -> bytes:
        # No fstat: a stat would refetch attributes and let the kernel notice the change on
        # its own, hiding whether open() told it to drop the page cache.
        fd = os.open(shared, os.O_RDONLY)
        try:
            return os.read(fd, 100)
        finally:
            os.close(fd)

    shared.write_bytes(b"version-1")
    assert read_without_stat() == b"version-1"  # now in the page cache
    # The price of keep_cache, documented: a foreign rewrite that keeps size and mtime is not
    # noticed, and proves here that unchanged files are served from the page cache.
    backing = server.source / "shared"
    unchanged = backing.stat()
    backing.write_bytes(b"version-X")
    os.utime(backing, ns=(unchanged.st_atime_ns, unchanged.st_mtime_ns))
    assert read_without_stat() == b"version-1"
    # Another node rewrites it: same size, newer mtime. keep_cache must not serve version-1.
    backing.write_bytes(b"version-2")
    later = time.time_ns() + 5_000_000_000
    os.utime(backing, ns=(later, later))
    assert read_without_stat() == b"version-2"


# ------------------------------------------------------------------ capacity


@pytest.mark.root
@requires_fuse
def test_writes_fill_the_capacity_exactly_and_then_fail_with_enospc(serve: ServeFactory) -> None:
    mnt = serve("--capacity", str(MIB)).mountpoint
    assert write_bytes(mnt / "first", b"a" * (MIB - 100)) == MIB - 100
    # A write that only partly fits is shortened, as on a full disk...
    assert write_bytes(mnt / "second", b"b" * 1000) == 100
    # ...and nothing more fits, neither appending nor in a new file.
    for target in ("first", "third"):
        with pytest.raises(OSError) as full:
            write_bytes(mnt / target, b"c", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        assert full.value.errno == errno.ENOSPC
    # Overwriting in place needs no new space.
    assert write_bytes(mnt / "first", b"z" * 4096) == 4096


@pytest.mark.root
@requires_fuse
def test_truncate_past_capacity_fails_and_deleting_frees_space(serve: ServeFactory) -> None:
    mnt = serve("--capacity", str(MIB)).mountpoint
    (mnt / "file").write_bytes(b"a" * (MIB // 2))
    with pytest.raises(OSError) as refused:
        os.truncate(mnt / "file", MIB + 1)
    assert refused.value.errno == errno.ENOSPC
    os.truncate(mnt / "file", MIB)  # exactly the capacity is fine
    with pytest.raises(OSError):
        write_bytes(mnt / "other", b"x")
    (mnt / "file").unlink()
    assert write_bytes(mnt / "other", b"x" * (MIB // 2)) == MIB // 2


@pytest.mark.root
@requires_fuse
def test_statfs_reports_the_capacity_as_size_and_usage_as_used(serve: ServeFactory) -> None:
    mnt = serve("--capacity", str(8 * MIB)).mountpoint
    (mnt / "file").write_bytes(b"a" * MIB)
    usage = os.statvfs(mnt)
    assert usage.f_frsize == 4096
    assert usage.f_blocks * usage.f_frsize == 8 * MIB
    assert usage.f_bavail * usage.f_frsize == 7 * MIB
    df = subprocess.run(
        ["df", "-B1", "--output=size,used,avail", os.fspath(mnt)],
        check=True,
        capture_output=True,
        text=True,
    )
    assert df.stdout.split()[-3:] == [str(8 * MIB), str(MIB), str(7 * MIB)]


@pytest.mark.root
@requires_fuse
def test_statfs_without_capacity_is_the_backing_filesystems(serve: ServeFactory) -> None:
    server = serve()
    ours, backing = os.statvfs(server.mountpoint), os.statvfs(server.source)
    assert ours.f_blocks * ours.f_frsize == backing.f_blocks * backing.f_frsize
    assert ours.f_files == backing.f_files


@pytest.mark.root
@requires_fuse
def test_files_present_before_mounting_count_against_the_capacity(
    serve: ServeFactory, tmp_path: Path
) -> None:
    source = tmp_path / "source"
    (source / "old").mkdir(parents=True)
    (source / "old" / "data").write_bytes(b"x" * (600 * 1024))
    mnt = serve("--capacity", str(MIB)).mountpoint
    assert write_bytes(mnt / "new", b"y" * (500 * 1024)) == MIB - 600 * 1024


@pytest.mark.root
@requires_fuse
def test_sighup_rereads_the_capacity_file(serve: ServeFactory, tmp_path: Path) -> None:
    capacity_file = tmp_path / "capacity.json"
    capacity_file.write_text('{"capacityBytes": 1048576}')
    server = serve("--capacity-file", os.fspath(capacity_file), "--capacity", "1")
    mnt = server.mountpoint
    assert write_bytes(mnt / "file", b"a" * MIB) == MIB
    with pytest.raises(OSError):
        write_bytes(mnt / "more", b"b")
    # Rewrite in place keeping size and mtime, so only SIGHUP (not the mtime watch) sees it.
    before = capacity_file.stat()
    capacity_file.write_text('{"capacityBytes": 2097152}')
    os.utime(capacity_file, ns=(before.st_atime_ns, before.st_mtime_ns))
    server.signal(signal.SIGHUP)
    deadline = time.monotonic() + 3
    while os.statvfs(mnt).f_blocks * 4096 != 2 * MIB:
        assert time.monotonic() < deadline, "capacity not reloaded after SIGHUP"
        time.sleep(0.02)
    assert write_bytes(mnt / "more", b"b" * MIB) == MIB


@pytest.mark.root
@requires_fuse
def test_a_changed_capacity_file_is_noticed_without_a_signal(
    serve: ServeFactory, tmp_path: Path
) -> None:
    capacity_file = tmp_path / "capacity.json"
    write_capacity_file(capacity_file, 4 * MIB)
    mnt = serve("--capacity-file", os.fspath(capacity_file)).mountpoint
    assert os.statvfs(mnt).f_blocks * 4096 == 4 * MIB
    write_capacity_file(capacity_file, 6 * MIB)
    deadline = time.monotonic() + 3  # looked at no more than once a second
    while os.statvfs(mnt).f_blocks * 4096 != 6 * MIB:
        assert time.monotonic() < deadline, "capacity file change not noticed"
        time.sleep(0.1)
    capacity_file.unlink()  # no file: back to --capacity (0: unlimited, backing statfs)
    deadline = time.monotonic() + 3
    while os.statvfs(mnt).f_blocks * os.statvfs(mnt).f_frsize == 6 * MIB:
        assert time.monotonic() < deadline, "capacity file removal not noticed"
        time.sleep(0.1)


# ------------------------------------------------------------------ read-only


@pytest.mark.root
@requires_fuse
def test_read_only_mounts_refuse_every_change_with_erofs(
    serve: ServeFactory, tmp_path: Path
) -> None:
    source = tmp_path / "source"
    source.mkdir()
    (source / "file").write_bytes(b"data")
    (source / "dir").mkdir()
    mnt = serve("--read-only").mountpoint
    assert (mnt / "file").read_bytes() == b"data"
    attempts: list[Callable[[], object]] = [
        lambda: write_bytes(mnt / "file", b"x"),
        lambda: write_bytes(mnt / "new", b"x"),
        lambda: (mnt / "newdir").mkdir(),
        lambda: (mnt / "file").unlink(),
        lambda: (mnt / "dir").rmdir(),
        lambda: (mnt / "file").rename(mnt / "renamed"),
        lambda: (mnt / "file").chmod(0o600),
        lambda: os.truncate(mnt / "file", 0),
        lambda: os.setxattr(mnt / "file", "user.a", b"1"),
    ]
    for attempt in attempts:
        with pytest.raises(OSError) as refused:
            attempt()
        assert refused.value.errno == errno.EROFS
    assert (source / "file").read_bytes() == b"data"


@pytest.mark.anyio
async def test_read_only_handlers_refuse_changes_on_their_own(tmp_path: Path) -> None:
    """In fd mode the mount may not be ro: the handlers themselves must refuse (no root)."""
    (tmp_path / "file").write_bytes(b"data")
    filesystem = PassthroughFilesystem(tmp_path, capacity=CapacityTracker(0, None), read_only=True)
    ctx = SimpleNamespace(uid=0, gid=0, pid=0, umask=0o022)
    root = pyfuse3.ROOT_INODE
    try:
        entry = await filesystem.lookup(root, b"file", ctx)
        changes = [
            filesystem.mkdir(root, b"dir", 0o755, ctx),
            filesystem.unlink(root, b"file", ctx),
            filesystem.rename(root, b"file", root, b"other", 0, ctx),
            filesystem.create(root, b"new", 0o644, os.O_WRONLY, ctx),
            filesystem.open(entry.st_ino, os.O_WRONLY, ctx),
            filesystem.open(entry.st_ino, os.O_RDONLY | os.O_TRUNC, ctx),
            filesystem.setxattr(entry.st_ino, b"user.a", b"1", ctx),
        ]
        for change in changes:
            with pytest.raises(pyfuse3.FUSEError) as refused:
                await change
            assert refused.value.errno == errno.EROFS
        handle = await filesystem.open(entry.st_ino, os.O_RDONLY, ctx)
        assert bytes(await filesystem.read(handle.fh, 0, 100)) == b"data"
        await filesystem.release(handle.fh)
    finally:
        filesystem.close()
    assert (tmp_path / "file").read_bytes() == b"data"


# ------------------------------------------------------------------- symlinks


@pytest.mark.root
@requires_fuse
def test_relative_links_out_of_the_source_resolve_on_the_client_side(
    serve: ServeFactory, tmp_path: Path
) -> None:
    """A link is handed to the kernel as a link and resolved in the client's namespace.

    Server side: tmp/server/{secret.txt, outside/file, source/...}. Client side: tmp/client/mnt
    with a decoy tmp/client/secret.txt. A server that resolved links itself would return the
    server's secret; we must see the link, and through it only what the client can see anyway.
    """
    server_dir, client_dir = tmp_path / "server", tmp_path / "client"
    source = server_dir / "source"
    (source / "deep" / "er").mkdir(parents=True)
    (server_dir / "secret.txt").write_text("server secret")
    (server_dir / "outside").mkdir()
    (server_dir / "outside" / "file").write_text("server outside")
    (source / "up").symlink_to("../secret.txt")
    (source / "deep" / "er" / "chain").symlink_to("../../../secret.txt")
    (source / "dirlink").symlink_to("../outside")
    (client_dir / "mnt").mkdir(parents=True)
    (client_dir / "secret.txt").write_text("client decoy")
    mnt = serve(source=source, mountpoint=client_dir / "mnt").mountpoint

    assert stat.S_ISLNK((mnt / "up").lstat().st_mode)
    assert os.readlink(mnt / "up") == "../secret.txt"
    assert (mnt / "up").read_text() == "client decoy"
    assert (mnt / "deep" / "er" / "chain").read_text() == "client decoy"
    assert stat.S_ISLNK((mnt / "dirlink").lstat().st_mode)
    with pytest.raises(FileNotFoundError):  # tmp/client/outside does not exist
        (mnt / "dirlink" / "file").read_text()
    assert "server" not in "".join(path.read_text() for path in mnt.rglob("*") if path.is_file())


@pytest.mark.root
@requires_fuse
def test_absolute_links_are_passed_through_unresolved(serve: ServeFactory, tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    (source / "etc").symlink_to("/etc")
    mnt = serve().mountpoint
    assert stat.S_ISLNK((mnt / "etc").lstat().st_mode)
    assert os.readlink(mnt / "etc") == "/etc"
    # The kernel follows it in the client's namespace: here the host's /etc, in a pod the
    # container's. Nothing the server could stop, and nothing the client could not read anyway.
    assert os.path.samefile(mnt / "etc", "/etc")


@pytest.mark.root
@requires_fuse
def test_a_directory_swapped_for_a_symlink_does_not_redirect_server_side_writes(
    serve: ServeFactory, tmp_path: Path
) -> None:
    """Another writer replaces a directory we have open with a link to outside SOURCE.

    Creating a file relative to the open directory must not land outside SOURCE: the server
    walks names with O_NOFOLLOW and so refuses the link (a path-joining server would follow it).
    """
    source, outside = tmp_path / "source", tmp_path / "outside"
    (source / "dir").mkdir(parents=True)
    outside.mkdir()
    mnt = serve().mountpoint
    dir_fd = os.open(mnt / "dir", os.O_RDONLY | os.O_DIRECTORY)
    try:
        (source / "dir").rename(source / "dir-old")
        (source / "dir").symlink_to(outside)
        for attempt in (
            lambda: os.close(os.open("new.txt", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=dir_fd)),
            lambda: os.mkdir("newdir", dir_fd=dir_fd),
        ):
            try:
                attempt()
            except OSError as error:
                assert error.errno in (errno.ENOTDIR, errno.ELOOP, errno.ESTALE, errno.ENOENT)
    finally:
        os.close(dir_fd)
    assert list(outside.iterdir()) == []


# ---------------------------------------------------------------- lifecycle


@pytest.mark.root
@requires_fuse
def test_sigterm_unmounts_and_exits_zero(serve: ServeFactory) -> None:
    server = serve()
    (server.mountpoint / "file").write_bytes(b"kept")
    server.signal(signal.SIGTERM)
    assert server.wait() == 0, server.output()
    assert not is_mounted(server.mountpoint)
    assert (server.source / "file").read_bytes() == b"kept"


@pytest.mark.root
@requires_fuse
def test_an_external_unmount_ends_the_server(serve: ServeFactory) -> None:
    server = serve()
    subprocess.run(["umount", os.fspath(server.mountpoint)], check=True)
    assert server.wait() == 0, server.output()


@pytest.mark.root
@requires_fuse
def test_sigkill_leaves_a_dead_mount_that_a_lazy_unmount_clears(serve: ServeFactory) -> None:
    server = serve("--rescan-interval", "600")
    server.signal(signal.SIGKILL)
    server.wait()
    assert is_mounted(server.mountpoint)
    for touch in (os.listdir, os.statvfs):
        with pytest.raises(OSError) as dead:
            touch(server.mountpoint)
        assert dead.value.errno == errno.ENOTCONN
    time.sleep(1.1)  # stat() answers from the attribute cache until it expires (1 s)
    with pytest.raises(OSError) as dead:
        os.stat(server.mountpoint)
    assert dead.value.errno == errno.ENOTCONN
    lazy_unmount(server.mountpoint)
    assert not is_mounted(server.mountpoint)
    assert stat.S_ISDIR(os.stat(server.mountpoint).st_mode)


@pytest.mark.root
@requires_fuse
def test_the_server_stops_and_unmounts_when_its_parent_dies(tmp_path: Path) -> None:
    source, mountpoint = tmp_path / "source", tmp_path / "mnt"
    source.mkdir()
    mountpoint.mkdir()
    read_end, write_end = os.pipe()
    parent_script = (
        "import subprocess, sys\n"
        "child = subprocess.Popen(sys.argv[1:], pass_fds=(int(sys.argv[-1]),))\n"
        "print(child.pid, flush=True)\n"
        "sys.stdin.read()\n"
    )
    with subprocess.Popen(
        [
            sys.executable,
            "-c",
            parent_script,
            sys.executable,
            "-m",
            "strategies.inprocess",
            os.fspath(source),
            os.fspath(mountpoint),
            "--ready-fd",
            str(write_end),
        ],
        cwd=REPO,
        pass_fds=(write_end,),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    ) as parent:
        os.close(write_end)
        try:
            assert parent.stdout is not None
            server_pid = int(parent.stdout.readline())
            assert read_ready(read_end) == b"ready\n"
            assert is_mounted(mountpoint)
            parent.kill()
            parent.wait()
            deadline = time.monotonic() + 5
            while _alive(server_pid) or is_mounted(mountpoint):
                assert time.monotonic() < deadline, "server outlived its parent"
                time.sleep(0.05)
        finally:
            if parent.poll() is None:
                parent.kill()
            if is_mounted(mountpoint):
                lazy_unmount(mountpoint)


def _alive(pid: int) -> bool:
    """True unless the process is gone or a zombie (our PID 1 may not reap orphans)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


@pytest.mark.root
@requires_fuse
def test_a_failed_mount_closes_the_ready_pipe_without_ready(tmp_path: Path) -> None:
    (tmp_path / "source").mkdir()
    server, read_end = spawn_server(
        tmp_path / "source", tmp_path / "missing-mountpoint", tmp_path / "server.log"
    )
    try:
        assert read_ready(read_end) == b""
        assert server.wait() == 1
    finally:
        stop_server(server)


@pytest.mark.root
@requires_fuse
def test_serves_a_dev_fuse_fd_that_someone_else_mounted(tmp_path: Path) -> None:
    """The sidecar path: a privileged process mounts, the server gets the fd as /dev/fd/N."""
    source, target = tmp_path / "source", tmp_path / "target"
    source.mkdir()
    target.mkdir()
    (source / "hello").write_text("from the source")
    libc = ctypes.CDLL(None, use_errno=True)
    fuse_fd = os.open("/dev/fuse", os.O_RDWR)
    data = f"fd={fuse_fd},rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions"
    ms_nosuid, ms_nodev = 2, 4
    if libc.mount(
        b"fusecsi", os.fsencode(target), b"fuse.fusecsi", ms_nosuid | ms_nodev, data.encode()
    ):
        code = ctypes.get_errno()
        os.close(fuse_fd)
        pytest.fail(f"mount(2) failed: {os.strerror(code)}")
    read_end, write_end = os.pipe()
    try:
        with (tmp_path / "server.log").open("wb") as log:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "strategies.inprocess",
                    os.fspath(source),
                    f"/dev/fd/{fuse_fd}",
                    "--ready-fd",
                    str(write_end),
                ],
                cwd=REPO,
                pass_fds=(fuse_fd, write_end),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        os.close(write_end)
        os.close(fuse_fd)  # only the server may hold the connection open
        server = Server(process, source, target, tmp_path / "server.log")
        try:
            assert read_ready(read_end) == b"ready\n", server.output()
            assert (target / "hello").read_text() == "from the source"
            (target / "new").write_text("through the fd")
            assert (source / "new").read_text() == "through the fd"
            server.signal(signal.SIGTERM)
            assert server.wait() == 0, server.output()
            assert is_mounted(target)  # unmounting is the privileged side's job
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    finally:
        lazy_unmount(target)
    assert not is_mounted(target)


# ------------------------------------------------- pieces that need no mount


def test_usage_scan_counts_regular_files_once_and_does_not_follow_links(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "a").write_bytes(b"a" * 1000)
    os.link(tmp_path / "dir" / "a", tmp_path / "hardlink")
    (tmp_path / "b").write_bytes(b"b" * 24)
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    (outside / "big").write_bytes(b"x" * 5000)
    (tmp_path / "link").symlink_to(outside)
    try:
        assert scan_usage(tmp_path) == 1024
    finally:
        shutil.rmtree(outside)


def test_capacity_reservations_shorten_then_refuse_growth() -> None:
    tracker = CapacityTracker(1000, None)
    assert tracker.reserve(600) == 600
    assert tracker.reserve(600) == 400  # only what is left, even before the first settles
    tracker.settle(600, 600)
    tracker.settle(400, 100)
    assert tracker.usage == 700
    assert tracker.reserve(500) == 300
    tracker.settle(300, 0)
    tracker.adjust(-700)
    assert tracker.usage == 0
    unlimited = CapacityTracker(0, None)
    assert unlimited.reserve(10**15) == 10**15


def test_a_scan_keeps_growth_recorded_while_it_ran() -> None:
    tracker = CapacityTracker(0, None)
    started = tracker.begin_scan()
    tracker.settle(0, 300)  # a write during the scan, which the scan may have missed
    tracker.adjust(-50)  # a delete during the scan: not subtracted again (errs high)
    tracker.finish_scan(1000, started)
    assert tracker.usage == 1300


def test_capacity_file_values_missing_file_and_garbage(tmp_path: Path) -> None:
    capacity_file = tmp_path / "capacity.json"
    tracker = CapacityTracker(500, capacity_file)
    tracker.reload()
    assert tracker.capacity == 500  # no file: the default
    write_capacity_file(capacity_file, 2000)
    tracker.reload()
    assert tracker.capacity == 2000
    capacity_file.write_text("{not json")
    tracker.reload()
    assert tracker.capacity == 2000  # unreadable: keep the last good value
    capacity_file.write_text('{"capacityBytes": -1}')
    tracker.reload()
    assert tracker.capacity == 2000
    capacity_file.write_text('{"capacityBytes": "3000"}')
    tracker.reload()
    assert tracker.capacity == 3000
    capacity_file.unlink()
    tracker.reload()
    assert tracker.capacity == 500


def test_directory_walks_refuse_symlinked_components(tmp_path: Path) -> None:
    (tmp_path / "source" / "real").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (tmp_path / "source" / "link").symlink_to(tmp_path / "outside")
    (tmp_path / "source" / "rel").symlink_to("real")
    filesystem = PassthroughFilesystem(tmp_path / "source", capacity=CapacityTracker(0, None))
    try:
        os.close(filesystem._open_dir((b"real",)))
        for component in (b"link", b"rel"):
            with pytest.raises(OSError) as refused:
                filesystem._open_dir((component,))
            assert refused.value.errno in (errno.ENOTDIR, errno.ELOOP)
    finally:
        filesystem.close()
