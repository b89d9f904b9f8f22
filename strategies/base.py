"""The Strategy contract: everything the CSI layer may ask of a way to mount a volume.

Every strategy implements all of it. The CSI layer parses a request once into a `Publication`
(with the strategy's own typed spec), then calls the strategy; it never asks which strategy it
holds. Publications are recorded on disk by the node layer before a strategy mounts anything,
so after a restart each strategy gets back exactly the targets it owns (`start`).
"""

from __future__ import annotations

import abc
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from anyio.abc import TaskGroup

from strategies.params import Parameters

SpecT = TypeVar("SpecT")


class Secrets(Mapping[str, str]):
    """Secret values from the CSI request; never printed, logged or written to disk."""

    def __init__(self, values: Mapping[str, str] | None = None) -> None:
        self._values = dict(values or {})

    def __getitem__(self, key: str) -> str:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Secrets(keys={sorted(self._values)})"

    __str__ = __repr__


@dataclass(frozen=True, slots=True)
class PodRef:
    """The pod a target belongs to, from kubelet's podInfoOnMount keys (absent in csi-sanity)."""

    namespace: str
    name: str
    uid: str
    ephemeral: bool = False
    """An inline (CSI ephemeral) volume of the pod rather than a PVC."""


@dataclass(frozen=True, kw_only=True)
class Publication(Generic[SpecT]):
    """One volume published at one target, as NodePublishVolume asked for it.

    `parameters` is the volume context without Kubernetes' reserved keys; `spec` is what the
    owning strategy parsed from it. Equality of two publications (ignoring the pod) is the CSI
    notion of "the same arguments" for idempotent republishing.
    """

    volume_id: str
    target: Path
    strategy: str
    parameters: Mapping[str, str]
    readonly: bool
    mount_flags: tuple[str, ...]
    spec: SpecT = field(compare=False)
    single_writer: bool = False
    """ReadWriteOncePod (SINGLE_NODE_SINGLE_WRITER): no other target may hold the volume."""
    pod: PodRef | None = field(default=None, compare=False)

    def same_request(self, other: Publication[Any]) -> bool:
        return (
            self.volume_id == other.volume_id
            and self.target == other.target
            and self.strategy == other.strategy
            and dict(self.parameters) == dict(other.parameters)
            and self.readonly == other.readonly
            and sorted(self.mount_flags) == sorted(other.mount_flags)
            and self.single_writer == other.single_writer
        )

    def to_json(self) -> str:
        record: dict[str, Any] = {
            "volumeId": self.volume_id,
            "target": str(self.target),
            "strategy": self.strategy,
            "parameters": dict(self.parameters),
            "readonly": self.readonly,
            "mountFlags": list(self.mount_flags),
            "singleWriter": self.single_writer,
        }
        if self.pod:
            record["pod"] = {
                "namespace": self.pod.namespace,
                "name": self.pod.name,
                "uid": self.pod.uid,
            }
            if self.pod.ephemeral:
                record["pod"]["ephemeral"] = True
        return json.dumps(record, sort_keys=True)


@dataclass(frozen=True, slots=True)
class VolumeStats:
    """What NodeGetVolumeStats reports; `abnormal` with a message when the mount is broken."""

    total_bytes: int = 0
    used_bytes: int = 0
    available_bytes: int = 0
    total_inodes: int = 0
    used_inodes: int = 0
    available_inodes: int = 0
    abnormal: bool = False
    message: str = ""


class Strategy(abc.ABC, Generic[SpecT]):
    """A way to make a volume appear at a target. One instance serves every volume of its kind.

    Methods must be idempotent: `publish` on a target that already holds this publication is a
    no-op, `unpublish` on a target that is gone, unmounted or dead succeeds. The CSI layer
    serializes calls per target, never across targets.
    """

    name: ClassVar[str]
    """The value of the `strategy` parameter that selects this strategy."""

    parameters: ClassVar[Mapping[str, str]]
    """Every parameter key this strategy accepts, with a one-line description (errors, docs)."""

    @abc.abstractmethod
    def parse(self, params: Parameters) -> SpecT:
        """Validate parameters into the strategy's spec; raise InvalidArgument naming the key.

        Pure: no I/O, so the controller can validate a StorageClass at CreateVolume time.
        """

    @abc.abstractmethod
    async def start(self, publications: Sequence[Publication[SpecT]], tasks: TaskGroup) -> None:
        """Take over the targets a previous run left (re-serve, re-bind); run helpers in `tasks`."""

    @abc.abstractmethod
    def ready(self) -> bool:
        """False while the strategy cannot publish yet (recovering, waiting for a dependency)."""

    @abc.abstractmethod
    async def publish(self, publication: Publication[SpecT], secrets: Secrets) -> None:
        """Mount the volume at `publication.target` (which exists as an empty directory)."""

    @abc.abstractmethod
    async def unpublish(self, publication: Publication[SpecT]) -> None:
        """Unmount the target and release what only it used; the target directory stays."""

    @abc.abstractmethod
    async def stats(self, publication: Publication[SpecT]) -> VolumeStats:
        """Usage of the volume as seen at the target, or abnormal with the reason."""

    @abc.abstractmethod
    async def expand(self, publication: Publication[SpecT], capacity_bytes: int) -> None:
        """Apply a new capacity (recorded by the controller) to the volume at this target."""

    async def aclose(self) -> None:
        """Release resources at shutdown; mounts stay so that applications keep working."""
