"""hostPath: the filesystem is already mounted on every node; bind its subdirectory into pods.

The cheapest strategy: no client to run, a publish is one bind mount. What it cannot do is
enforce a capacity (the host mount belongs to whoever mounted it) or heal the host mount.
With `require_mounted_roots` it refuses to publish from a root that is not a mount point, so a
node whose host mount died does not silently hand pods its local disk.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from anyio.abc import TaskGroup
from loguru import logger

from strategies.base import Publication, Secrets, Strategy, VolumeStats
from strategies.errors import FailedPrecondition
from strategies.params import Parameters
from strategies.system import mounts
from strategies.system.blocking import run_blocking
from strategies.system.paths import resolve_inside
from strategies.system.targets import (
    bind_blocking,
    bind_flags,
    check_directory_blocking,
    filesystem_stats,
    release_target,
)
from strategies.volumes import Location, Roots


@dataclass(frozen=True, slots=True)
class HostPathSpec:
    location: Location


class HostPathStrategy(Strategy[HostPathSpec]):
    name = "hostPath"
    parameters = {
        "root": "name of an allowed root (driver setting --root NAME=PATH); default: `default`",
        "path": "directory of the volume, relative to the root; default: the root itself",
    }

    def __init__(self, roots: Roots, *, require_mounted_roots: bool) -> None:
        self.roots = roots
        self.require_mounted_roots = require_mounted_roots

    def parse(self, params: Parameters) -> HostPathSpec:
        return HostPathSpec(self.roots.locate(params))

    async def start(
        self, publications: Sequence[Publication[HostPathSpec]], tasks: TaskGroup
    ) -> None:
        # A bind mount survives the node plugin; nothing to take over.
        logger.info("hostPath: {} target(s) already published", len(publications))

    def ready(self) -> bool:
        return True

    async def publish(self, publication: Publication[HostPathSpec], secrets: Secrets) -> None:
        # The steps share one thread hop: each hop costs two wake-ups, which on a busy node
        # is most of a publish's time after gRPC itself.
        await run_blocking(
            f"bind mount at {publication.target}", self._publish_blocking, publication
        )

    def _publish_blocking(self, publication: Publication[HostPathSpec]) -> None:
        """Check the root and the volume directory, then bind it (blocking, in one thread)."""
        location = publication.spec.location
        if self.require_mounted_roots and mounts.mounted_at(location.root) is None:
            raise FailedPrecondition(
                f"root {location.root_name!r} ({location.root}) is not a mount point on this node: "
                "the shared filesystem is not mounted here"
            )
        source = resolve_inside(location.root, location.path, field="volume_context.path")
        check_directory_blocking(source, "volume directory")
        flags = bind_flags(readonly=publication.readonly, mount_flags=publication.mount_flags)
        bind_blocking(source, publication.target, flags)

    async def unpublish(self, publication: Publication[HostPathSpec]) -> None:
        await release_target(publication.target)

    async def stats(self, publication: Publication[HostPathSpec]) -> VolumeStats:
        return await filesystem_stats(publication.target)

    async def expand(self, publication: Publication[HostPathSpec], capacity_bytes: int) -> None:
        # The host mount's size is not ours to change; the new capacity is recorded by the
        # controller and reported, not enforced (see docs/strategies/hostpath.md).
        return None
