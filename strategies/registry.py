"""Every built-in strategy, constructed from one environment; looked up by name, never by type."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from strategies.base import Strategy
from strategies.clients.registry import build_clients
from strategies.hostpath import HostPathStrategy
from strategies.inprocess.strategy import InprocessStrategy
from strategies.kube.cluster import Cluster
from strategies.kube.shared import SharedCluster
from strategies.mountpod.strategy import MountPodStrategy
from strategies.sidecar.strategy import SidecarStrategy
from strategies.volumes import Roots, VolumeStore


@dataclass(frozen=True, kw_only=True)
class NodeEnvironment:
    """What strategies may use of the node: allowed roots, a state directory, limits, the API."""

    roots: Roots
    volumes: VolumeStore
    state_dir: Path
    require_mounted_roots: bool
    fuse_command: tuple[str, ...]
    fuse_start_timeout: float
    node_id: str = ""
    connect: Callable[[], Awaitable[Cluster]] | None = None
    """Opens the Kubernetes API; None outside a cluster (strategies that need it refuse)."""
    own_pod: str = ""
    mountpod_dir: Path = Path("/var/lib/fusecsi/mountpods")
    mountpod_ready_timeout: float = 90.0
    client_images: Mapping[str, str] = field(default_factory=dict)
    mountpod_defaults: Mapping[str, str] = field(default_factory=dict)


def build_strategies(env: NodeEnvironment) -> Mapping[str, Strategy[Any]]:
    """The strategies this driver offers, by the name the `strategy` parameter uses."""
    cluster = SharedCluster(env.connect) if env.connect is not None else None
    strategies: list[Strategy[Any]] = [
        HostPathStrategy(env.roots, require_mounted_roots=env.require_mounted_roots),
        InprocessStrategy(
            env.roots,
            env.volumes,
            state_dir=env.state_dir / "inprocess",
            fuse_command=env.fuse_command,
            start_timeout=env.fuse_start_timeout,
        ),
        MountPodStrategy(
            clients=build_clients(env.volumes),
            node=env.node_id,
            connect=cluster.get if cluster is not None else None,
            host_dir=env.mountpod_dir,
            images=env.client_images,
            defaults=env.mountpod_defaults,
            own_pod=env.own_pod,
            ready_timeout=env.mountpod_ready_timeout,
        ),
        SidecarStrategy(
            env.volumes,
            claim_of=cluster.claim_of if cluster is not None else None,
            sidecar_expected=cluster.sidecar_expected if cluster is not None else None,
            images=env.client_images,
        ),
    ]
    return {strategy.name: strategy for strategy in strategies}
