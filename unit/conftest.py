"""Shared fixtures: a real driver on a real unix socket, talked to by the generated CSI stubs."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
from grpclib.client import Channel

from csi.driver import run_driver
from csi.settings import Settings
from protos.csi import v1 as csi
from strategies.system import mounts

ROOT_REASON = "needs root (mount(2)) and /dev/fuse: run the unit tests as root"
needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason=ROOT_REASON
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class DriverHandle:
    """A running driver and typed clients for its three services."""

    settings: Settings
    identity: csi.IdentityStub
    node: csi.NodeStub
    controller: csi.ControllerStub
    data_root: Path
    targets: Path

    def target(self, name: str = "target") -> str:
        return os.fspath(self.targets / name / "mount")


@pytest.fixture
def driver_settings(tmp_path: Path) -> Settings:
    data_root = tmp_path / "data"
    data_root.mkdir()
    targets = tmp_path / "pods"
    targets.mkdir()
    return Settings(
        endpoint=f"unix://{tmp_path}/csi.sock",
        node_id="node-1",
        roots={"default": data_root},
        allowed_target_dirs=(targets,),
        state_dir=tmp_path / "state",
        fuse_start_timeout=15.0,
        shutdown_grace=2.0,
    )


@pytest.fixture
async def driver(driver_settings: Settings) -> AsyncIterator[DriverHandle]:
    settings = driver_settings
    async with anyio.create_task_group() as tasks:
        await tasks.start(
            lambda task_status: run_driver(
                settings, node=True, controller=True, task_status=task_status
            )
        )
        channel = Channel(path=settings.endpoint.removeprefix("unix://"))
        try:
            yield DriverHandle(
                settings=settings,
                identity=csi.IdentityStub(channel),
                node=csi.NodeStub(channel),
                controller=csi.ControllerStub(channel),
                data_root=settings.roots["default"],
                targets=settings.allowed_target_dirs[0],
            )
        finally:
            channel.close()
            tasks.cancel_scope.cancel()
    release_mounts_below(
        settings.allowed_target_dirs[0], settings.state_dir, settings.roots["default"]
    )


def release_mounts_below(*directories: Path) -> None:
    """Detach whatever a test left mounted in its temporary directories (deepest first)."""
    for entry in reversed(mounts.mount_table()):
        point = Path(entry.mount_point)
        if any(point.is_relative_to(directory) for directory in directories):
            mounts.unmount(point, detach=True)


@pytest.fixture
def mount_capability() -> Iterator[csi.VolumeCapability]:
    yield csi.VolumeCapability(
        mount=csi.VolumeCapabilityMountVolume(),
        access_mode=csi.VolumeCapabilityAccessMode(
            mode=csi.VolumeCapabilityAccessModeMode.MULTI_NODE_MULTI_WRITER
        ),
    )
