from __future__ import annotations

import os

import pytest

from protos.csi import v1 as csi
from unit.conftest import DriverHandle, needs_root

pytestmark = [pytest.mark.anyio, needs_root]


async def test_publish_write_unpublish_hostpath(
    driver: DriverHandle, mount_capability: csi.VolumeCapability
) -> None:
    created = await driver.controller.create_volume(
        csi.CreateVolumeRequest(
            name="pv-1", volume_capabilities=[mount_capability], parameters={"strategy": "hostPath"}
        )
    )
    volume = created.volume
    target = driver.target()
    await driver.node.node_publish_volume(
        csi.NodePublishVolumeRequest(
            volume_id=volume.volume_id,
            target_path=target,
            volume_capability=mount_capability,
            volume_context=volume.volume_context,
        )
    )
    with open(os.path.join(target, "hello"), "w") as handle:
        handle.write("world")
    assert (driver.data_root / "pv-1" / "hello").read_text() == "world"
    await driver.node.node_unpublish_volume(
        csi.NodeUnpublishVolumeRequest(volume_id=volume.volume_id, target_path=target)
    )
    assert not os.path.exists(target)
