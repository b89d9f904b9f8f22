"""The Controller service: directory volumes, pathPattern, onDelete, expansion, validation."""

from __future__ import annotations

import json
import os
from pathlib import Path

import anyio
import pytest
from grpclib.const import Status

from protos.csi import v1 as csi
from unit.conftest import DriverHandle, needs_root
from unit.test_node_service import expect_status

pytestmark = pytest.mark.anyio

PVC_METADATA = {
    "csi.storage.k8s.io/pvc/name": "data",
    "csi.storage.k8s.io/pvc/namespace": "team-a",
    "csi.storage.k8s.io/pv/name": "pvc-1234",
}


def create_request(
    cap: csi.VolumeCapability, name: str = "pvc-1234", size: int = 1 << 30, **params: str
) -> csi.CreateVolumeRequest:
    return csi.CreateVolumeRequest(
        name=name,
        capacity_range=csi.CapacityRange(required_bytes=size),
        volume_capabilities=[cap],
        parameters={"strategy": "inprocess", **params},
    )


async def test_create_makes_a_directory_and_a_record(
    driver: DriverHandle, mount_capability: csi.VolumeCapability
) -> None:
    response = await driver.controller.create_volume(create_request(mount_capability))
    volume = response.volume
    assert volume.volume_id == "default/pvc-1234"
    assert volume.capacity_bytes == 1 << 30
    assert volume.volume_context == {"strategy": "inprocess", "root": "default", "path": "pvc-1234"}
    assert (driver.data_root / "pvc-1234").is_dir()
    record = json.loads((driver.data_root / ".fusecsi" / "volumes" / "pvc-1234.json").read_text())
    assert record["capacityBytes"] == 1 << 30
    assert record["onDelete"] == "delete"


async def test_create_is_idempotent_and_conflicting_sizes_already_exist(
    driver: DriverHandle, mount_capability: csi.VolumeCapability
) -> None:
    first = await driver.controller.create_volume(create_request(mount_capability))
    again = await driver.controller.create_volume(create_request(mount_capability))
    assert again.volume == first.volume
    await expect_status(
        driver.controller.create_volume(create_request(mount_capability, size=2 << 30)),
        Status.ALREADY_EXISTS,
        "pvc-1234",
    )


async def test_path_pattern_uses_the_pvc_metadata(
    driver: DriverHandle, mount_capability: csi.VolumeCapability
) -> None:
    request = create_request(mount_capability, pathPattern="${pvc.namespace}/${pvc.name}")
    request.parameters.update(PVC_METADATA)
    response = await driver.controller.create_volume(request)
    assert response.volume.volume_context["path"] == "team-a/data"
    assert "pathPattern" not in response.volume.volume_context
    assert (driver.data_root / "team-a" / "data").is_dir()


async def test_path_pattern_without_metadata_says_how_to_fix_it(
    driver: DriverHandle, mount_capability: csi.VolumeCapability
) -> None:
    request = create_request(mount_capability, pathPattern="${pvc.namespace}/${pvc.name}")
    await expect_status(
        driver.controller.create_volume(request),
        Status.INVALID_ARGUMENT,
        "parameters.pathPattern",
        "--extra-create-metadata",
    )
    request = create_request(mount_capability, pathPattern="${pvc.owner}")
    await expect_status(
        driver.controller.create_volume(request), Status.INVALID_ARGUMENT, "unknown placeholder"
    )


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"strategy": "nope"}, "parameters.strategy"),
        ({"onDelete": "shred"}, "parameters.onDelete"),
        ({"root": "other"}, "parameters.root"),
        ({"colour": "blue"}, "parameters.colour"),
        ({"capacity": "lots"}, "parameters.capacity"),
        ({"path": "fixed"}, "parameters.path"),
    ],
)
async def test_bad_storage_class_parameters_fail_at_create(
    driver: DriverHandle, mount_capability: csi.VolumeCapability, params: dict[str, str], field: str
) -> None:
    await expect_status(
        driver.controller.create_volume(create_request(mount_capability, **params)),
        Status.INVALID_ARGUMENT,
        field,
    )
    assert not (driver.data_root / "pvc-1234").exists()


async def test_on_delete_policies(
    driver: DriverHandle, mount_capability: csi.VolumeCapability
) -> None:
    for name, policy in (("gone", "delete"), ("kept", "retain"), ("boxed", "archive")):
        volume = (
            await driver.controller.create_volume(
                create_request(mount_capability, name=name, onDelete=policy)
            )
        ).volume
        (driver.data_root / name / "file").write_text(policy)
        await driver.controller.delete_volume(csi.DeleteVolumeRequest(volume_id=volume.volume_id))
        await driver.controller.delete_volume(
            csi.DeleteVolumeRequest(volume_id=volume.volume_id)
        )  # idempotent
    assert not (driver.data_root / "gone").exists()
    assert (driver.data_root / "kept" / "file").read_text() == "retain"
    assert not (driver.data_root / "boxed").exists()
    archived = list((driver.data_root / ".fusecsi" / "archive").iterdir())
    assert len(archived) == 1 and archived[0].name.startswith("boxed-")
    assert (archived[0] / "file").read_text() == "archive"
    assert not list((driver.data_root / ".fusecsi" / "volumes").glob("*.json"))


async def test_delete_of_an_unknown_volume_succeeds(driver: DriverHandle) -> None:
    await driver.controller.delete_volume(csi.DeleteVolumeRequest(volume_id="default/never-made"))
    await driver.controller.delete_volume(csi.DeleteVolumeRequest(volume_id="not-ours"))


async def test_expand_updates_the_recorded_capacity(
    driver: DriverHandle, mount_capability: csi.VolumeCapability
) -> None:
    volume = (await driver.controller.create_volume(create_request(mount_capability))).volume
    response = await driver.controller.controller_expand_volume(
        csi.ControllerExpandVolumeRequest(
            volume_id=volume.volume_id, capacity_range=csi.CapacityRange(required_bytes=3 << 30)
        )
    )
    assert response.capacity_bytes == 3 << 30
    assert response.node_expansion_required
    record = json.loads((driver.data_root / ".fusecsi" / "volumes" / "pvc-1234.json").read_text())
    assert record["capacityBytes"] == 3 << 30
    await expect_status(
        driver.controller.controller_expand_volume(
            csi.ControllerExpandVolumeRequest(
                volume_id="default/nope", capacity_range=csi.CapacityRange(required_bytes=1)
            )
        ),
        Status.NOT_FOUND,
    )


async def test_long_names_make_ids_within_128_bytes(
    driver: DriverHandle, mount_capability: csi.VolumeCapability
) -> None:
    name = "n" * 128
    volume = (
        await driver.controller.create_volume(create_request(mount_capability, name=name))
    ).volume
    assert len(volume.volume_id) <= 128
    assert (driver.data_root / name).is_dir()
    await driver.controller.delete_volume(csi.DeleteVolumeRequest(volume_id=volume.volume_id))
    assert not (driver.data_root / name).exists()


async def test_validate_confirms_mount_capabilities_of_known_volumes(
    driver: DriverHandle, mount_capability: csi.VolumeCapability
) -> None:
    volume = (await driver.controller.create_volume(create_request(mount_capability))).volume
    response = await driver.controller.validate_volume_capabilities(
        csi.ValidateVolumeCapabilitiesRequest(
            volume_id=volume.volume_id, volume_capabilities=[mount_capability]
        )
    )
    assert response.confirmed.volume_capabilities == [mount_capability]
    await expect_status(
        driver.controller.validate_volume_capabilities(
            csi.ValidateVolumeCapabilitiesRequest(
                volume_id="default/x", volume_capabilities=[mount_capability]
            )
        ),
        Status.NOT_FOUND,
    )


async def test_snapshots_and_clones_are_refused(
    driver: DriverHandle, mount_capability: csi.VolumeCapability
) -> None:
    request = create_request(mount_capability)
    request.volume_content_source = csi.VolumeContentSource(
        volume=csi.VolumeContentSourceVolumeSource(volume_id="default/a")
    )
    await expect_status(
        driver.controller.create_volume(request), Status.INVALID_ARGUMENT, "volume_content_source"
    )


@needs_root
async def test_expansion_reaches_df_in_an_inprocess_mount(
    driver: DriverHandle, mount_capability: csi.VolumeCapability
) -> None:
    volume = (
        await driver.controller.create_volume(create_request(mount_capability, size=64 << 20))
    ).volume
    target = driver.target()
    await driver.node.node_publish_volume(
        csi.NodePublishVolumeRequest(
            volume_id=volume.volume_id,
            target_path=target,
            volume_capability=mount_capability,
            volume_context=volume.volume_context,
        )
    )
    try:
        assert _df_bytes(target) == 64 << 20
        with pytest.raises(OSError, match="No space left"):
            _write_megabytes(Path(target) / "big", 80)
        await driver.controller.controller_expand_volume(
            csi.ControllerExpandVolumeRequest(
                volume_id=volume.volume_id,
                capacity_range=csi.CapacityRange(required_bytes=128 << 20),
            )
        )
        response = await driver.node.node_expand_volume(
            csi.NodeExpandVolumeRequest(
                volume_id=volume.volume_id,
                volume_path=target,
                capacity_range=csi.CapacityRange(required_bytes=128 << 20),
            )
        )
        assert response.capacity_bytes == 128 << 20
        with anyio.fail_after(5):
            while _df_bytes(target) != 128 << 20:
                await anyio.sleep(0.05)
        _write_megabytes(Path(target) / "big", 80)
        stats = await driver.node.node_get_volume_stats(
            csi.NodeGetVolumeStatsRequest(volume_id=volume.volume_id, volume_path=target)
        )
        assert stats.usage[0].total == 128 << 20
        assert stats.usage[0].used >= 80 << 20
    finally:
        await driver.node.node_unpublish_volume(
            csi.NodeUnpublishVolumeRequest(volume_id=volume.volume_id, target_path=target)
        )


def _df_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize


def _write_megabytes(path: Path, count: int) -> None:
    with path.open("wb") as handle:
        for _ in range(count):
            handle.write(b"\0" * (1 << 20))
