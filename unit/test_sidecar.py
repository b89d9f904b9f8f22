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
from strategies.sidecar.spec import PARAMETERS, parse_sidecar_spec, sidecar_container
from strategies.sidecar.strategy import SidecarStrategy
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
        ({"client": "juicefs"}, "p.client"),
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
