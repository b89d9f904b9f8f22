"""The Node service through the real gRPC server: validation, idempotency, restart, secrets."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import anyio
import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from loguru import logger

from csi.driver import run_driver
from csi.settings import Settings
from protos.csi import v1 as csi
from strategies.system import mounts
from unit.conftest import DriverHandle, needs_root

pytestmark = [pytest.mark.anyio, needs_root]

Mode = csi.VolumeCapabilityAccessModeMode


def publish_request(
    driver: DriverHandle, cap: csi.VolumeCapability, *, target: str | None = None, **context: str
) -> csi.NodePublishVolumeRequest:
    return csi.NodePublishVolumeRequest(
        volume_id="default/vol",
        target_path=target or driver.target(),
        volume_capability=cap,
        volume_context={"strategy": "hostPath", "path": "vol", **context},
    )


async def expect_status(call: object, status: Status, *words: str) -> str:
    with pytest.raises(GRPCError) as caught:
        await call  # type: ignore[misc]
    assert caught.value.status == status, caught.value.message
    for word in words:
        assert word in (caught.value.message or ""), caught.value.message
    return caught.value.message or ""


@pytest.fixture
def volume_dir(driver: DriverHandle) -> Path:
    path = driver.data_root / "vol"
    path.mkdir()
    return path


async def test_missing_fields_are_rejected_naming_the_field(
    driver: DriverHandle, mount_capability: csi.VolumeCapability
) -> None:
    request = publish_request(driver, mount_capability)
    request.volume_id = ""
    await expect_status(
        driver.node.node_publish_volume(request), Status.INVALID_ARGUMENT, "volume_id"
    )
    request = publish_request(driver, mount_capability, target="")
    request.target_path = ""
    await expect_status(
        driver.node.node_publish_volume(request), Status.INVALID_ARGUMENT, "target_path"
    )
    request = publish_request(driver, mount_capability)
    request.volume_capability = csi.VolumeCapability()
    await expect_status(
        driver.node.node_publish_volume(request), Status.INVALID_ARGUMENT, "volume_capability"
    )


async def test_block_volumes_are_refused(driver: DriverHandle) -> None:
    block = csi.VolumeCapability(
        block=csi.VolumeCapabilityBlockVolume(),
        access_mode=csi.VolumeCapabilityAccessMode(mode=Mode.SINGLE_NODE_WRITER),  # type: ignore[arg-type]
    )
    await expect_status(
        driver.node.node_publish_volume(publish_request(driver, block)),
        Status.INVALID_ARGUMENT,
        "volume_capability.block",
        "Filesystem",
    )


async def test_unknown_strategy_lists_the_available_ones(
    driver: DriverHandle, mount_capability: csi.VolumeCapability
) -> None:
    request = publish_request(driver, mount_capability, strategy="nfs")
    await expect_status(
        driver.node.node_publish_volume(request),
        Status.INVALID_ARGUMENT,
        "volume_context.strategy",
        "'nfs'",
        "hostPath",
        "inprocess",
    )


async def test_unknown_parameter_is_named_with_the_known_ones(
    driver: DriverHandle, mount_capability: csi.VolumeCapability
) -> None:
    request = publish_request(driver, mount_capability, subdir="x")
    await expect_status(
        driver.node.node_publish_volume(request),
        Status.INVALID_ARGUMENT,
        "volume_context.subdir",
        "path",
        "root",
    )


@pytest.mark.parametrize(
    ("path", "words"),
    [("../escape", ("'..'",)), ("/etc", ("absolute",)), (".fusecsi/volumes", ("reserved",))],
)
async def test_paths_that_leave_the_root_are_refused(
    driver: DriverHandle, mount_capability: csi.VolumeCapability, path: str, words: tuple[str, ...]
) -> None:
    request = publish_request(driver, mount_capability, path=path)
    await expect_status(
        driver.node.node_publish_volume(request),
        Status.INVALID_ARGUMENT,
        "volume_context.path",
        *words,
    )
    assert not any(
        entry.mount_point.startswith(str(driver.targets)) for entry in mounts.mount_table()
    )


async def test_a_symlink_out_of_the_root_is_refused(
    driver: DriverHandle, mount_capability: csi.VolumeCapability
) -> None:
    (driver.data_root / "sneaky").symlink_to("/etc")
    request = publish_request(driver, mount_capability, path="sneaky")
    await expect_status(
        driver.node.node_publish_volume(request),
        Status.INVALID_ARGUMENT,
        "volume_context.path",
        "outside its root",
    )
    assert mounts.mounted_at(Path(request.target_path)) is None


async def test_unknown_root_is_named(
    driver: DriverHandle, mount_capability: csi.VolumeCapability
) -> None:
    request = publish_request(driver, mount_capability, root="elsewhere")
    await expect_status(
        driver.node.node_publish_volume(request),
        Status.INVALID_ARGUMENT,
        "volume_context.root",
        "default",
    )


async def test_targets_outside_the_allowed_directories_are_refused(
    driver: DriverHandle, mount_capability: csi.VolumeCapability, volume_dir: Path, tmp_path: Path
) -> None:
    request = publish_request(
        driver, mount_capability, target=str(tmp_path / "elsewhere" / "mount")
    )
    await expect_status(
        driver.node.node_publish_volume(request),
        Status.INVALID_ARGUMENT,
        "target_path",
        "outside the allowed",
    )


async def test_a_missing_volume_directory_is_not_found(
    driver: DriverHandle, mount_capability: csi.VolumeCapability
) -> None:
    request = publish_request(driver, mount_capability, path="nothing-here")
    await expect_status(
        driver.node.node_publish_volume(request), Status.NOT_FOUND, "does not exist"
    )


async def test_publish_is_idempotent_and_conflicts_are_already_exists(
    driver: DriverHandle, mount_capability: csi.VolumeCapability, volume_dir: Path
) -> None:
    request = publish_request(driver, mount_capability)
    await driver.node.node_publish_volume(request)
    await driver.node.node_publish_volume(request)
    assert len(mounts.mounts_at(Path(request.target_path))) == 1
    request.readonly = True
    await expect_status(
        driver.node.node_publish_volume(request), Status.ALREADY_EXISTS, "target_path"
    )
    await driver.node.node_unpublish_volume(
        csi.NodeUnpublishVolumeRequest(volume_id="default/vol", target_path=request.target_path)
    )


async def test_concurrent_publishes_of_one_target_mount_once(
    driver: DriverHandle, mount_capability: csi.VolumeCapability, volume_dir: Path
) -> None:
    request = publish_request(driver, mount_capability)
    async with anyio.create_task_group() as tasks:
        for _ in range(8):
            tasks.start_soon(driver.node.node_publish_volume, request)
    assert len(mounts.mounts_at(Path(request.target_path))) == 1


async def test_single_writer_volumes_publish_once(driver: DriverHandle, volume_dir: Path) -> None:
    rwop = csi.VolumeCapability(
        mount=csi.VolumeCapabilityMountVolume(),
        access_mode=csi.VolumeCapabilityAccessMode(mode=Mode.SINGLE_NODE_SINGLE_WRITER),  # type: ignore[arg-type]
    )
    await driver.node.node_publish_volume(publish_request(driver, rwop, target=driver.target("a")))
    await expect_status(
        driver.node.node_publish_volume(publish_request(driver, rwop, target=driver.target("b"))),
        Status.FAILED_PRECONDITION,
        "ReadWriteOncePod",
    )


async def test_unpublish_of_an_unknown_or_missing_target_succeeds(driver: DriverHandle) -> None:
    await driver.node.node_unpublish_volume(
        csi.NodeUnpublishVolumeRequest(volume_id="default/vol", target_path=driver.target("never"))
    )


async def test_unpublish_unmounts_a_target_it_has_no_record_of(
    driver: DriverHandle, volume_dir: Path
) -> None:
    """State lost (a wiped state dir): the mount table is the truth, the target is released."""
    target = Path(driver.target("orphan"))
    target.mkdir(parents=True)
    mounts.bind(volume_dir, target)
    await driver.node.node_unpublish_volume(
        csi.NodeUnpublishVolumeRequest(volume_id="default/vol", target_path=str(target))
    )
    assert mounts.mounted_at(target) is None
    assert not target.exists()


async def test_stats_of_an_unpublished_path_are_not_found(driver: DriverHandle) -> None:
    await expect_status(
        driver.node.node_get_volume_stats(
            csi.NodeGetVolumeStatsRequest(volume_id="default/vol", volume_path=driver.target())
        ),
        Status.NOT_FOUND,
    )


async def test_stats_report_an_abnormal_condition_when_the_filesystem_dies(
    driver: DriverHandle, mount_capability: csi.VolumeCapability, tmp_path: Path
) -> None:
    backing = tmp_path / "backing"
    (backing / "vol").mkdir(parents=True)
    fuse_root = driver.data_root / "fuse"
    fuse_root.mkdir()
    subprocess.run(["bindfs", str(backing), str(fuse_root)], check=True)
    try:
        request = publish_request(driver, mount_capability, path="fuse/vol")
        await driver.node.node_publish_volume(request)
        stats = await driver.node.node_get_volume_stats(
            csi.NodeGetVolumeStatsRequest(volume_id="default/vol", volume_path=request.target_path)
        )
        assert not stats.volume_condition.abnormal
        subprocess.run(["pkill", "-KILL", "-f", f"bindfs {backing}"], check=True)
        with anyio.fail_after(5):
            while not (
                await driver.node.node_get_volume_stats(
                    csi.NodeGetVolumeStatsRequest(
                        volume_id="default/vol", volume_path=request.target_path
                    )
                )
            ).volume_condition.abnormal:
                await anyio.sleep(0.05)
        stats = await driver.node.node_get_volume_stats(
            csi.NodeGetVolumeStatsRequest(volume_id="default/vol", volume_path=request.target_path)
        )
        assert "not connected" in stats.volume_condition.message
        await driver.node.node_unpublish_volume(
            csi.NodeUnpublishVolumeRequest(volume_id="default/vol", target_path=request.target_path)
        )
        assert mounts.mounted_at(Path(request.target_path)) is None
    finally:
        mounts.unmount(fuse_root, detach=True)


async def test_secrets_never_reach_the_log(
    driver: DriverHandle, mount_capability: csi.VolumeCapability, volume_dir: Path
) -> None:
    lines: list[str] = []
    sink = logger.add(lines.append, level="TRACE", format="{message} {extra}")
    try:
        request = publish_request(driver, mount_capability)
        request.secrets = {"password": "hunter2-secret"}
        await driver.node.node_publish_volume(request)
        request.readonly = True
        with pytest.raises(GRPCError):
            await driver.node.node_publish_volume(request)
    finally:
        logger.remove(sink)
    text = "\n".join(lines)
    assert "node_publish_volume" in text
    assert "password" in text  # the key may be shown...
    assert "hunter2-secret" not in text  # ...its value never


async def test_probe_is_ready_once_started(driver: DriverHandle) -> None:
    response = await driver.identity.probe(csi.ProbeRequest())
    assert response.ready is True
    info = await driver.identity.get_plugin_info(csi.GetPluginInfoRequest())
    assert info.name == "csi.fusecsi.io"


async def test_a_restarted_driver_remembers_its_targets(
    driver_settings: Settings, mount_capability: csi.VolumeCapability
) -> None:
    (driver_settings.roots["default"] / "vol").mkdir()
    target = str(driver_settings.allowed_target_dirs[0] / "pod" / "mount")
    request = csi.NodePublishVolumeRequest(
        volume_id="default/vol",
        target_path=target,
        volume_capability=mount_capability,
        volume_context={"strategy": "inprocess", "path": "vol"},
    )
    from grpclib.client import Channel

    for run in range(2):
        async with anyio.create_task_group() as tasks:
            await tasks.start(
                lambda task_status: run_driver(
                    driver_settings, node=True, controller=False, task_status=task_status
                )
            )
            channel = Channel(path=driver_settings.endpoint.removeprefix("unix://"))
            node = csi.NodeStub(channel)
            if run == 0:
                await node.node_publish_volume(request)
                (Path(target) / "file").write_text("kept")
            else:
                # Same arguments: OK, and the volume is served again by the new process.
                await node.node_publish_volume(request)
                assert (Path(target) / "file").read_text() == "kept"
                request.readonly = True
                await expect_status(node.node_publish_volume(request), Status.ALREADY_EXISTS)
                await node.node_unpublish_volume(
                    csi.NodeUnpublishVolumeRequest(volume_id="default/vol", target_path=target)
                )
                assert not any(
                    e.mount_point.startswith(str(driver_settings.state_dir))
                    for e in mounts.mount_table()
                )
            channel.close()
            tasks.cancel_scope.cancel()


async def test_sigterm_lets_a_running_call_finish(tmp_path: Path) -> None:
    """The real process: SIGTERM during a slow call; the call completes, then the socket goes."""
    from csi.calls import CallGate

    gate = CallGate()
    gate.enter()
    async with anyio.create_task_group() as tasks:
        drained: list[bool] = []

        async def drain() -> None:
            drained.append(await gate.drain(2.0))

        tasks.start_soon(drain)
        await anyio.sleep(0.1)
        assert gate.closed and not drained
        with pytest.raises(GRPCError):
            gate.enter()
        gate.leave()
    assert drained == [True]


async def test_the_process_removes_a_stale_socket_and_stops_on_sigterm(tmp_path: Path) -> None:
    socket_path = tmp_path / "csi.sock"
    socket_path.write_text("stale")
    (tmp_path / "data").mkdir()
    process = await anyio.open_process(
        [
            os.path.join(os.path.dirname(os.sys.executable), "fusecsi"),  # type: ignore[attr-defined]
            "node",
            "--endpoint",
            f"unix://{socket_path}",
            "--root",
            f"default={tmp_path / 'data'}",
            "--state-dir",
            str(tmp_path / "state"),
        ]
    )
    from grpclib.client import Channel

    try:
        with anyio.fail_after(10):
            while True:
                channel = Channel(path=str(socket_path))
                try:
                    if (await csi.IdentityStub(channel).probe(csi.ProbeRequest())).ready:
                        break
                except (OSError, GRPCError):
                    pass
                finally:
                    channel.close()
                await anyio.sleep(0.1)
            process.send_signal(signal.SIGTERM)
            assert await process.wait() == 0
        assert not socket_path.exists()
    finally:
        if process.returncode is None:
            process.kill()
        await process.aclose()
