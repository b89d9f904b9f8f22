"""The strategy contract suite: what every Strategy must do, checked with real mounts.

A strategy author (built-in or not) subclasses `StrategyContract` in a test module and
provides three things: how to build the strategy (`make_strategy`), the parameters of a test
volume (`volume_parameters`), and how to break a published volume the way production breaks
(`break_volume`: kill the FUSE server). Every test below then runs against that strategy,
with real mount(2) calls in a temporary directory; nothing is faked. Needs root and /dev/fuse.

    class TestMyStrategy(StrategyContract):
        heals_broken_mounts = True
        def make_strategy(self, env): return MyStrategy(env.roots, ...)
        def volume_parameters(self, env): return {"path": "vol"}
        async def break_volume(self, env, publication): ...

See docs/strategy-authors.md.
"""

from __future__ import annotations

import errno
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import anyio
import pytest
from anyio.abc import TaskGroup

from csi.requests import StrategySet
from strategies.base import Publication, Secrets, Strategy
from strategies.system import mounts
from strategies.volumes import Roots, VolumeStore

ROOT_REASON = "needs root (mount(2)) and /dev/fuse"


@dataclass
class ContractEnv:
    """Directories of one test: the allowed root, the volume inside it, targets, node state."""

    tmp: Path
    root: Path
    volume_dir: Path
    targets: Path
    state_dir: Path
    roots: Roots
    volumes: VolumeStore

    def target(self, name: str = "pod-a") -> Path:
        path = self.targets / name / "volumes" / "mount"
        path.mkdir(parents=True, exist_ok=True)
        return path


def is_mounted(path: Path) -> bool:
    return mounts.mounted_at(path) is not None


def read_text_off_loop(path: Path) -> Any:
    return anyio.to_thread.run_sync(path.read_text)


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason=ROOT_REASON)
@pytest.mark.anyio
class StrategyContract:
    """Subclass it; implement the hooks; every `test_*` below becomes a test of your strategy."""

    heals_broken_mounts: ClassVar[bool] = False
    """True when the strategy repairs a killed FUSE server on its own (the target works again)."""

    heal_timeout: ClassVar[float] = 15.0

    # -- hooks ----------------------------------------------------------------------------

    def make_strategy(self, env: ContractEnv) -> Strategy[Any]:
        raise NotImplementedError

    def volume_parameters(self, env: ContractEnv) -> dict[str, str]:
        raise NotImplementedError

    async def break_volume(self, env: ContractEnv, publication: Publication[Any]) -> None:
        raise NotImplementedError

    def prepare_root(self, env: ContractEnv) -> None:
        """Optional: mount something at env.root before the strategy starts."""

    def release_root(self, env: ContractEnv) -> None:
        """Optional: undo prepare_root."""

    async def before_publish(self, env: ContractEnv, publication: Publication[Any]) -> None:
        """Optional: what kubelet sets up around a target before publishing (pod volumes)."""

    async def after_publish(self, env: ContractEnv, publication: Publication[Any]) -> None:
        """Optional: what runs in the pod after a publish (a sidecar that serves the mount)."""

    # -- fixtures -------------------------------------------------------------------------

    @pytest.fixture
    def anyio_backend(self) -> str:
        return "asyncio"

    @pytest.fixture
    def env(self, tmp_path: Path) -> Any:
        root = tmp_path / "root"
        root.mkdir()
        roots = Roots({"default": root})
        env = ContractEnv(
            tmp=tmp_path,
            root=root,
            volume_dir=root / "vol",
            targets=tmp_path / "pods",
            state_dir=tmp_path / "state",
            roots=roots,
            volumes=VolumeStore(roots),
        )
        self.prepare_root(env)
        env.volume_dir.mkdir(exist_ok=True)
        yield env
        for entry in reversed(mounts.mount_table()):
            if Path(entry.mount_point).is_relative_to(env.targets) or Path(
                entry.mount_point
            ).is_relative_to(env.state_dir):
                mounts.unmount(Path(entry.mount_point), detach=True)
        self.release_root(env)

    @pytest.fixture
    async def tasks(self) -> AsyncIterator[TaskGroup]:
        async with anyio.create_task_group() as tasks:
            yield tasks
            tasks.cancel_scope.cancel()

    @pytest.fixture
    async def strategy(self, env: ContractEnv, tasks: TaskGroup) -> AsyncIterator[Strategy[Any]]:
        strategy = self.make_strategy(env)
        await strategy.start([], tasks)
        assert strategy.ready()
        yield strategy
        await strategy.aclose()

    # -- helpers --------------------------------------------------------------------------

    def publication(
        self,
        strategy: Strategy[Any],
        env: ContractEnv,
        target: Path,
        *,
        readonly: bool = False,
        mount_flags: tuple[str, ...] = (),
        volume_id: str = "default/vol",
    ) -> Publication[Any]:
        # Parsed exactly as NodePublishVolume parses a volume context.
        return StrategySet({strategy.name: strategy}, strategy.name).publication(
            volume_id=volume_id,
            target=target,
            context=self.volume_parameters(env),
            readonly=readonly,
            mount_flags=mount_flags,
        )

    async def published(
        self, strategy: Strategy[Any], env: ContractEnv, name: str = "pod-a", **kwargs: Any
    ) -> Publication[Any]:
        publication = self.publication(strategy, env, env.target(name), **kwargs)
        await self.before_publish(env, publication)
        await strategy.publish(publication, Secrets())
        await self.after_publish(env, publication)
        return publication

    # -- the contract ---------------------------------------------------------------------

    async def test_publish_shows_the_volume_at_the_target(
        self, strategy: Strategy[Any], env: ContractEnv
    ) -> None:
        (env.volume_dir / "before").write_text("from the backend")
        publication = await self.published(strategy, env)
        assert is_mounted(publication.target)
        assert await read_text_off_loop(publication.target / "before") == "from the backend"
        await anyio.to_thread.run_sync((publication.target / "after").write_text, "from the pod")
        assert (env.volume_dir / "after").read_text() == "from the pod"

    async def test_publishing_the_same_target_again_changes_nothing(
        self, strategy: Strategy[Any], env: ContractEnv
    ) -> None:
        publication = await self.published(strategy, env)
        await strategy.publish(publication, Secrets())
        assert len(mounts.mounts_at(publication.target)) == 1

    async def test_unpublish_unmounts_and_can_be_repeated(
        self, strategy: Strategy[Any], env: ContractEnv
    ) -> None:
        publication = await self.published(strategy, env)
        await strategy.unpublish(publication)
        assert not is_mounted(publication.target)
        await strategy.unpublish(publication)
        assert not is_mounted(publication.target)
        assert not any(
            entry.mount_point.startswith(str(env.targets)) for entry in mounts.mount_table()
        )

    async def test_unpublish_succeeds_when_the_target_is_gone(
        self, strategy: Strategy[Any], env: ContractEnv
    ) -> None:
        publication = await self.published(strategy, env)
        await strategy.unpublish(publication)
        publication.target.rmdir()
        await strategy.unpublish(publication)

    async def test_readonly_publication_refuses_writes(
        self, strategy: Strategy[Any], env: ContractEnv
    ) -> None:
        publication = await self.published(strategy, env, readonly=True)
        with pytest.raises(OSError) as caught:
            await anyio.to_thread.run_sync((publication.target / "nope").write_text, "x")
        assert caught.value.errno == errno.EROFS
        assert mounts.mounted_at(publication.target).readonly  # type: ignore[union-attr]

    async def test_mount_flags_reach_the_mount(
        self, strategy: Strategy[Any], env: ContractEnv
    ) -> None:
        publication = await self.published(strategy, env, mount_flags=("noexec", "nosuid"))
        entry = mounts.mounted_at(publication.target)
        assert entry is not None
        assert {"noexec", "nosuid"} <= entry.options

    async def test_two_targets_share_one_volume(
        self, strategy: Strategy[Any], env: ContractEnv
    ) -> None:
        first = await self.published(strategy, env, "pod-a")
        second = await self.published(strategy, env, "pod-b")
        await anyio.to_thread.run_sync((first.target / "shared").write_text, "hello")
        assert await read_text_off_loop(second.target / "shared") == "hello"
        await strategy.unpublish(first)
        assert await read_text_off_loop(second.target / "shared") == "hello"
        await strategy.unpublish(second)

    async def test_stats_report_usage_of_a_healthy_mount(
        self, strategy: Strategy[Any], env: ContractEnv
    ) -> None:
        publication = await self.published(strategy, env)
        stats = await strategy.stats(publication)
        assert not stats.abnormal, stats.message
        assert stats.total_bytes > 0
        assert stats.total_inodes >= 0

    async def test_a_broken_mount_is_reported_and_can_be_unpublished(
        self, strategy: Strategy[Any], env: ContractEnv
    ) -> None:
        publication = await self.published(strategy, env)
        await self.break_volume(env, publication)
        if self.heals_broken_mounts:
            with anyio.fail_after(self.heal_timeout):
                while (await strategy.stats(publication)).abnormal:
                    await anyio.sleep(0.1)
            await anyio.to_thread.run_sync((publication.target / "healed").write_text, "yes")
        else:
            stats = await strategy.stats(publication)
            assert stats.abnormal
            assert stats.message
        await strategy.unpublish(publication)
        assert not is_mounted(publication.target)

    async def test_a_restarted_plugin_takes_its_targets_over(
        self, strategy: Strategy[Any], env: ContractEnv, tasks: TaskGroup
    ) -> None:
        publication = await self.published(strategy, env)
        await strategy.aclose()  # the plugin goes away; its mounts may die with it
        successor = self.make_strategy(env)
        await successor.start([publication], tasks)
        assert successor.ready()
        await anyio.to_thread.run_sync((publication.target / "after-restart").write_text, "ok")
        assert (env.volume_dir / "after-restart").read_text() == "ok"
        await successor.unpublish(publication)
        await successor.aclose()
        assert not is_mounted(publication.target)
