"""Sequential throughput of fusecsi's passthrough filesystem next to the backing dir and bindfs.

For each target (the backing directory itself, bindfs of it, our filesystem of it) this writes
a fresh file of --size-mib MiB in --block-kib KiB blocks, then reads it back twice:

* write: time of the write() calls alone (data lands in the page cache; for FUSE targets
  every block also makes a round trip through the FUSE server, which is what we compare);
* write+fsync: the same plus fsync, i.e. until the data is on the backing disk;
* cold read: after ``sync; echo 3 > /proc/sys/vm/drop_caches``, so both the FUSE page cache
  and the backing page cache are empty and every block goes through the server to the disk;
* warm read: a second read straight after, served from the kernel page cache when the
  filesystem allows it (our keep_cache on unchanged files; bindfs's default does not).

The file is always new (created with O_TRUNC), so no earlier run's cache helps it. O_DIRECT is
not used: it would bypass the caches whose effect we want to see, and FUSE handles it in its
own way. Every phase has a deadline (--phase-timeout); a phase that runs out reports the rate
of what it managed, marked with '*'. Needs root (drop_caches, mounts) and bindfs.

Run:  .venv/bin/python e2e/bench/fuse_throughput.py [--size-mib 1024] [--block-kib 1024]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MIB = 1024 * 1024


@dataclass
class Result:
    """MiB/s per phase for one target over all rounds."""

    target: str
    rates: dict[str, list[float]] = field(default_factory=dict)
    timed_out: set[str] = field(default_factory=set)

    def add(self, phase: str, moved: int, seconds: float) -> None:
        self.rates.setdefault(phase, []).append(moved / MIB / seconds if seconds > 0 else 0.0)

    def cell(self, phase: str) -> str:
        values = self.rates.get(phase)
        if not values:
            return "-"
        mark = "*" if phase in self.timed_out else ""
        return f"{statistics.median(values):,.0f}{mark}"


class PhaseTimeout(Exception):
    """A phase ran past its deadline; carries the bytes it moved."""

    def __init__(self, moved: int) -> None:
        super().__init__(moved)
        self.moved = moved


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def write_file(path: Path, size: int, block: bytes, deadline: float) -> tuple[float, float]:
    """Return (seconds for the writes, seconds for writes + fsync)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        start = time.monotonic()
        written = 0
        while written < size:
            written += os.write(fd, block)
            if time.monotonic() > deadline:
                raise PhaseTimeout(written)
        writes_done = time.monotonic()
        os.fsync(fd)
        return writes_done - start, time.monotonic() - start
    finally:
        os.close(fd)


def read_file(path: Path, block_size: int, deadline: float) -> tuple[int, float]:
    buffer = bytearray(block_size)
    fd = os.open(path, os.O_RDONLY)
    try:
        start = time.monotonic()
        total = 0
        while count := os.readv(fd, [buffer]):
            total += count
            if time.monotonic() > deadline:
                raise PhaseTimeout(total)
        return total, time.monotonic() - start
    finally:
        os.close(fd)


def measure(result: Result, directory: Path, args: argparse.Namespace) -> None:
    """One round of write, cold read and warm read on `directory`, added to `result`."""
    size, block_size = args.size_mib * MIB, args.block_kib * 1024
    block = os.urandom(block_size)
    path = directory / "bench.bin"
    try:
        started = time.monotonic()
        try:
            write_s, fsync_s = write_file(path, size, block, started + args.phase_timeout)
        except PhaseTimeout as timeout:
            result.add("write", timeout.moved, time.monotonic() - started)
            result.timed_out.add("write")
            return
        result.add("write", size, write_s)
        result.add("write+fsync", size, fsync_s)
        for phase in ("cold read", "warm read"):
            if phase == "cold read" and not args.no_drop_caches:
                drop_caches()
            started = time.monotonic()
            try:
                total, seconds = read_file(path, block_size, started + args.phase_timeout)
            except PhaseTimeout as timeout:
                result.add(phase, timeout.moved, time.monotonic() - started)
                result.timed_out.add(phase)
                return
            result.add(phase, total, seconds)
    finally:
        with contextlib.suppress(OSError):
            path.unlink()


def wait_unmounted(mountpoint: Path) -> None:
    subprocess.run(["umount", "-l", str(mountpoint)], check=False, capture_output=True)


@contextlib.contextmanager
def bindfs_mount(source: Path, mountpoint: Path) -> Iterator[Path]:
    subprocess.run(["bindfs", str(source), str(mountpoint)], check=True)
    try:
        yield mountpoint
    finally:
        subprocess.run(["fusermount3", "-u", str(mountpoint)], check=False)


@contextlib.contextmanager
def fusecsi_mount(source: Path, mountpoint: Path, extra: list[str]) -> Iterator[Path]:
    read_end, write_end = os.pipe()
    log = (mountpoint.parent / "fusecsi.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "strategies.inprocess",
            str(source),
            str(mountpoint),
            "--ready-fd",
            str(write_end),
            *extra,
        ],
        cwd=REPO,
        pass_fds=(write_end,),
        stderr=log,
    )
    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], 15)
        if not ready or os.read(read_end, 16) != b"ready\n":
            raise RuntimeError(f"fusecsi did not come up; see {log.name}")
        yield mountpoint
    finally:
        os.close(read_end)
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            wait_unmounted(mountpoint)
        log.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--block-kib", type=int, default=1024)
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp/fusecsi-bench"))
    parser.add_argument("--phase-timeout", type=float, default=60.0)
    parser.add_argument("--repeat", type=int, default=3, help="rounds; medians are reported")
    parser.add_argument("--targets", default="backing,bindfs,fusecsi")
    parser.add_argument(
        "--fusecsi-arg",
        action="append",
        default=[],
        help="extra argument for our server, e.g. --fusecsi-arg=--writeback-cache",
    )
    parser.add_argument(
        "--no-capacity",
        action="store_true",
        help="run ours without a capacity (by default it enforces one, to include accounting)",
    )
    parser.add_argument("--no-drop-caches", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (mounts, drop_caches)", file=sys.stderr)
        return 2
    if shutil.which("bindfs") is None and "bindfs" in args.targets:
        print("bindfs is not installed", file=sys.stderr)
        return 2

    workdir: Path = args.dir
    source = workdir / "source"
    source.mkdir(parents=True, exist_ok=True)
    fusecsi_extra = list(args.fusecsi_arg)
    if not args.no_capacity:
        fusecsi_extra += ["--capacity", str(4 * args.size_mib * MIB)]
    targets = args.targets.split(",")
    unknown = set(targets) - {"backing", "bindfs", "fusecsi"}
    if unknown:
        parser.error(f"unknown targets: {', '.join(sorted(unknown))}")
    labels = {
        "backing": "backing dir",
        "bindfs": "bindfs",
        "fusecsi": " ".join(["fusecsi", *args.fusecsi_arg]),
    }
    results = {target: Result(labels[target]) for target in targets}
    # Rounds interleave the targets so that noise from the machine spreads over all of them.
    for _round in range(args.repeat):
        for target in targets:
            mountpoint = workdir / f"mnt-{target}"
            mountpoint.mkdir(exist_ok=True)
            if target == "backing":
                measure(results[target], source, args)
            elif target == "bindfs":
                with bindfs_mount(source, mountpoint) as mounted:
                    measure(results[target], mounted, args)
            else:
                with fusecsi_mount(source, mountpoint, fusecsi_extra) as mounted:
                    measure(results[target], mounted, args)

    columns = ["write", "write+fsync", "cold read", "warm read"]
    print(
        f"\n{args.size_mib} MiB file, {args.block_kib} KiB blocks, median MiB/s of "
        f"{args.repeat} rounds ('*': a phase hit the {args.phase_timeout:.0f}s limit)"
    )
    width = max(len(result.target) for result in results.values()) + 2
    print("target".ljust(width) + "".join(column.rjust(14) for column in columns))
    for result in results.values():
        cells = "".join(result.cell(column).rjust(14) for column in columns)
        print(result.target.ljust(width) + cells)
    return 0


if __name__ == "__main__":
    sys.exit(main())
