"""Publish+unpublish cycle latency of the node plugin, next to baselines measured in the same run.

Subjects, each driven sequentially (one call at a time) over a unix socket by the same client:
by default the Go client `cycle-client/` (grpc-go, one connection per subject, as kubelet
calls a driver; built by `build-go.sh cycle-client`), with `--client python` the grpclib client
(`protos.csi.v1.NodeStub`), whose own CPU time (about 0.9 ms per call on a slow VM) is then
part of every figure:

* bare syscalls: bind mount + umount2 through ctypes on the same kind of paths, no RPC: the floor;
* Go baseline: `hostpath-baseline/`, a minimal Go CSI node server that publishes like
  csi-driver-host-path (k8s.io/mount-utils: exec of mount(8), CleanupMountPoint);
* fusecsi hostPath: one bind mount per publish;
* fusecsi inprocess, steady state: a second target of a volume whose FUSE session another
  target keeps alive, so a cycle is a bind + unbind of the session's mount;
* fusecsi inprocess, cold: the first publish of a volume (starts its `fusecsi fuse` child) and
  the last unpublish (stops it), repeated a few times, reported separately.

Samples are taken in interleaved rounds (every subject once per round) so that load from other
work on the machine spreads over all subjects alike. The driver's state directory is a tmpfs,
as /run/fusecsi is in production. Every mount is made below one temporary directory and
detached at exit, also on SIGTERM/SIGINT and on a timeout (--timeout).

The inprocess cold path, readiness probes and the final clean-up always use the grpclib client.

Run:  .venv/bin/python e2e/bench/publish_cycle.py [--cycles 300] [--go-baseline BINARY]
          [--client go|python] [--go-client BINARY]
      (e2e/bench/run.sh builds the Go baseline and passes it; the Go client is built here with
      `build-go.sh cycle-client` unless --go-client names it)
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import benchlib
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream
from benchlib import ms, percentile, ratio
from grpclib.client import Channel

from protos.csi import v1 as csi

RPC_TIMEOUT = 30.0
MOUNT_CAPABILITY = csi.VolumeCapability(
    mount=csi.VolumeCapabilityMountVolume(),
    access_mode=csi.VolumeCapabilityAccessMode(
        mode=csi.VolumeCapabilityAccessModeMode.SINGLE_NODE_MULTI_WRITER  # type: ignore[arg-type]
    ),
)


@dataclass
class Samples:
    """Seconds per publish and per unpublish, cycle by cycle."""

    name: str
    server_pid: int  # whose CPU time a cycle costs (this process for the bare syscalls)
    publish: list[float] = field(default_factory=list)
    unpublish: list[float] = field(default_factory=list)
    server_cpu: float = 0.0

    @property
    def cycle(self) -> list[float]:
        return [p + u for p, u in zip(self.publish, self.unpublish, strict=True)]


Cycle = Callable[[], Awaitable[tuple[float, float]]]
# Runs n cycles, returns the seconds of each first and each second call.
Batch = Callable[[int], Awaitable[tuple[list[float], list[float]]]]


def batch(cycle: Cycle) -> Batch:
    async def run(count: int) -> tuple[list[float], list[float]]:
        first, second = [], []
        for _ in range(count):
            one, two = await cycle()
            first.append(one)
            second.append(two)
        return first, second

    return run


class GoClient:
    """One `cycle-client -stdin` process: one grpc-go connection to one server, running as many
    cycles (publish + unpublish of one volume at one target, or two Probe calls) as asked."""

    def __init__(self, process: Process) -> None:
        self.process = process
        assert process.stdout is not None
        self.stdout = BufferedByteReceiveStream(process.stdout)

    @classmethod
    async def start(
        cls, binary: str, socket: Path, *, target: Path | None = None, volume_id: str = "",
        context: dict[str, str] | None = None,
    ) -> GoClient:  # fmt: skip
        argv = [binary, "-endpoint", f"unix://{socket}", "-warmup", "0", "-stdin"]
        if target is None:
            argv += ["-mode", "empty"]
        else:
            volume_context = ",".join(f"{k}={v}" for k, v in (context or {}).items())
            argv += ["-target", os.fspath(target), "-volume-id", volume_id]
            argv += ["-volume-context", volume_context]
        client = cls(await anyio.open_process(argv, stderr=None))
        if (await client.line()) != {"ready": True}:
            raise RuntimeError(f"{argv!r} did not start")
        return client

    async def line(self) -> dict[str, object]:
        try:
            raw = await self.stdout.receive_until(b"\n", 1 << 24)
        except (anyio.EndOfStream, anyio.IncompleteRead):
            raise RuntimeError(f"cycle-client exited ({await self.process.wait()})") from None
        return json.loads(raw)

    async def run(self, count: int) -> tuple[list[float], list[float]]:
        assert self.process.stdin is not None
        await self.process.stdin.send(f"{count}\n".encode())
        got = await self.line()
        if got.get("error"):
            raise RuntimeError(f"cycle-client: {got['error']}")
        return got.get("publish_s", []), got.get("unpublish_s", [])  # type: ignore[return-value]

    async def stop(self) -> None:
        """SIGTERM: the client unpublishes its target and exits; SIGKILL after 20 s."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            with anyio.move_on_after(20):
                await self.process.wait()
            if self.process.returncode is None:
                self.process.kill()
                await self.process.wait()


class CsiNode:
    """A NodeStub on a unix socket, publishing one volume at one target over and over."""

    def __init__(self, socket: Path) -> None:
        self.socket = socket
        self.channel = Channel(path=os.fspath(socket))
        self.node = csi.NodeStub(self.channel, timeout=RPC_TIMEOUT)
        self.identity = csi.IdentityStub(self.channel, timeout=RPC_TIMEOUT)
        self.targets: dict[Path, str] = {}  # every target ever published here, by volume ID

    async def ready(self, deadline: float) -> None:
        while True:
            try:
                if (await self.identity.probe(csi.ProbeRequest())).ready:
                    return
            except (OSError, ConnectionError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the CSI server never answered Probe with ready=true")
            await anyio.sleep(0.01)

    async def publish(self, volume_id: str, target: Path, context: dict[str, str]) -> float:
        self.targets[target] = volume_id
        started = time.perf_counter()
        await self.node.node_publish_volume(
            csi.NodePublishVolumeRequest(
                volume_id=volume_id,
                target_path=os.fspath(target),
                volume_capability=MOUNT_CAPABILITY,
                volume_context=context,
            )
        )
        return time.perf_counter() - started

    async def unpublish(self, volume_id: str, target: Path) -> float:
        started = time.perf_counter()
        await self.node.node_unpublish_volume(
            csi.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=os.fspath(target))
        )
        return time.perf_counter() - started

    def cycle(self, volume_id: str, target: Path, context: dict[str, str]) -> Cycle:
        async def run() -> tuple[float, float]:
            return (
                await self.publish(volume_id, target, context),
                await self.unpublish(volume_id, target),
            )

        return run

    def empty_pair(self) -> Cycle:
        """Two NodeGetInfo calls: what a cycle's two RPCs cost before any work is done."""

        async def call() -> float:
            started = time.perf_counter()
            await self.node.node_get_info(csi.NodeGetInfoRequest())
            return time.perf_counter() - started

        async def run() -> tuple[float, float]:
            return await call(), await call()

        return run

    async def release_all(self) -> None:
        """Unpublish every target this client published (a no-op for those already done), so
        that an interrupted run leaves nothing mounted; errors are only reported."""
        for target, volume_id in self.targets.items():
            try:
                await self.unpublish(volume_id, target)
            except Exception as exc:
                print(f"(cleanup: unpublish of {target} failed: {exc})", file=sys.stderr)

    def close(self) -> None:
        self.channel.close()


def bare_cycle(source: Path, target: Path) -> Cycle:
    """bind mount + umount2, the two system calls every bind-publishing driver must make."""
    src, dst = os.fspath(source), os.fspath(target)
    target.mkdir(parents=True, exist_ok=True)

    async def run() -> tuple[float, float]:
        started = time.perf_counter()
        benchlib.mount(src, dst, None, benchlib.MS_BIND, None)
        mounted = time.perf_counter()
        benchlib.umount2(dst)
        return mounted - started, time.perf_counter() - mounted

    return run


def start_server(argv: list[str], socket: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    benchlib.wait_for_socket(socket, process, timeout=30)
    return process


async def measure(args: argparse.Namespace, work: Path) -> None:
    data, mnt = work / "data", work / "mnt"
    (data / "vol").mkdir(parents=True)
    mnt.mkdir()
    processes: list[subprocess.Popen[bytes]] = []
    clients: list[CsiNode] = []
    go_clients: list[GoClient] = []

    async def cycle(node: CsiNode, volume_id: str, target: Path, ctx: dict[str, str]) -> Batch:
        """A subject's batch of cycles, driven by the client --client chose."""
        if not args.go_client:
            return batch(node.cycle(volume_id, target, ctx))
        node.targets[target] = volume_id  # for release_all, should the Go client not clean up
        go_clients.append(
            await GoClient.start(
                args.go_client, node.socket, target=target, volume_id=volume_id, context=ctx
            )
        )
        return go_clients[-1].run

    async def empty(node: CsiNode) -> Batch:
        if not args.go_client:
            return batch(node.empty_pair())
        go_clients.append(await GoClient.start(args.go_client, node.socket))
        return go_clients[-1].run

    empty_label = "2 empty RPCs (Probe)" if args.go_client else "2 empty RPCs (NodeGetInfo)"
    try:
        processes.append(
            start_server(
                benchlib.driver_argv(work, program=args.driver_command),
                work / "csi.sock",
                work / "driver.log",
            )
        )
        fusecsi = CsiNode(work / "csi.sock")
        clients.append(fusecsi)
        await fusecsi.ready(time.monotonic() + 30)
        driver_pid = processes[0].pid
        subjects: dict[str, tuple[Batch, int]] = {
            "bare syscalls (bind + umount2)": (
                batch(bare_cycle(data / "vol", mnt / "bare")),
                os.getpid(),
            ),
        }
        if args.go_baseline:
            go_socket = work / "go.sock"
            processes.append(
                start_server(
                    [args.go_baseline, "--endpoint", f"unix://{go_socket}", "--root", str(data)],
                    go_socket,
                    work / "go.log",
                )
            )
            go = CsiNode(go_socket)
            clients.append(go)
            await go.ready(time.monotonic() + 30)
            go_pid = processes[-1].pid
            subjects["Go baseline (mount-utils)"] = (
                await cycle(go, "bench-go", mnt / "go" / "target", {"path": "vol"}),
                go_pid,
            )
            if args.floor:
                subjects[f"Go: {empty_label}"] = (await empty(go), go_pid)
        if args.floor:
            subjects[f"fusecsi: {empty_label}"] = (await empty(fusecsi), driver_pid)
        if "hostPath" in args.strategies:
            subjects["fusecsi hostPath"] = (
                await cycle(
                    fusecsi, "bench-hostpath", mnt / "hostpath" / "target", {"path": "vol"}
                ),
                driver_pid,
            )
        for label, command in args.other_driver:
            processes.append(
                start_server(
                    benchlib.driver_argv(work, program=shlex.split(command), name=label),
                    work / f"{label}.sock",
                    work / f"{label}.log",
                )
            )
            other = CsiNode(work / f"{label}.sock")
            clients.append(other)
            await other.ready(time.monotonic() + 30)
            subjects[f"{label}: hostPath"] = (
                await cycle(other, f"bench-{label}", mnt / label / "target", {"path": "vol"}),
                processes[-1].pid,
            )
        cold = Samples("inprocess", driver_pid)
        if "inprocess" in args.strategies:
            context = {"strategy": "inprocess", "path": "vol"}
            for index in range(args.cold):
                target = mnt / "cold" / "target"
                cold.publish.append(await fusecsi.publish(f"bench-cold-{index}", target, context))
                cold.unpublish.append(await fusecsi.unpublish(f"bench-cold-{index}", target))
            await fusecsi.publish("bench-inprocess", mnt / "keeper" / "target", context)
            subjects["fusecsi inprocess (steady state)"] = (
                await cycle(fusecsi, "bench-inprocess", mnt / "inprocess" / "target", context),
                driver_pid,
            )

        samples = {name: Samples(name, pid) for name, (_, pid) in subjects.items()}
        for run, _ in subjects.values():
            await run(args.warmup)
        per_round = -(-args.cycles // args.rounds)
        for _ in range(args.rounds):
            for name, (run, pid) in subjects.items():
                cpu_before = benchlib.cpu_seconds(pid)
                publish, unpublish = await run(per_round)
                samples[name].server_cpu += benchlib.cpu_seconds(pid) - cpu_before
                samples[name].publish.extend(publish)
                samples[name].unpublish.extend(unpublish)
        report(args, samples, cold)
    finally:
        with anyio.CancelScope(shield=True):
            for go_client in go_clients:
                await go_client.stop()
            for client in clients:
                await client.release_all()
                client.close()
            for process in processes:
                benchlib.stop_process(process)


def client_name(args: argparse.Namespace) -> str:
    if args.go_client:
        return "Go client (cycle-client: grpc-go, one connection per subject, like kubelet)"
    return "Python client (grpclib)"


def go_client_binary(args: argparse.Namespace) -> str | None:
    """The cycle-client binary to use, or None for the Python client; builds it when needed."""
    if args.client == "python":
        return None
    if args.go_client:
        return args.go_client
    build = Path(__file__).with_name("build-go.sh")
    try:
        built = subprocess.run(
            [build, "cycle-client"], stdout=subprocess.PIPE, check=True, timeout=600
        )
    except (OSError, subprocess.SubprocessError) as exc:
        if args.client == "go":
            raise SystemExit(f"cannot build the Go client: {exc}") from exc
        print(f"(Go client not built, using the Python client: {exc})", file=sys.stderr)
        return None
    return built.stdout.decode().strip()


def report(args: argparse.Namespace, samples: dict[str, Samples], cold: Samples) -> None:
    bare = samples.get("bare syscalls (bind + umount2)")
    go = samples.get("Go baseline (mount-utils)")
    bare_p50 = percentile(bare.cycle, 50) if bare else None
    go_p50 = percentile(go.cycle, 50) if go else None
    rows = []
    for name, got in samples.items():
        p50 = percentile(got.cycle, 50)
        rows.append(
            [
                name,
                ms(p50),
                ms(percentile(got.cycle, 99)),
                ratio(p50, bare_p50),
                ratio(p50, go_p50),
                ms(percentile(got.publish, 50)),
                ms(percentile(got.unpublish, 50)),
                ms(got.server_cpu / len(got.publish)),
            ]
        )
    print()
    print(
        f"publish+unpublish cycle, {len(next(iter(samples.values())).cycle)} cycles per subject "
        f"(after {args.warmup} warm-up) in {args.rounds} interleaved rounds; sequential, unix "
        f"socket, {client_name(args)}; driver state dir on tmpfs; ratios are of p50s; server CPU "
        "is the "
        "serving process's user+system time (for the bare syscalls: this process's)"
    )
    headers = ["subject", "p50", "p99", "vs bare", "vs Go", "publish p50", "unpublish p50",
               "server CPU/cycle"]  # fmt: skip
    print(benchlib.table(headers, rows))
    if cold.publish:
        print()
        print(
            f"inprocess cold path ({len(cold.publish)} volumes, one after the other; "
            "grpclib client)"
        )
        print(
            benchlib.table(
                ["step", "p50", "max"],
                [
                    [
                        "first publish (starts the FUSE child)",
                        ms(percentile(cold.publish, 50)),
                        ms(max(cold.publish)),
                    ],
                    [
                        "last unpublish (stops it)",
                        ms(percentile(cold.unpublish, 50)),
                        ms(max(cold.unpublish)),
                    ],
                ],
            )
        )
    hostpath = samples.get("fusecsi hostPath")
    if hostpath:
        p50 = percentile(hostpath.cycle, 50)
        print()
        print(f"target hostPath p50 < 1 ms: {'met' if p50 < 0.001 else 'MISSED'} ({ms(p50)})")
        if go_p50:
            met = p50 <= go_p50 / 5
            print(
                f"target hostPath p50 <= Go baseline p50 / 5 ({ms(go_p50 / 5)}): "
                f"{'met' if met else 'MISSED'} ({ratio(p50, go_p50)} of it)"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=300, help="measured cycles per subject")
    parser.add_argument("--warmup", type=int, default=30, help="unmeasured cycles per subject")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--cold", type=int, default=5, help="inprocess cold starts to time")
    parser.add_argument("--strategies", default="hostPath,inprocess")
    parser.add_argument(
        "--no-floor",
        dest="floor",
        action="store_false",
        help="skip the empty-RPC rows (the gRPC cost a cycle pays before any mount work)",
    )
    parser.add_argument(
        "--go-baseline", help="the hostpath-baseline binary (build-go.sh hostpath-baseline)"
    )
    parser.add_argument(
        "--client",
        choices=["go", "python"],
        help="what drives the cycles: the Go client (cycle-client/, like kubelet) or grpclib; "
        "default: go when its binary can be built, else python",
    )
    parser.add_argument("--go-client", help="the cycle-client binary (`build-go.sh cycle-client`)")
    parser.add_argument(
        "--driver-command",
        type=shlex.split,
        help="command that runs fusecsi (default: the fusecsi script next to this python)",
    )
    parser.add_argument(
        "--other-driver",
        action="append",
        default=[],
        type=lambda value: tuple(value.split("=", 1)),
        metavar="LABEL=COMMAND",
        help="one more fusecsi build to measure (hostPath) beside this one, e.g. "
        "before='env -C /tmp/old .venv/bin/python -m csi'",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="give up after this long")
    args = parser.parse_args()
    args.strategies = args.strategies.split(",")
    if os.geteuid() != 0:
        print("needs root (bind mounts)", file=sys.stderr)
        return 2
    args.go_client = go_client_binary(args)
    print(f"publish_cycle: {benchlib.machine()}")
    print(f"publish_cycle: client: {client_name(args)}")

    with benchlib.stop_on_signals(), benchlib.workdir("publish") as work:
        finished = benchlib.run_bounded(lambda work: measure(args, work), work, args.timeout)
    if not finished:
        return 1
    print(f"publish_cycle: done, load average {benchlib.loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
