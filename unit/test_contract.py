"""The built-in strategies run the same contract suite a strategy author would use."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from strategies.base import Publication, Strategy
from strategies.hostpath import HostPathStrategy
from strategies.inprocess.strategy import InprocessStrategy
from strategies.system import mounts
from unit.harness import ContractEnv, StrategyContract


def _pids_with(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if text in cmdline:
                pids.append(int(entry.name))
    return pids


@pytest.mark.skipif(
    shutil.which("bindfs") is None, reason="needs bindfs (hack/bootstrap.sh installs it)"
)
class TestHostPath(StrategyContract):
    """The root is a real FUSE mount (bindfs), as a shared filesystem mounted on the node is."""

    def prepare_root(self, env: ContractEnv) -> None:
        backing = env.tmp / "backing"
        backing.mkdir()
        subprocess.run(["bindfs", os.fspath(backing), os.fspath(env.root)], check=True)

    def release_root(self, env: ContractEnv) -> None:
        mounts.unmount(env.root, detach=True)

    def make_strategy(self, env: ContractEnv) -> Strategy[Any]:
        return HostPathStrategy(env.roots, require_mounted_roots=True)

    def volume_parameters(self, env: ContractEnv) -> dict[str, str]:
        return {"path": "vol"}

    async def break_volume(self, env: ContractEnv, publication: Publication[Any]) -> None:
        for pid in _pids_with(f"bindfs {env.tmp}/backing"):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while mounts.probe(publication.target) is None and time.monotonic() < deadline:
            time.sleep(0.05)


class TestInprocess(StrategyContract):
    heals_broken_mounts = True

    def make_strategy(self, env: ContractEnv) -> Strategy[Any]:
        return InprocessStrategy(
            env.roots,
            env.volumes,
            state_dir=env.state_dir / "inprocess",
            fuse_command=(sys.executable, "-m", "csi", "fuse"),
            start_timeout=15.0,
        )

    def volume_parameters(self, env: ContractEnv) -> dict[str, str]:
        return {"path": "vol", "capacity": "1Gi"}

    async def break_volume(self, env: ContractEnv, publication: Publication[Any]) -> None:
        pids = _pids_with(f"csi fuse {env.volume_dir}")
        assert pids, "no FUSE session process found"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)


@pytest.mark.anyio
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount(2))")
async def test_hostpath_refuses_a_root_that_is_not_mounted(tmp_path: Path) -> None:
    """With require_mounted_roots, a dead host mount never turns into the node's local disk."""
    from strategies.base import Secrets
    from strategies.errors import FailedPrecondition
    from strategies.params import Parameters
    from strategies.volumes import Roots

    root = tmp_path / "root"
    (root / "vol").mkdir(parents=True)
    target = tmp_path / "target"
    target.mkdir()
    strategy = HostPathStrategy(Roots({"default": root}), require_mounted_roots=True)
    params = Parameters({"path": "vol"}, known=strategy.parameters, where="volume_context")
    publication = Publication(
        volume_id="default/vol",
        target=target,
        strategy="hostPath",
        parameters=dict(params),
        readonly=False,
        mount_flags=(),
        spec=strategy.parse(params),
    )
    with pytest.raises(FailedPrecondition, match="is not a mount point on this node"):
        await strategy.publish(publication, Secrets())
    assert mounts.mounted_at(target) is None
