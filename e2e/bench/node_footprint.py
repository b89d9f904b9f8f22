"""Node plugin memory and start-up time, next to the Go baseline measured in the same run.

* start: from the process start (just before exec) to the first Probe answered ready=true,
  over a unix socket, p50/max of --starts starts (each with a fresh state directory);
* RSS (VmRSS of /proc/PID/status) of the plugin idle, then with --volumes hostPath volumes
  published at as many targets;
* inprocess: the plugin's RSS with --fuse-volumes volumes, and separately the RSS of each
  volume's `fusecsi fuse` child (pyfuse3 allows one session per process, so each volume costs
  a Python process). PSS is shown next to RSS: shared library pages are counted once there, so
  the sum of the children's PSS is what they really add to the node.

Every mount is made below one temporary directory and detached at exit (also on SIGTERM and
on --timeout).

Run:  .venv/bin/python e2e/bench/node_footprint.py [--volumes 100] [--go-baseline BINARY]
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio
import benchlib
from benchlib import ms
from grpclib.client import Channel

from protos.csi import v1 as csi

MIB = 1024 * 1024
RPC_TIMEOUT = 30.0
MOUNT_CAPABILITY = csi.VolumeCapability(
    mount=csi.VolumeCapabilityMountVolume(),
    access_mode=csi.VolumeCapabilityAccessMode(
        mode=csi.VolumeCapabilityAccessModeMode.SINGLE_NODE_MULTI_WRITER  # type: ignore[arg-type]
    ),
)


def status_kib(pid: int, field: str) -> int:
    """A `kB` field of /proc/PID/status (VmRSS, VmHWM...)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    raise KeyError("Pss")


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def mib(kib: float) -> str:
    return f"{kib / 1024:.1f} MiB"


@dataclass
class Server:
    """A CSI server process under test and a client on its socket."""

    process: subprocess.Popen[bytes]
    channel: Channel
    started: float

    @property
    def node(self) -> csi.NodeStub:
        return csi.NodeStub(self.channel, timeout=RPC_TIMEOUT)

    async def until_ready(self, deadline: float) -> float:
        """Seconds from the process start to the first Probe that answers ready=true."""
        identity = csi.IdentityStub(self.channel, timeout=RPC_TIMEOUT)
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.process.args!r} exited with {self.process.returncode}")
            try:
                if (await identity.probe(csi.ProbeRequest())).ready:
                    return time.perf_counter() - self.started
            except (OSError, ConnectionError):
                pass  # no socket yet, or not accepting yet
            if time.monotonic() > deadline:
                raise TimeoutError("no Probe answered ready=true")
            await anyio.sleep(0.002)

    def rss(self) -> int:
        return status_kib(self.process.pid, "VmRSS")

    def stop(self) -> None:
        self.channel.close()
        benchlib.stop_process(self.process)


def launch(argv: Sequence[str], socket: Path, log: Path) -> Server:
    with log.open("ab") as out:
        started = time.perf_counter()
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    return Server(process, Channel(path=os.fspath(socket)), started)


async def publish_many(
    server: Server,
    count: int,
    mnt: Path,
    prefix: str,
    context: dict[str, str],
    published: list[tuple[str, Path]],
) -> None:
    """Publish `count` volumes, each at its own target; `published` grows as they succeed, so
    that an interrupted run still unpublishes what it published."""
    for index in range(count):
        volume_id, target = f"{prefix}-{index}", mnt / prefix / f"pod-{index}" / "mount"
        await server.node.node_publish_volume(
            csi.NodePublishVolumeRequest(
                volume_id=volume_id,
                target_path=os.fspath(target),
                volume_capability=MOUNT_CAPABILITY,
                volume_context=context,
            )
        )
        published.append((volume_id, target))


async def unpublish_all(server: Server, published: list[tuple[str, Path]]) -> None:
    for volume_id, target in published:
        await server.node.node_unpublish_volume(
            csi.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=os.fspath(target))
        )


async def measure(args: argparse.Namespace, work: Path) -> None:
    data = work / "data"
    (data / "vol").mkdir(parents=True)
    (work / "mnt").mkdir()
    program = args.driver_command
    kinds: dict[str, list[str]] = {}
    fusecsi_argv = benchlib.driver_argv(work, program=program)
    kinds["fusecsi node"] = fusecsi_argv
    if args.go_baseline:
        go_socket = work / "go.sock"
        kinds["Go baseline"] = [
            args.go_baseline, "--endpoint", f"unix://{go_socket}", "--root", os.fspath(data)
        ]  # fmt: skip

    # Start-up. Nothing is published during these starts, so each finds an empty state dir.
    starts: dict[str, list[float]] = {name: [] for name in kinds}
    for _ in range(args.starts):
        for name, argv in kinds.items():
            socket = work / ("csi.sock" if name == "fusecsi node" else "go.sock")
            server = launch(argv, socket, work / "start.log")
            try:
                starts[name].append(await server.until_ready(time.monotonic() + 30))
            finally:
                server.stop()

    rows = []
    loaded_kib: dict[str, int] = {}
    for name, argv in kinds.items():
        socket = work / ("csi.sock" if name == "fusecsi node" else "go.sock")
        server = launch(argv, socket, work / f"{name.split()[0]}.log")
        published: list[tuple[str, Path]] = []
        try:
            await server.until_ready(time.monotonic() + 30)
            await anyio.sleep(args.settle)
            idle = server.rss()
            await publish_many(
                server,
                args.volumes,
                work / "mnt",
                name.split()[0].lower(),
                {"path": "vol"},
                published,
            )
            await anyio.sleep(args.settle)
            loaded = server.rss()
            peak = status_kib(server.process.pid, "VmHWM")
            loaded_kib[name] = loaded
        finally:
            with anyio.CancelScope(shield=True):
                await unpublish_all(server, published)
                server.stop()
        rows.append(
            [
                name,
                ms(statistics.median(starts[name])),
                ms(max(starts[name])),
                mib(idle),
                mib(loaded),
                f"{(loaded - idle) / max(1, args.volumes):.1f} KiB",
                mib(peak),
            ]
        )
    print()
    print(
        f"start = process start to the first Probe ready=true ({args.starts} starts); "
        f"RSS = VmRSS idle and with {args.volumes} hostPath volumes published "
        f"({args.volumes} targets), after {args.settle:g}s settling; peak = VmHWM"
    )
    headers = ["server", "start p50", "start max", "RSS idle",
               f"RSS {args.volumes} vols", "per volume", "peak"]  # fmt: skip
    print(benchlib.table(headers, rows))

    fuse_rows: list[list[str]] = []
    if args.fuse_volumes:
        fuse_rows = await measure_inprocess(args, work, fusecsi_argv)
        print()
        print(
            f"inprocess: {args.fuse_volumes} volumes, one target each; each volume is a "
            "`fusecsi fuse` child process"
        )
        print(benchlib.table(["process", "RSS", "PSS"], fuse_rows))

    fusecsi_start = statistics.median(starts["fusecsi node"])
    fusecsi_loaded = loaded_kib["fusecsi node"] / 1024
    print()
    print(
        f"target start p50 < 1.5 s: {'met' if fusecsi_start < 1.5 else 'MISSED'} "
        f"({ms(fusecsi_start)})"
    )
    print(
        f"target plugin RSS with {args.volumes} volumes < 80 MiB: "
        f"{'met' if fusecsi_loaded < 80 else 'MISSED'} ({fusecsi_loaded:.1f} MiB)"
    )


async def measure_inprocess(
    args: argparse.Namespace, work: Path, argv: list[str]
) -> list[list[str]]:
    server = launch(argv, work / "csi.sock", work / "inprocess.log")
    published: list[tuple[str, Path]] = []
    try:
        await server.until_ready(time.monotonic() + 30)
        await anyio.sleep(args.settle)
        idle = server.rss()
        await publish_many(
            server,
            args.fuse_volumes,
            work / "mnt",
            "inprocess",
            {"strategy": "inprocess", "path": "vol"},
            published,
        )
        await anyio.sleep(args.settle)
        plugin = server.rss()
        plugin_pss = pss_kib(server.process.pid)
        kids = children(server.process.pid)
        rss = [status_kib(pid, "VmRSS") for pid in kids]
        pss = [pss_kib(pid) for pid in kids]
    finally:
        with anyio.CancelScope(shield=True):
            await unpublish_all(server, published)
            server.stop()
    if len(kids) != args.fuse_volumes:
        print(f"(expected {args.fuse_volumes} FUSE children, found {len(kids)})", file=sys.stderr)
    return [
        ["plugin, idle", mib(idle), "-"],
        [f"plugin, {args.fuse_volumes} volumes", mib(plugin), mib(plugin_pss)],
        ["one FUSE child (median)", mib(statistics.median(rss)), mib(statistics.median(pss))],
        ["one FUSE child (max)", mib(max(rss)), mib(max(pss))],
        [f"all {len(kids)} FUSE children", mib(sum(rss)), mib(sum(pss))],
        ["plugin + children", mib(plugin + sum(rss)), mib(plugin_pss + sum(pss))],
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--starts", type=int, default=10, help="start-up measurements")
    parser.add_argument("--volumes", type=int, default=100, help="hostPath volumes to publish")
    parser.add_argument("--fuse-volumes", type=int, default=10, help="inprocess volumes")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds before reading RSS")
    parser.add_argument(
        "--go-baseline", help="the hostpath-baseline binary (build-go.sh hostpath-baseline)"
    )
    parser.add_argument(
        "--driver-command",
        type=shlex.split,
        help="command that runs fusecsi (default: the fusecsi script next to this python)",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="give up after this long")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (bind and FUSE mounts)", file=sys.stderr)
        return 2
    print(f"node_footprint: {benchlib.machine()}")

    with benchlib.stop_on_signals(), benchlib.workdir("footprint") as work:
        finished = benchlib.run_bounded(lambda work: measure(args, work), work, args.timeout)
    if not finished:
        return 1
    print(f"node_footprint: done, load average {benchlib.loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
