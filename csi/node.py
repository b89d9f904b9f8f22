"""The CSI Node service: publish and unpublish targets through the strategy that owns them."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

from anyio.abc import TaskGroup
from loguru import logger

from csi.calls import CallGate, HasGate, rpc
from csi.errors import invalid
from csi.requests import StrategySet, capability, required_id, required_path
from protos.csi import v1 as csi
from strategies.base import Publication, Secrets
from strategies.errors import AlreadyExists, FailedPrecondition, FusecsiError, NotFound
from strategies.publications import PublicationRecords
from strategies.system.blocking import run_blocking
from strategies.system.locks import KeyedLocks
from strategies.system.targets import release_target

NodeCap = csi.NodeServiceCapabilityRpcType


class NodeService(csi.NodeBase, HasGate):
    """Publication state lives in `records` (disk) and `published` (memory), keyed by target."""

    def __init__(
        self,
        *,
        node_id: str,
        strategies: StrategySet,
        records: PublicationRecords,
        allowed_targets: tuple[Path, ...],
        gate: CallGate,
    ) -> None:
        self.node_id = node_id
        self.strategies = strategies
        self.records = records
        self.allowed_targets = allowed_targets
        self.gate = gate
        self.published: dict[Path, Publication[Any]] = {}
        self.target_locks = KeyedLocks()

    async def start(self, tasks: TaskGroup) -> None:
        """Reload the records of a previous run and let each strategy take its targets over."""
        raw = await run_blocking("loading publication records", self.records.load)
        for record in raw:
            try:
                publication = self.strategies.from_record(record)
            except FusecsiError as exc:
                # Kept on disk: NodeUnpublish still cleans the target up by its mount alone.
                logger.error("cannot take over target {}: {}", record.get("target"), exc)
                continue
            self.published[publication.target] = publication
        for strategy in self.strategies:
            owned = [p for p in self.published.values() if p.strategy == strategy.name]
            await strategy.start(owned, tasks)

    def ready(self) -> bool:
        return all(strategy.ready() for strategy in self.strategies)

    @rpc
    async def node_publish_volume(
        self, request: csi.NodePublishVolumeRequest
    ) -> csi.NodePublishVolumeResponse:
        volume_id = required_id(request.volume_id)
        target = required_path(request.target_path, self.allowed_targets, "target_path")
        cap = capability(request.volume_capability)
        publication = self.strategies.publication(
            volume_id=volume_id,
            target=target,
            context=request.volume_context,
            readonly=request.readonly or cap.read_only_mode,
            mount_flags=cap.mount_flags,
            single_writer=cap.single_writer,
        )
        secrets = Secrets(request.secrets)
        async with self.target_locks.hold(target):
            existing = self.published.get(target)
            if existing is not None and not existing.same_request(publication):
                raise AlreadyExists(
                    f"target_path {target} already holds volume {existing.volume_id} "
                    "with other parameters; unpublish it first"
                )
            self._check_single_writer(publication)
            record = publication.to_json() if existing is None else None
            await run_blocking(f"creating {target}", self._prepare_target, target, record)
            if existing is None:
                self.published[target] = publication
            strategy = self.strategies.by_name[publication.strategy]
            try:
                await strategy.publish(publication, secrets)
            except Exception:
                if existing is None:
                    self.published.pop(target, None)
                    await run_blocking(f"forgetting {target}", self.records.remove, target)
                raise
        return csi.NodePublishVolumeResponse()

    @rpc
    async def node_unpublish_volume(
        self, request: csi.NodeUnpublishVolumeRequest
    ) -> csi.NodeUnpublishVolumeResponse:
        volume_id = required_id(request.volume_id)
        target = required_path(request.target_path, self.allowed_targets, "target_path")
        async with self.target_locks.hold(target):
            publication = self.published.get(target)
            if publication is not None and publication.volume_id != volume_id:
                raise NotFound(
                    f"target_path {target} holds volume {publication.volume_id}, not {volume_id}"
                )
            if publication is not None:
                await self.strategies.by_name[publication.strategy].unpublish(publication)
            else:
                # Not ours by record (state lost, or never published): unmount what is there.
                await release_target(target)
            await run_blocking(f"removing {target}", self._forget_target, target)
            self.published.pop(target, None)
        return csi.NodeUnpublishVolumeResponse()

    # Each of these runs in one worker thread: a thread hop costs two wake-ups, so a call's
    # filesystem steps are batched rather than sent to a thread one by one.

    def _prepare_target(self, target: Path, record_json: str | None) -> None:
        """Create the target directory, then record the publication (unless already recorded)."""
        _make_target(target)
        if record_json is not None:
            self.records.save(target, record_json)

    def _forget_target(self, target: Path) -> None:
        """Remove the unmounted target directory, then its record."""
        _remove_target(target)
        self.records.remove(target)

    def _check_single_writer(self, publication: Publication[Any]) -> None:
        """A ReadWriteOncePod volume is published at one target at a time, on this node."""
        for other in self.published.values():
            shared = other.volume_id == publication.volume_id and other.target != publication.target
            if shared and (publication.single_writer or other.single_writer):
                raise FailedPrecondition(
                    f"volume {publication.volume_id} is single-writer (ReadWriteOncePod) and "
                    f"already published at {other.target}"
                )

    def _publication_at(self, volume_id: str, path: Path) -> Publication[Any]:
        publication = self.published.get(path)
        if publication is None or publication.volume_id != volume_id:
            raise NotFound(f"volume {volume_id} is not published at {path}")
        return publication

    @rpc
    async def node_get_volume_stats(
        self, request: csi.NodeGetVolumeStatsRequest
    ) -> csi.NodeGetVolumeStatsResponse:
        volume_id = required_id(request.volume_id)
        path = Path(required_id(request.volume_path, "volume_path"))
        publication = self._publication_at(volume_id, path)
        stats = await self.strategies.by_name[publication.strategy].stats(publication)
        unit = csi.VolumeUsageUnit
        return csi.NodeGetVolumeStatsResponse(
            usage=[
                csi.VolumeUsage(
                    unit=unit.BYTES,  # type: ignore[arg-type]  # betterproto enums read as int
                    total=stats.total_bytes,
                    used=stats.used_bytes,
                    available=stats.available_bytes,
                ),
                csi.VolumeUsage(
                    unit=unit.INODES,  # type: ignore[arg-type]  # betterproto enums read as int
                    total=stats.total_inodes,
                    used=stats.used_inodes,
                    available=stats.available_inodes,
                ),
            ],
            volume_condition=csi.VolumeCondition(abnormal=stats.abnormal, message=stats.message),
        )

    @rpc
    async def node_expand_volume(
        self, request: csi.NodeExpandVolumeRequest
    ) -> csi.NodeExpandVolumeResponse:
        volume_id = required_id(request.volume_id)
        path = Path(required_id(request.volume_path, "volume_path"))
        capacity = request.capacity_range.required_bytes or request.capacity_range.limit_bytes
        if capacity < 0:
            raise invalid("capacity_range", "must not be negative")
        publication = self._publication_at(volume_id, path)
        async with self.target_locks.hold(path):
            await self.strategies.by_name[publication.strategy].expand(publication, capacity)
        return csi.NodeExpandVolumeResponse(capacity_bytes=capacity)

    @rpc
    async def node_get_capabilities(
        self, request: csi.NodeGetCapabilitiesRequest
    ) -> csi.NodeGetCapabilitiesResponse:
        wanted = (NodeCap.GET_VOLUME_STATS, NodeCap.VOLUME_CONDITION, NodeCap.EXPAND_VOLUME,
                  NodeCap.SINGLE_NODE_MULTI_WRITER)  # fmt: skip
        return csi.NodeGetCapabilitiesResponse(
            capabilities=[
                csi.NodeServiceCapability(rpc=csi.NodeServiceCapabilityRpc(type=cap))  # type: ignore[arg-type]  # betterproto enums read as int
                for cap in wanted
            ]
        )

    @rpc
    async def node_get_info(self, request: csi.NodeGetInfoRequest) -> csi.NodeGetInfoResponse:
        return csi.NodeGetInfoResponse(node_id=self.node_id)


def _make_target(target: Path) -> None:
    """Create the target directory (kubelet creates its parent; csi-sanity leaves it to us)."""
    try:
        target.mkdir(parents=True)
    except FileExistsError:
        pass
    except OSError as exc:
        # A dead FUSE mount on the target answers ENOTCONN: the strategy replaces it.
        if exc.errno not in (errno.ENOTCONN, errno.EIO):
            raise


def _remove_target(target: Path) -> None:
    """Remove the (now unmounted) target directory; a non-empty one is left with a warning."""
    try:
        os.rmdir(target)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            logger.warning("target {} is not empty after unmount; leaving it in place", target)
        elif exc.errno == errno.ENOTDIR:
            target.unlink()
        else:
            raise
