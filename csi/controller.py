"""The CSI Controller service: volumes are subdirectories of a root, described by records.

The controller reaches the filesystem the same way the node does: through the admin's roots,
which the controller pod mounts (see docs/architecture.md, "Where the controller works").
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import betterproto

from csi.calls import CallGate, HasGate, rpc
from csi.errors import invalid
from csi.requests import StrategySet, capabilities, required_id
from protos.csi import v1 as csi
from strategies.errors import NotFound, OutOfRange
from strategies.system.locks import KeyedLocks
from strategies.volumes import (
    ON_DELETE_CHOICES,
    VolumeRecord,
    VolumeStore,
    volume_path_from_pattern,
)

CtrlCap = csi.ControllerServiceCapabilityRpcType

# Parameters only the controller reads; they do not travel into the volume context.
CONTROLLER_PARAMETERS = {
    "pathPattern": "directory of a new volume below its root, e.g. ${pvc.namespace}/${pvc.name}",
    "onDelete": "what DeleteVolume does with the directory: delete, retain or archive",
}


class ControllerService(csi.ControllerBase, HasGate):
    def __init__(self, *, strategies: StrategySet, volumes: VolumeStore, gate: CallGate) -> None:
        self.strategies = strategies
        self.volumes = volumes
        self.gate = gate
        self.name_locks = KeyedLocks()

    @rpc
    async def create_volume(self, request: csi.CreateVolumeRequest) -> csi.CreateVolumeResponse:
        name = required_id(request.name, "name")
        capabilities(request.volume_capabilities)
        if betterproto.serialized_on_wire(request.volume_content_source):
            raise invalid("volume_content_source", "snapshots and clones are not supported")
        capacity = _capacity(request.capacity_range)
        parameters = dict(request.parameters)
        pattern = parameters.pop("pathPattern", None)
        on_delete = parameters.pop("onDelete", "delete")
        if on_delete not in ON_DELETE_CHOICES:
            raise invalid(
                "parameters.onDelete",
                f"{on_delete!r} is not one of: {', '.join(ON_DELETE_CHOICES)}",
            )
        strategy, params = self.strategies.select(parameters, "parameters")
        if "path" in params:
            raise invalid(
                "parameters.path", "is for static volumes; use pathPattern in a StorageClass"
            )
        location = self.volumes.roots.locate(params)
        path = (
            volume_path_from_pattern(pattern, request.parameters, field="parameters.pathPattern")
            if pattern
            else location.path / name
        )
        context = {
            **params,
            "strategy": strategy.name,
            "root": location.root_name,
            "path": str(path),
        }
        # Validate the context the node will get, so a bad StorageClass fails here, at the PVC.
        strategy.parse(self.strategies.select(context, "parameters")[1])
        async with self.name_locks.hold(name):
            record = await self.volumes.create(
                name=name,
                location=replace(location, path=path),
                capacity_bytes=capacity,
                on_delete=on_delete,
                context=context,
            )
        return csi.CreateVolumeResponse(volume=_volume(record))

    @rpc
    async def delete_volume(self, request: csi.DeleteVolumeRequest) -> csi.DeleteVolumeResponse:
        volume_id = required_id(request.volume_id)
        async with self.name_locks.hold(volume_id):
            await self.volumes.delete(volume_id)
        return csi.DeleteVolumeResponse()

    @rpc
    async def validate_volume_capabilities(
        self, request: csi.ValidateVolumeCapabilitiesRequest
    ) -> csi.ValidateVolumeCapabilitiesResponse:
        volume_id = required_id(request.volume_id)
        capabilities(request.volume_capabilities)
        record = await self.volumes.get(volume_id)
        if record is None:
            raise NotFound(f"volume {volume_id} does not exist")
        return csi.ValidateVolumeCapabilitiesResponse(
            confirmed=csi.ValidateVolumeCapabilitiesResponseConfirmed(
                volume_context=request.volume_context,
                volume_capabilities=request.volume_capabilities,
                parameters=request.parameters,
            )
        )

    @rpc
    async def controller_expand_volume(
        self, request: csi.ControllerExpandVolumeRequest
    ) -> csi.ControllerExpandVolumeResponse:
        volume_id = required_id(request.volume_id)
        if not betterproto.serialized_on_wire(request.capacity_range):
            raise invalid("capacity_range", "is required")
        capacity = _capacity(request.capacity_range)
        async with self.name_locks.hold(volume_id):
            record = await self.volumes.resize(volume_id, capacity)
        return csi.ControllerExpandVolumeResponse(
            capacity_bytes=record.capacity_bytes, node_expansion_required=True
        )

    @rpc
    async def controller_get_capabilities(
        self, request: csi.ControllerGetCapabilitiesRequest
    ) -> csi.ControllerGetCapabilitiesResponse:
        wanted = (
            CtrlCap.CREATE_DELETE_VOLUME,
            CtrlCap.EXPAND_VOLUME,
            CtrlCap.SINGLE_NODE_MULTI_WRITER,
        )
        return csi.ControllerGetCapabilitiesResponse(
            capabilities=[
                csi.ControllerServiceCapability(rpc=csi.ControllerServiceCapabilityRpc(type=cap))  # type: ignore[arg-type]  # betterproto enums read as int
                for cap in wanted
            ]
        )


def _capacity(capacity_range: csi.CapacityRange) -> int:
    required, limit = capacity_range.required_bytes, capacity_range.limit_bytes
    if required < 0 or limit < 0:
        raise invalid("capacity_range", "must not be negative")
    if limit and required > limit:
        raise OutOfRange(f"capacity_range: required_bytes {required} exceeds limit_bytes {limit}")
    return required or limit


def _volume(record: VolumeRecord) -> csi.Volume:
    context: dict[str, Any] = dict(record.context)
    return csi.Volume(
        volume_id=record.volume_id, capacity_bytes=record.capacity_bytes, volume_context=context
    )
