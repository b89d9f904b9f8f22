"""Typed, validated views of CSI requests: parsed once, at the gRPC boundary.

Each check names the request field it rejects, in the CSI spec's snake_case, so that the
message a user finds in a Kubernetes Event says what to fix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import betterproto

from csi.errors import invalid
from protos.csi import v1 as csi
from strategies.base import PodRef, Publication, Strategy
from strategies.params import Parameters, without_reserved
from strategies.system.paths import check_target

POD_NAME = "csi.storage.k8s.io/pod.name"
POD_NAMESPACE = "csi.storage.k8s.io/pod.namespace"
POD_UID = "csi.storage.k8s.io/pod.uid"
EPHEMERAL = "csi.storage.k8s.io/ephemeral"


def required_id(value: str, field: str = "volume_id") -> str:
    """A non-empty string field. Lengths are not limited here: an ID made elsewhere is looked up."""
    if not value:
        raise invalid(field, "is required")
    if "\x00" in value:
        raise invalid(field, "must not contain NUL bytes")
    return value


def required_path(value: str, allowed: tuple[Path, ...], field: str) -> Path:
    if not value:
        raise invalid(field, "is required")
    return check_target(Path(value), allowed, field=field)


@dataclass(frozen=True, slots=True)
class MountCapability:
    """A volume capability fusecsi can serve: a filesystem mount with an access mode."""

    access_mode: csi.VolumeCapabilityAccessModeMode
    mount_flags: tuple[str, ...]

    @property
    def single_writer(self) -> bool:
        return self.access_mode == csi.VolumeCapabilityAccessModeMode.SINGLE_NODE_SINGLE_WRITER

    @property
    def read_only_mode(self) -> bool:
        return self.access_mode in (
            csi.VolumeCapabilityAccessModeMode.SINGLE_NODE_READER_ONLY,
            csi.VolumeCapabilityAccessModeMode.MULTI_NODE_READER_ONLY,
        )


def capability(cap: csi.VolumeCapability, field: str = "volume_capability") -> MountCapability:
    """Accept a mount capability with a known access mode; block volumes make no sense here."""
    if not betterproto.serialized_on_wire(cap):
        raise invalid(field, "is required")
    kind, _ = betterproto.which_one_of(cap, "access_type")
    if kind == "block":
        raise invalid(
            f"{field}.block", "fusecsi volumes are filesystems; use volumeMode: Filesystem"
        )
    if kind != "mount":
        raise invalid(f"{field}.access_type", "is required (mount)")
    mode = cap.access_mode.mode
    if (
        not betterproto.serialized_on_wire(cap.access_mode)
        or mode == csi.VolumeCapabilityAccessModeMode.UNKNOWN
    ):
        raise invalid(f"{field}.access_mode", "is required")
    # fs_type is ignored on purpose: the filesystem is whatever the strategy mounts, and
    # external-provisioner may fill in a default such as ext4.
    return MountCapability(access_mode=mode, mount_flags=tuple(cap.mount.mount_flags))


def capabilities(
    caps: Sequence[csi.VolumeCapability], field: str = "volume_capabilities"
) -> list[MountCapability]:
    if not caps:
        raise invalid(field, "is required")
    return [capability(cap, f"{field}[{index}]") for index, cap in enumerate(caps)]


def pod_ref(context: Mapping[str, str]) -> PodRef | None:
    if POD_UID not in context:
        return None
    return PodRef(
        namespace=context.get(POD_NAMESPACE, ""),
        name=context.get(POD_NAME, ""),
        uid=context[POD_UID],
        ephemeral=context.get(EPHEMERAL) == "true",
    )


class StrategySet:
    """The registered strategies and the default; turns parameters into a typed spec."""

    def __init__(self, strategies: Mapping[str, Strategy[Any]], default: str) -> None:
        if default not in strategies:
            raise ValueError(f"default strategy {default!r} is not one of {sorted(strategies)}")
        self.by_name = dict(strategies)
        self.default = default

    def __iter__(self) -> Any:
        return iter(self.by_name.values())

    def select(self, values: Mapping[str, str], where: str) -> tuple[Strategy[Any], Parameters]:
        """The strategy named by `strategy` (or the default) and its validated parameters."""
        own = without_reserved(values)
        name = own.pop("strategy", self.default)
        strategy = self.by_name.get(name)
        if strategy is None:
            raise invalid(
                f"{where}.strategy",
                f"unknown strategy {name!r}; available: {', '.join(sorted(self.by_name))}",
            )
        return strategy, Parameters(own, known=strategy.parameters, where=where)

    def publication(
        self,
        *,
        volume_id: str,
        target: Path,
        context: Mapping[str, str],
        readonly: bool,
        mount_flags: tuple[str, ...],
        single_writer: bool = False,
        where: str = "volume_context",
    ) -> Publication[Any]:
        strategy, params = self.select(context, where)
        return Publication(
            volume_id=volume_id,
            target=target,
            strategy=strategy.name,
            parameters=dict(params),
            readonly=readonly,
            mount_flags=mount_flags,
            single_writer=single_writer,
            spec=strategy.parse(params),
            pod=pod_ref(context),
        )

    def from_record(self, record: Mapping[str, Any]) -> Publication[Any]:
        """Rebuild a publication from its on-disk record (re-parsed: the spec is never stored)."""
        context = {**record["parameters"], "strategy": record["strategy"]}
        publication = self.publication(
            volume_id=record["volumeId"],
            target=Path(record["target"]),
            context=context,
            readonly=record["readonly"],
            mount_flags=tuple(record["mountFlags"]),
            single_writer=record.get("singleWriter", False),
        )
        pod = record.get("pod")
        return replace(publication, pod=PodRef(**pod)) if pod else publication
