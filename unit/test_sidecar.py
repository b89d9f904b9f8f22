"""The sidecar strategy: real /dev/fuse fd mounts handed to a real `fusecsi sidecar` process.

The sidecar runs here as a plain child process (kubelet's part, restarting it when it dies, is
played by a thread); it connects to the volume's socket in the pod's emptyDir on the host, as
it does in a pod, receives the fd and serves it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from strategies.base import Publication, Secrets, Strategy
from strategies.errors import FailedPrecondition, InvalidArgument
from strategies.params import Parameters
from strategies.sidecar import contract
from strategies.sidecar.spec import PARAMETERS, PROBE, parse_sidecar_spec, sidecar_container
from strategies.sidecar.strategy import SidecarStrategy
from strategies.system.targets import release_blocking
from strategies.volumes import Roots, VolumeStore
from unit.harness import ContractEnv, StrategyContract


class SidecarRunner:
    """Runs `fusecsi sidecar` for one volume and restarts it when it exits (as kubelet does)."""

    def __init__(self, emptydir: Path, key: str) -> None:
        self.emptydir = emptydir
        self.key = key
        self.process: subprocess.Popen[bytes] | None = None
        self.stopping = False
        self.starts = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping:
            with open(self.emptydir.parent / "sidecar.log", "ab") as log:
                self.process = subprocess.Popen(
                    [sys.executable, "-m", "csi", "sidecar", "--socket", f"{self.key}.sock"],
                    cwd=self.emptydir,  # a relative socket path, as short as in the pod
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                )
            self.starts += 1
            self.process.wait()
            time.sleep(0.2)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)

    def stop(self) -> None:
        self.stopping = True
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.thread.join(timeout=10)


class TestSidecar(StrategyContract):
    heals_broken_mounts = True
    heal_timeout = 20.0

    @pytest.fixture(autouse=True)
    def runners(self, env: ContractEnv) -> Iterator[list[SidecarRunner]]:
        self._runners: list[SidecarRunner] = []
        yield self._runners
        for runner in self._runners:
            runner.stop()

    def make_strategy(self, env: ContractEnv) -> Strategy[Any]:
        return SidecarStrategy(env.volumes)

    def volume_parameters(self, env: ContractEnv) -> dict[str, str]:
        return {"path": "vol", "capacity": "1Gi"}

    async def before_publish(self, env: ContractEnv, publication: Publication[Any]) -> None:
        emptydir = contract.emptydir_on_host(publication.target)
        assert emptydir is not None
        emptydir.mkdir(parents=True, exist_ok=True)

    async def after_publish(self, env: ContractEnv, publication: Publication[Any]) -> None:
        emptydir = contract.emptydir_on_host(publication.target)
        assert emptydir is not None
        key = contract.inline_key(publication.target.parent.name)
        self._runners.append(SidecarRunner(emptydir, key))
        # App containers start after their native sidecars: wait until the mount is served.
        with anyio.fail_after(20):
            await anyio.to_thread.run_sync(os.listdir, publication.target, abandon_on_cancel=True)

    async def break_volume(self, env: ContractEnv, publication: Publication[Any]) -> None:
        runner = next(r for r in self._runners if r.emptydir == contract.emptydir_on_host(
            publication.target))  # fmt: skip
        with anyio.fail_after(10):
            while runner.process is None or runner.starts == 0:
                await anyio.sleep(0.05)
        await anyio.to_thread.run_sync(os.listdir, publication.target)  # served before the kill
        runner.kill()


@pytest.mark.anyio
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount(2))")
async def test_a_pod_without_the_sidecar_gets_a_clear_error(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "vol").mkdir(parents=True)
    target = tmp_path / "pods" / "uid-1" / "volumes" / "kubernetes.io~csi" / "pv" / "mount"
    target.mkdir(parents=True)

    async def expected(namespace: str, pod: str, container: str) -> bool | None:
        return False  # the pod spec has no sidecar: the webhook did not run

    strategy = SidecarStrategy(VolumeStore(Roots({"default": root})), sidecar_expected=expected)
    async with anyio.create_task_group() as tasks:
        await strategy.start([], tasks)
        params = Parameters({"path": "vol"}, known=PARAMETERS, where="volume_context")
        from strategies.base import PodRef

        publication = Publication(
            volume_id="default/vol",
            target=target,
            strategy="sidecar",
            parameters=dict(params),
            readonly=False,
            mount_flags=(),
            spec=strategy.parse(params),
            pod=PodRef("apps", "web", "uid-1"),
        )
        with pytest.raises(FailedPrecondition, match="admission webhook did not inject"):
            await strategy.publish(publication, Secrets())
        tasks.cancel_scope.cancel()


def test_the_sidecar_container_has_no_privilege(tmp_path: Path) -> None:
    spec = parse_sidecar_spec(
        Parameters({"path": "v"}, known=PARAMETERS, where="p"), Roots({"default": tmp_path})
    )
    container = sidecar_container(spec, "abc", "fusecsi.local/fusecsi:1")
    assert container["restartPolicy"] == "Always"
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == 65534
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert "privileged" not in security or security["privileged"] is False


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"client": "nfs"}, "p.client"),
        ({"client": "juicefs", "clientUser": "1:1"}, "p.clientUser"),
        ({"client": "command"}, "p.command"),
        ({"command": "x ${mountpoint}"}, "p.command"),
        ({"client": "juicefs", "mountOptions": "-d"}, "p.mountOptions"),
        ({"clientUser": "0:0"}, "p.clientUser"),
        ({"clientUser": "nobody"}, "p.clientUser"),
        ({"clientResources": "[]"}, "p.clientResources"),
    ],
)
def test_bad_sidecar_parameters_name_their_key(
    params: dict[str, str], field: str, tmp_path: Path
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_sidecar_spec(
            Parameters(params, known=PARAMETERS, where="p"), Roots({"default": tmp_path})
        )
    assert caught.value.field == field


# --- the privileged mode (clients that cannot take an fd) ----------------------------------


def mount_fields(path: Path) -> tuple[str, str] | None:
    """(fstype, optional fields) of the top mount at `path`, from /proc/self/mountinfo."""
    found = None
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        if fields[4] == str(path):
            found = (right.split()[0], " ".join(fields[6:]))
    return found


def run_shell(script: str, *args: str) -> int:
    return subprocess.run(["sh", "-c", script, "fusecsi-test", *args], check=False).returncode


class PrivilegedPod:
    """A pod's directories on the host: its emptyDir (tmpfs, as the webhook asks) and a target."""

    def __init__(self, base: Path, *, tmpfs: bool = True) -> None:
        self.target = base / "pods" / "uid-7" / "volumes" / "kubernetes.io~csi" / "pv-7" / "mount"
        self.target.parent.mkdir(parents=True)
        emptydir = contract.emptydir_on_host(self.target)
        assert emptydir is not None
        self.emptydir = emptydir
        emptydir.mkdir(parents=True)
        self.tmpfs = tmpfs
        if tmpfs:
            subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(emptydir)], check=True)
        self.key = contract.inline_key("pv-7")
        self.app_view = base / "app-view"
        """What an app container with HostToContainer sees: a slave bind of the target."""

    def close(self) -> None:
        if self.tmpfs:
            subprocess.run(["umount", "-l", str(self.emptydir)], check=False, capture_output=True)

    def publication(
        self, strategy: SidecarStrategy, values: dict[str, str], *, readonly: bool = False
    ) -> Publication[Any]:
        params = Parameters(values, known=PARAMETERS, where="volume_context")
        return Publication(
            volume_id="default/pv-7",
            target=self.target,
            strategy="sidecar",
            parameters=dict(params),
            readonly=readonly,
            mount_flags=(),
            spec=strategy.parse(params),
        )

    def sidecar_command(self, spec: Any, stage: Path) -> list[str]:
        """The injected container's command, with its in-pod paths mapped to the host's: the
        emptyDir is the pod's (Bidirectional: the same mount), the stage a directory of the
        container's own (a new one for each container start, as a restart has a fresh rootfs)."""
        container = sidecar_container(spec, self.key, "")
        mapping = {
            str(contract.EMPTYDIR_MOUNT): str(self.emptydir),
            str(contract.stage_in_pod(self.key)): str(stage),
        }
        command: list[str] = []
        for word in container["command"]:
            for pod_path, host_path in mapping.items():
                word = word.replace(pod_path, host_path)
            command.append(word)
        return command


@pytest.fixture(params=["private", "shared"])
def privileged_pod(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[PrivilegedPod]:
    """A pod directory on a private mount, or on a shared one as kubelet's directory is."""
    pods = tmp_path / "pods"
    if request.param == "shared":
        pods.mkdir()
        subprocess.run(["mount", "--bind", str(pods), str(pods)], check=True)
        subprocess.run(["mount", "--make-shared", str(pods)], check=True)
    pod = PrivilegedPod(tmp_path)
    yield pod
    # Every mount stacked there, dead ones too, even on failure.
    for path in (pod.app_view, pod.target, pod.emptydir / contract.volume_dir_name(pod.key)):
        release_blocking(path)
    for stage in (tmp_path / "stages").glob("*"):
        release_blocking(stage)
    pod.close()
    if request.param == "shared":
        subprocess.run(["umount", "-R", "-l", str(pods)], check=False, capture_output=True)


def command_volume(tmp_path: Path) -> dict[str, str]:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    return {
        "client": "command",
        "command": f"{sys.executable} -m csi fuse ${{source}} ${{mountpoint}}",
        "source": str(data),
    }


def start_sidecar(command: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(command, stderr=subprocess.DEVNULL, start_new_session=True)


def client_of(sidecar: subprocess.Popen[bytes]) -> int:
    """The client: the wrapper's child."""
    children = Path(f"/proc/{sidecar.pid}/task/{sidecar.pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def is_fuse(fields: tuple[str, str] | None) -> bool:
    return fields is not None and fields[0].startswith("fuse")


def wait_served(target: Path, timeout: float = 20) -> None:
    """What the startup probe does before kubelet starts the app containers."""
    deadline = time.monotonic() + timeout
    while run_shell(PROBE, str(target)) != 0:
        assert time.monotonic() < deadline, f"no FUSE mount at {target}: {mount_fields(target)}"
        time.sleep(0.1)


@pytest.mark.anyio
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount(2))")
async def test_a_privileged_sidecar_mounts_with_the_credentials_the_plugin_left(
    tmp_path: Path, privileged_pod: PrivilegedPod
) -> None:
    strategy = SidecarStrategy(VolumeStore(Roots({"default": tmp_path})))
    publication = privileged_pod.publication(strategy, command_volume(tmp_path))
    async with anyio.create_task_group() as tasks:
        await strategy.start([], tasks)
        await strategy.publish(publication, Secrets({"api-token": "s3cr3t value"}))
        await strategy.publish(publication, Secrets({"api-token": "s3cr3t value"}))  # again

        env_file = privileged_pod.emptydir / contract.env_file_name(privileged_pod.key)
        assert os.stat(env_file).st_mode & 0o777 == 0o600
        assert "export API_TOKEN='s3cr3t value'" in env_file.read_text()
        # The target is a bind of the emptyDir's volume directory (a peer: the emptyDir is shared).
        fields = mount_fields(privileged_pod.target)
        assert fields is not None and fields[0] == "tmpfs" and "shared:" in fields[1], fields
        assert run_shell(PROBE, str(privileged_pod.target)) != 0  # not served yet

        stages = tmp_path / "stages"
        starts = iter(range(1, 100))

        def start() -> subprocess.Popen[bytes]:
            stage = stages / str(next(starts))
            stage.mkdir(parents=True)
            return start_sidecar(privileged_pod.sidecar_command(publication.spec, stage))

        app = privileged_pod.app_view
        sidecar = start()
        try:
            await anyio.to_thread.run_sync(wait_served, privileged_pod.target)
            client = client_of(sidecar)
            environ = Path(f"/proc/{client}/environ").read_bytes().split(b"\0")
            assert b"API_TOKEN=s3cr3t value" in environ  # the client got it through env ...
            assert b"s3cr3t" not in Path(f"/proc/{client}/cmdline").read_bytes()  # only
            (privileged_pod.target / "hello").write_text("through the client")
            assert (tmp_path / "data" / "hello").read_text() == "through the client"
            # An app container that mounts the volume with HostToContainer, started now.
            app.mkdir()
            subprocess.run(["mount", "--bind", str(privileged_pod.target), str(app)], check=True)
            subprocess.run(["mount", "--make-slave", str(app)], check=True)
            assert (app / "hello").read_text() == "through the client"

            # The client dies; kubelet starts the container again (its mounts are alive: the
            # emptyDir), whose client's mount is stacked on the dead one: the app reads again.
            os.kill(client, signal.SIGKILL)
            assert sidecar.wait(timeout=10) != 0
            with pytest.raises(OSError):
                os.listdir(app)
            assert run_shell(PROBE, str(privileged_pod.target)) != 0  # not fooled by the cache
            sidecar = start()
            await anyio.to_thread.run_sync(wait_served, privileged_pod.target)
            assert (app / "hello").read_text() == "through the client"

            # Killed all at once (wrapper and client): the same.
            os.killpg(sidecar.pid, signal.SIGKILL)
            sidecar.wait(timeout=10)
            with pytest.raises(OSError):
                os.listdir(app)
            sidecar = start()
            await anyio.to_thread.run_sync(wait_served, privileged_pod.target)
            assert (app / "hello").read_text() == "through the client"
            assert (privileged_pod.target / "hello").read_text() == "through the client"
        finally:
            sidecar.terminate()  # as kubelet stops a container: the wrapper passes it on
            sidecar.wait(timeout=10)
        release_blocking(app)  # the app container goes before NodeUnpublishVolume

        await strategy.unpublish(publication)
        assert mount_fields(privileged_pod.target) is None  # every stacked mount, and the bind
        volume_dir = privileged_pod.emptydir / contract.volume_dir_name(privileged_pod.key)
        assert mount_fields(volume_dir) is None  # so that kubelet can unmount the emptyDir
        assert not env_file.exists()
        await strategy.unpublish(publication)  # again: nothing to do
        tasks.cancel_scope.cancel()


@pytest.mark.anyio
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount(2))")
async def test_privileged_publish_refuses_what_it_cannot_honour(tmp_path: Path) -> None:
    strategy = SidecarStrategy(VolumeStore(Roots({"default": tmp_path})))
    on_disk = PrivilegedPod(tmp_path / "disk", tmpfs=False)
    async with anyio.create_task_group() as tasks:
        await strategy.start([], tasks)
        # Credentials are never left on a disk-backed emptyDir.
        publication = on_disk.publication(strategy, command_volume(tmp_path))
        with pytest.raises(FailedPrecondition, match="not memory-backed"):
            await strategy.publish(publication, Secrets({"token": "x"}))
        assert mount_fields(on_disk.target) is None
        assert not list(on_disk.emptydir.iterdir())
        # A read-only volume: command has no way to be told; juicefs has.
        pod = PrivilegedPod(tmp_path / "memory")
        try:
            readonly = pod.publication(strategy, command_volume(tmp_path), readonly=True)
            with pytest.raises(FailedPrecondition, match="cannot be made read-only"):
                await strategy.publish(readonly, Secrets())
            juicefs = pod.publication(
                strategy, {"client": "juicefs", "clientImage": "jfs"}, readonly=True
            )
            with pytest.raises(InvalidArgument) as caught:
                await strategy.publish(juicefs, Secrets({"name": "v"}))
            assert caught.value.field == "secrets.metaurl"
            await strategy.publish(juicefs, Secrets({"name": "v", "metaurl": "redis://db/1"}))
            env_file = pod.emptydir / contract.env_file_name(pod.key)
            text = env_file.read_text()
            assert "export FUSECSI_READ_ONLY=1" in text
            assert "export JFS_METAURL=redis://db/1" in text
            await strategy.unpublish(juicefs)
        finally:
            pod.close()
        tasks.cancel_scope.cancel()
