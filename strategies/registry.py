"""Every built-in strategy, constructed from one environment; looked up by name, never by type."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from strategies.base import Strategy
from strategies.hostpath import HostPathStrategy
from strategies.inprocess.strategy import InprocessStrategy
from strategies.volumes import Roots, VolumeStore


@dataclass(frozen=True, kw_only=True)
class NodeEnvironment:
    """What strategies may use of the node: allowed roots, a state directory, limits."""

    roots: Roots
    volumes: VolumeStore
    state_dir: Path
    require_mounted_roots: bool
    fuse_command: tuple[str, ...]
    fuse_start_timeout: float


def build_strategies(env: NodeEnvironment) -> Mapping[str, Strategy[Any]]:
    """The strategies this driver offers, by the name the `strategy` parameter uses."""
    strategies: list[Strategy[Any]] = [
        HostPathStrategy(env.roots, require_mounted_roots=env.require_mounted_roots),
        InprocessStrategy(
            env.roots,
            env.volumes,
            state_dir=env.state_dir / "inprocess",
            fuse_command=env.fuse_command,
            start_timeout=env.fuse_start_timeout,
        ),
    ]
    return {strategy.name: strategy for strategy in strategies}
