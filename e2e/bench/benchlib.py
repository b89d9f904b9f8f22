"""What the driver-core benchmarks share: a work dir that cleans up its mounts, a driver process,
percentiles and plain-text tables.

Kept out of `csi`/`strategies` on purpose: benchmarks must not change what they measure.
Everything here talks only to unix sockets and mounts below its own work directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import datetime
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import anyio

if TYPE_CHECKING:
    from e2e.tests.kube import Kubectl

REPO = Path(__file__).resolve().parents[2]

MS_BIND = 0x1000
MNT_DETACH = 0x2
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    """mount(2) through ctypes; OSError on failure."""
    if _libc.mount(
        source.encode(),
        target.encode(),
        fstype.encode() if fstype else None,
        flags,
        data.encode() if data else None,
    ):
        code = ctypes.get_errno()
        raise OSError(code, f"mount {target}: {os.strerror(code)}")


def umount2(target: str, flags: int = 0) -> None:
    if _libc.umount2(target.encode(), flags):
        code = ctypes.get_errno()
        raise OSError(code, f"umount2 {target}: {os.strerror(code)}")


def mounts_below(directory: Path) -> list[str]:
    """Mount points at or below `directory`, deepest first (the order to unmount them in)."""
    prefix = os.fspath(directory)
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == prefix or point.startswith(prefix + "/"):
            points.append(point)
    return sorted(points, key=lambda p: (p.count("/"), p), reverse=True)


def unmount_all_below(directory: Path) -> int:
    """Detach every mount below `directory`; returns how many were left there by someone."""
    count = 0
    for _ in range(10):  # stacked mounts on one point show up again after the top one goes
        points = mounts_below(directory)
        if not points:
            break
        for point in points:
            with contextlib.suppress(OSError):
                umount2(point, MNT_DETACH)
                count += 1
    return count


@contextlib.contextmanager
def workdir(name: str, *, tmpfs_state: bool = True) -> Iterator[Path]:
    """A fresh directory under /tmp with `state/` on its own tmpfs (the production /run/fusecsi
    is tmpfs); on exit every mount below it is detached and the directory removed."""
    root = Path(tempfile.mkdtemp(prefix=f"fusecsi-bench-{name}."))
    try:
        (root / "state").mkdir()
        if tmpfs_state:
            mount("tmpfs", os.fspath(root / "state"), "tmpfs", 0, "size=64m,mode=0700")
        yield root
    finally:
        left = unmount_all_below(root) - (1 if tmpfs_state else 0)
        if left > 0:
            print(f"(cleanup: detached {left} mount(s) below {root})", file=sys.stderr)
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Outside the event loop: SIGTERM/SIGHUP raise KeyboardInterrupt, so `finally` blocks run."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_bounded(measure: Callable[[Path], Awaitable[None]], work: Path, timeout: float) -> bool:
    """Run `measure(work)` on an event loop for at most `timeout` seconds.

    SIGTERM, SIGINT and SIGHUP cancel it (its `finally` blocks, which unpublish and stop the
    servers, then run as usual). A signal raised as an exception inside the loop would land in
    whatever callback runs at that moment, grpclib's included, and leave calls hanging.
    Returns False when a signal or the time limit stopped it.
    """
    stopped = False

    async def on_signal(scope: anyio.CancelScope) -> None:
        nonlocal stopped
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for received in signals:
                print(f"({signal.Signals(received).name}: stopping)", file=sys.stderr)
                stopped = True
                scope.cancel()
                return

    async def main() -> None:
        with anyio.fail_after(timeout):
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(on_signal, tasks.cancel_scope)
                await measure(work)
                tasks.cancel_scope.cancel()

    handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    previous = {sig: signal.getsignal(sig) for sig in handled}
    try:
        anyio.run(main, backend="asyncio")
    except TimeoutError:
        print(f"(gave up after {timeout:g}s: --timeout)", file=sys.stderr)
        return False
    finally:  # asyncio resets the handlers it used to the defaults, not to what they were
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return not stopped


def fusecsi_command() -> list[str]:
    """The console script next to this interpreter (what a node image runs), else `-m csi`."""
    script = Path(sys.executable).parent / "fusecsi"
    return [os.fspath(script)] if script.exists() else [sys.executable, "-m", "csi"]


def driver_argv(
    work: Path,
    *,
    strategy: str = "hostPath",
    command: str = "node",
    program: Sequence[str] | None = None,
    name: str = "csi",
) -> list[str]:
    """`fusecsi node` with every path below `work`: socket `NAME.sock`, state dir `state/NAME`
    (on the work dir's tmpfs). `program` replaces the fusecsi command."""
    return [
        *(program or fusecsi_command()),
        command,
        "--endpoint",
        f"unix://{work}/{name}.sock",
        "--node-id",
        "bench-node",
        "--root",
        f"default={work}/data",
        "--allowed-target-dir",
        f"{work}/mnt",
        "--state-dir",
        f"{work}/state/{name}",
        "--default-strategy",
        strategy,
    ]


def stop_process(process: subprocess.Popen[bytes], timeout: float = 25.0) -> None:
    """SIGTERM, wait (the driver drains calls and stops its FUSE children), then SIGKILL."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def wait_for_socket(path: Path, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.is_socket():
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no socket at {path} after {timeout:g}s")
        time.sleep(0.005)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (its own threads, not its children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100): a value that was actually measured."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def ms(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    return f"{seconds * 1000:.3f} ms" if seconds < 0.0001 else f"{seconds * 1000:.2f} ms"


def ratio(value: float, base: float | None) -> str:
    if not base:
        return "-"
    return f"{value / base:.3f}x" if value < base / 10 else f"{value / base:.2f}x"


def loadavg() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def machine() -> str:
    """The line every figure carries: when, where, and how busy the machine was."""
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"{now}, {os.cpu_count()} vCPU, {os.uname().release}, load average {loadavg()}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table (readable as printed, pasteable into docs/benchmarks.md)."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])


def cluster_kubectl(*fresh_namespaces: str) -> Kubectl | None:
    """kubectl for the local cluster (KUBECONFIG, KUBECTL), with `fresh_namespaces` deleted and
    created anew; None, after saying so, when there is no cluster (the benchmark skips)."""
    from e2e.tests.kube import Kubectl  # the cluster benchmarks run from the repository root

    kubeconfig = os.environ.get("KUBECONFIG", "")
    if not kubeconfig or not Path(kubeconfig).exists():
        print("skipped: no cluster (run e2e/deploy.sh and set KUBECONFIG)")
        return None
    kubectl = Kubectl(kubeconfig, binary=os.environ.get("KUBECTL", "kubectl"))
    for namespace in fresh_namespaces:
        kubectl.run("delete", "namespace", namespace, "--ignore-not-found", "--wait=true")
        kubectl.run("create", "namespace", namespace)
    return kubectl
