"""Identity: capabilities tell the truth, Probe follows the strategies' readiness."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import betterproto
import pytest
from anyio.abc import TaskGroup
from grpclib.testing import ChannelFor

from csi.calls import CallGate
from csi.identity import IdentityService
from csi.node import NodeService
from csi.requests import StrategySet
from protos.csi import v1 as csi
from strategies.base import Publication, Secrets, Strategy, VolumeStats
from strategies.params import Parameters
from strategies.publications import PublicationRecords

pytestmark = pytest.mark.anyio


class SlowStarter(Strategy[None]):
    """A fake that is not ready until told (fakes belong in unit/ only)."""

    name = "slow"
    parameters: dict[str, str] = {}
    is_ready = False

    def parse(self, params: Parameters) -> None:
        return None

    async def start(self, publications: Sequence[Publication[None]], tasks: TaskGroup) -> None:
        return None

    def ready(self) -> bool:
        return self.is_ready

    async def publish(self, publication: Publication[None], secrets: Secrets) -> None:
        raise AssertionError("not reached")

    async def unpublish(self, publication: Publication[None]) -> None:
        raise AssertionError("not reached")

    async def stats(self, publication: Publication[None]) -> VolumeStats:
        return VolumeStats()

    async def expand(self, publication: Publication[None], capacity_bytes: int) -> None:
        return None


async def test_probe_is_not_ready_while_a_strategy_is_not(tmp_path: Path) -> None:
    strategy = SlowStarter()
    strategies = StrategySet({"slow": strategy}, "slow")
    gate = CallGate()
    node = NodeService(
        node_id="n",
        strategies=strategies,
        records=PublicationRecords(tmp_path),
        allowed_targets=(tmp_path,),
        gate=gate,
    )
    identity = IdentityService(
        name="csi.test", version="1", controller=False, ready=node.ready, gate=gate
    )
    async with ChannelFor([identity]) as channel:
        stub = csi.IdentityStub(channel)
        assert (await stub.probe(csi.ProbeRequest())).ready is False
        strategy.is_ready = True
        assert (await stub.probe(csi.ProbeRequest())).ready is True
        caps = await stub.get_plugin_capabilities(csi.GetPluginCapabilitiesRequest())
        kinds: list[Any] = [betterproto.which_one_of(c, "type")[0] for c in caps.capabilities]
        assert kinds == ["volume_expansion"]  # node-only: no CONTROLLER_SERVICE
