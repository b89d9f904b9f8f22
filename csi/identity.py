"""The CSI Identity service: who we are, what we can do, whether we are ready."""

from __future__ import annotations

from collections.abc import Callable

from csi.calls import CallGate, HasGate, rpc
from protos.csi import v1 as csi

PluginCap = csi.PluginCapabilityServiceType


class IdentityService(csi.IdentityBase, HasGate):
    def __init__(
        self,
        *,
        name: str,
        version: str,
        controller: bool,
        ready: Callable[[], bool],
        gate: CallGate,
    ) -> None:
        self.name = name
        self.version = version
        self.controller = controller
        self.is_ready = ready
        self.gate = gate

    @rpc
    async def get_plugin_info(self, request: csi.GetPluginInfoRequest) -> csi.GetPluginInfoResponse:
        return csi.GetPluginInfoResponse(name=self.name, vendor_version=self.version)

    @rpc
    async def get_plugin_capabilities(
        self, request: csi.GetPluginCapabilitiesRequest
    ) -> csi.GetPluginCapabilitiesResponse:
        caps = [
            csi.PluginCapability(
                volume_expansion=csi.PluginCapabilityVolumeExpansion(
                    type=csi.PluginCapabilityVolumeExpansionType.ONLINE  # type: ignore[arg-type]  # betterproto enums read as int
                )
            )
        ]
        if self.controller:
            caps.append(
                csi.PluginCapability(
                    service=csi.PluginCapabilityService(type=PluginCap.CONTROLLER_SERVICE)  # type: ignore[arg-type]  # betterproto enums read as int
                )
            )
        return csi.GetPluginCapabilitiesResponse(capabilities=caps)

    @rpc
    async def probe(self, request: csi.ProbeRequest) -> csi.ProbeResponse:
        return csi.ProbeResponse(ready=self.is_ready())
