"""mountpod against a fake control plane: real clients, real FUSE mounts, fake apiserver+kubelet.

The contract suite runs first (what every strategy must do), then what only Mount Pods do:
sharing, reference counting, delayed deletion, healing, garbage collection, API requests.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import TaskGroup

from csi.requests import StrategySet
from strategies.base import Publication, Secrets, Strategy
from strategies.clients.registry import build_clients
from strategies.errors import InvalidArgument, Unavailable
from strategies.kube.cluster import Cluster
from strategies.mountpod import pods
from strategies.mountpod.strategy import MountPodStrategy
from strategies.system import mounts
from strategies.volumes import Roots, VolumeStore
from unit.fakecluster import FakeCluster
from unit.harness import ROOT_REASON, ContractEnv, StrategyContract, read_text_off_loop

NODE = "node-a"
IMAGE = "fusecsi.local/fusecsi:test"


def make_mountpod(env: ContractEnv, cluster: FakeCluster, **kwargs: Any) -> MountPodStrategy:
    async def connect() -> Cluster:
        return cluster

    return MountPodStrategy(
        clients=build_clients(env.volumes),
        node=NODE,
        connect=connect,
        host_dir=env.state_dir / "mountpods",
        images={"builtin": IMAGE},
        defaults=kwargs.pop("defaults", {}),
        ready_timeout=kwargs.pop("ready_timeout", 20.0),
        **kwargs,
    )


class TestMountPod(StrategyContract):
    heals_broken_mounts = True
    heal_timeout = 20.0

    @pytest.fixture(autouse=True)
    def fake_cluster(self, env: ContractEnv) -> Iterator[FakeCluster]:
        self.cluster = FakeCluster()
        yield self.cluster
        self.cluster.shutdown()

    def make_strategy(self, env: ContractEnv) -> Strategy[Any]:
        return make_mountpod(env, self.cluster)

    def volume_parameters(self, env: ContractEnv) -> dict[str, str]:
        return {"client": "builtin", "path": "vol", "capacity": "1Gi"}

    async def break_volume(self, env: ContractEnv, publication: Publication[Any]) -> None:
        (pod,) = self.cluster.mount_pods()
        self.cluster.kill_client(pod["metadata"]["name"])


# -- what only Mount Pods do ---------------------------------------------------------------


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def env(tmp_path: Path) -> Iterator[ContractEnv]:
    root = tmp_path / "root"
    (root / "vol").mkdir(parents=True)
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
    yield env
    for entry in reversed(mounts.mount_table()):
        if Path(entry.mount_point).is_relative_to(tmp_path):
            mounts.unmount(Path(entry.mount_point), detach=True)


@pytest.fixture
def cluster() -> Iterator[FakeCluster]:
    fake = FakeCluster()
    yield fake
    fake.shutdown()


@pytest.fixture
async def tasks() -> AsyncIterator[TaskGroup]:
    async with anyio.create_task_group() as group:
        yield group
        group.cancel_scope.cancel()


@pytest.fixture
async def strategy(
    env: ContractEnv, cluster: FakeCluster, tasks: TaskGroup
) -> AsyncIterator[MountPodStrategy]:
    strategy = make_mountpod(env, cluster)
    await strategy.start([], tasks)
    yield strategy
    await strategy.aclose()


def publication(
    strategy: MountPodStrategy,
    env: ContractEnv,
    name: str,
    params: dict[str, str],
    *,
    volume_id: str = "default/vol",
) -> Publication[Any]:
    target = env.targets / name / "volumes" / "kubernetes.io~csi" / "pv" / "mount"
    target.mkdir(parents=True, exist_ok=True)
    return StrategySet({strategy.name: strategy}, strategy.name).publication(
        volume_id=volume_id,
        target=target,
        context=params,
        readonly=False,
        mount_flags=(),
    )


BUILTIN = {"client": "builtin", "path": "vol"}
root_only = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason=ROOT_REASON
)


async def wait_for(condition: Any, timeout: float = 15.0) -> None:
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.05)


@root_only
@pytest.mark.anyio
async def test_app_pods_on_a_node_share_one_mount_pod_with_one_request_each(
    strategy: MountPodStrategy, env: ContractEnv, cluster: FakeCluster
) -> None:
    first = publication(strategy, env, "a", BUILTIN)
    await strategy.publish(first, Secrets())
    after_first = sum(cluster.requests.values())
    for name in ("b", "c"):
        await strategy.publish(publication(strategy, env, name, BUILTIN), Secrets())
    (pod,) = cluster.mount_pods()
    assert len(pods.refs(pod)) == 3
    # New pod: one create (no secret for builtin) plus the open list+watch.
    assert cluster.requests["create_pod"] == 1
    assert sum(cluster.requests.values()) - after_first == 2  # one patch per shared publish
    assert cluster.requests["patch_pod"] == 2
    await anyio.to_thread.run_sync((first.target / "x").write_text, "shared")
    assert (env.volume_dir / "x").read_text() == "shared"


@root_only
@pytest.mark.anyio
async def test_last_unpublish_deletes_the_mount_pod_after_the_delay(
    strategy: MountPodStrategy, env: ContractEnv, cluster: FakeCluster
) -> None:
    params = {**BUILTIN, "deleteDelay": "1s"}
    published = [publication(strategy, env, name, params) for name in ("a", "b")]
    for item in published:
        await strategy.publish(item, Secrets())
    for item in published:
        await strategy.unpublish(item)
    (pod,) = cluster.mount_pods()
    assert pods.refs(pod) == {}
    await anyio.sleep(0.5)
    assert cluster.mount_pods(), "deleted before deleteDelay"
    await wait_for(lambda: not cluster.mount_pods(), timeout=10)
    assert cluster.requests["delete_pod"] == 1


@root_only
@pytest.mark.anyio
async def test_a_new_reference_cancels_a_pending_deletion(
    strategy: MountPodStrategy, env: ContractEnv, cluster: FakeCluster
) -> None:
    params = {**BUILTIN, "deleteDelay": "1s"}
    first = publication(strategy, env, "a", params)
    await strategy.publish(first, Secrets())
    (before,) = cluster.mount_pods()
    await strategy.unpublish(first)
    second = publication(strategy, env, "b", params)
    await strategy.publish(second, Secrets())
    await anyio.sleep(1.5)
    (after,) = cluster.mount_pods()
    assert after["metadata"]["uid"] == before["metadata"]["uid"]
    assert cluster.requests["delete_pod"] == 0
    await anyio.to_thread.run_sync((second.target / "kept").write_text, "yes")
    assert (env.volume_dir / "kept").read_text() == "yes"


@root_only
@pytest.mark.anyio
async def test_changed_settings_make_a_new_mount_pod_and_leave_the_old_one(
    strategy: MountPodStrategy, env: ContractEnv, cluster: FakeCluster
) -> None:
    old = publication(strategy, env, "a", BUILTIN)
    await strategy.publish(old, Secrets())
    new = publication(strategy, env, "b", {**BUILTIN, "mountOptions": "rescan-interval=30"})
    await strategy.publish(new, Secrets())
    names = sorted(pod["metadata"]["name"] for pod in cluster.mount_pods())
    assert len(names) == 2
    await anyio.to_thread.run_sync((old.target / "from-old").write_text, "1")
    assert await read_text_off_loop(new.target / "from-old") == "1"


@root_only
@pytest.mark.anyio
async def test_share_filesystem_serves_several_volumes_from_one_pod(
    strategy: MountPodStrategy, env: ContractEnv, cluster: FakeCluster
) -> None:
    (env.root / "v1").mkdir()
    (env.root / "v2").mkdir()
    (env.root / "v1" / "which").write_text("one")
    (env.root / "v2" / "which").write_text("two")
    one = publication(
        strategy, env, "a", {"path": "v1", "share": "filesystem"}, volume_id="default/v1"
    )
    two = publication(
        strategy, env, "b", {"path": "v2", "share": "filesystem"}, volume_id="default/v2"
    )
    await strategy.publish(one, Secrets())
    await strategy.publish(two, Secrets())
    assert len(cluster.mount_pods()) == 1
    assert await read_text_off_loop(one.target / "which") == "one"
    assert await read_text_off_loop(two.target / "which") == "two"


@root_only
@pytest.mark.anyio
async def test_a_deleted_mount_pod_is_recreated_and_its_targets_heal(
    strategy: MountPodStrategy, env: ContractEnv, cluster: FakeCluster
) -> None:
    item = publication(strategy, env, "a", BUILTIN)
    await strategy.publish(item, Secrets())
    (pod,) = cluster.mount_pods()
    await cluster.delete_pod(pod["metadata"]["name"])

    def healed() -> bool:
        current = cluster.mount_pods()
        if not current or current[0]["metadata"]["uid"] == pod["metadata"]["uid"]:
            return False
        try:
            os.listdir(item.target)
        except OSError:
            return False
        return True

    await wait_for(healed, timeout=20)
    await anyio.to_thread.run_sync((item.target / "after").write_text, "ok")
    assert (env.volume_dir / "after").read_text() == "ok"
    (recreated,) = cluster.mount_pods()
    assert pods.ref_key(item.target) in pods.refs(recreated)


@root_only
@pytest.mark.anyio
async def test_command_client_gets_secrets_only_through_a_secret(
    strategy: MountPodStrategy, env: ContractEnv, cluster: FakeCluster
) -> None:
    params = {
        "client": "command",
        "path": "vol",
        "root": "default",
        "clientImage": "example/rclone:1",
        "command": f"fusecsi fuse {env.root}/${{path}} ${{mountpoint}} --fsname cmd",
    }
    item = publication(strategy, env, "a", params)
    await strategy.publish(item, Secrets({"api-token": "s3cr3t-value"}))
    (pod,) = cluster.mount_pods()
    assert "s3cr3t-value" not in json.dumps(pod)
    (secret,) = cluster.secrets.values()
    assert secret["stringData"] == {"api-token": "s3cr3t-value"}
    env_vars = pod["spec"]["containers"][0]["env"]
    assert env_vars == [
        {
            "name": "API_TOKEN",
            "valueFrom": {"secretKeyRef": {"key": "api-token", "name": pod["metadata"]["name"]}},
        }
    ]
    process = cluster.processes[pod["metadata"]["name"]]
    environ = Path(f"/proc/{process.pid}/environ").read_bytes().split(b"\0")
    assert b"API_TOKEN=s3cr3t-value" in environ
    assert b"s3cr3t-value" not in Path(f"/proc/{process.pid}/cmdline").read_bytes()
    assert cluster.requests["create_secret"] == 1 and cluster.requests["create_pod"] == 1
    await strategy.unpublish(item)
    await wait_for(lambda: not cluster.secrets and not cluster.mount_pods())


@root_only
@pytest.mark.anyio
async def test_a_client_that_cannot_start_fails_the_publish_with_its_log(
    env: ContractEnv, cluster: FakeCluster, tasks: TaskGroup
) -> None:
    strategy = make_mountpod(env, cluster, ready_timeout=2.0)
    await strategy.start([], tasks)
    params = {
        "client": "command",
        "clientImage": "example/broken:1",
        "command": "sh -c 'echo no-credentials-for-${mountpoint} >&2; exit 3'",
    }
    item = publication(strategy, env, "a", params)
    with pytest.raises(Unavailable, match="no-credentials-for-/fusecsi/mnt"):
        await strategy.publish(item, Secrets())
    (pod,) = cluster.mount_pods()
    assert pods.refs(pod) == {}, "a failed publish must not leave its reference"


@root_only
@pytest.mark.anyio
async def test_references_of_pods_that_are_gone_are_collected(
    strategy: MountPodStrategy, env: ContractEnv, cluster: FakeCluster
) -> None:
    cluster.add_app_pod("apps", "reader", "uid-reader", NODE)
    item = publication(strategy, env, "a", BUILTIN)
    await strategy.publish(item, Secrets())
    (pod,) = cluster.mount_pods()
    name = pod["metadata"]["name"]
    # A reference that no NodeUnpublish will ever remove: its app pod's target, not ours.
    stale = "/var/lib/kubelet/pods/uid-reader/volumes/kubernetes.io~csi/pv/mount"
    await cluster.patch_pod(name, {"metadata": {"annotations": {"fusecsi.io/ref-x": stale}}})
    cluster.remove_app_pod("apps", "reader")
    await wait_for(lambda: "fusecsi.io/ref-x" not in pods.refs(cluster.mount_pods()[0]))
    assert pods.ref_key(item.target) in pods.refs(cluster.mount_pods()[0])


@root_only
@pytest.mark.anyio
async def test_a_restarted_plugin_drops_references_it_has_no_record_of(
    env: ContractEnv, cluster: FakeCluster, tasks: TaskGroup
) -> None:
    first = make_mountpod(env, cluster)
    await first.start([], tasks)
    kept = publication(first, env, "a", BUILTIN)
    lost = publication(first, env, "b", BUILTIN)
    await first.publish(kept, Secrets())
    await first.publish(lost, Secrets())
    await first.aclose()
    successor = make_mountpod(env, cluster)
    await successor.start([kept], tasks)  # `lost` has no record any more
    (pod,) = cluster.mount_pods()
    assert set(pods.refs(pod).values()) == {str(kept.target)}
    await anyio.to_thread.run_sync((kept.target / "still").write_text, "here")


def offline_mountpod(tmp_path: Path, defaults: dict[str, str] | None = None) -> MountPodStrategy:
    """A mountpod strategy without an API: enough to parse parameters."""
    volumes = VolumeStore(Roots({"default": tmp_path}))
    return MountPodStrategy(
        clients=build_clients(volumes),
        node=NODE,
        connect=None,
        host_dir=tmp_path / "mp",
        images={},
        defaults=defaults or {},
    )


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"client": "nfs"}, "volume_context.client"),
        ({"client": "command", "command": "rclone mount x /mnt"}, "volume_context.command"),
        ({"client": "command", "command": "x ${mountpoint} ${nope}"}, "volume_context.command"),
        ({"clientResources": "{not json"}, "volume_context.clientResources"),
        ({"clientResources": '{"limit": {}}'}, "volume_context.clientResources"),
        ({"share": "cluster"}, "volume_context.share"),
        ({"deleteDelay": "soon"}, "volume_context.deleteDelay"),
        ({"client": "builtin", "command": "x"}, "volume_context.command"),
        ({"client": "builtin", "mountOptions": "cache-size=1"}, "volume_context.mountOptions"),
        ({"client": "juicefs", "mountOptions": "--subdir=/x"}, "volume_context.mountOptions"),
        ({"path": "../etc"}, "volume_context.path"),
        ({"colour": "blue"}, "volume_context.colour"),
    ],
)
def test_bad_parameters_name_their_key(params: dict[str, str], field: str, tmp_path: Path) -> None:
    strategy = offline_mountpod(tmp_path)
    with pytest.raises(InvalidArgument) as caught:
        chosen, parsed = StrategySet({"mountpod": strategy}, "mountpod").select(
            params, "volume_context"
        )
        chosen.parse(parsed)
    assert caught.value.field == field


def test_admin_defaults_apply_and_volume_parameters_win(tmp_path: Path) -> None:
    strategy = offline_mountpod(
        tmp_path, {"deleteDelay": "30s", "clientPriorityClass": "fusecsi-mounts"}
    )
    _chosen, parsed = StrategySet({"mountpod": strategy}, "mountpod").select(
        {"deleteDelay": "5s"}, "volume_context"
    )
    spec = strategy.parse(parsed)
    assert spec.delete_delay == 5.0
    assert spec.pod.priority_class == "fusecsi-mounts"


def test_juicefs_mount_pod_carries_no_secret_value(tmp_path: Path) -> None:
    volumes = VolumeStore(Roots({"default": tmp_path}))
    clients = build_clients(volumes)
    juicefs = clients["juicefs"]
    secrets = Secrets(
        {
            "name": "jfs",
            "metaurl": "redis://:hunter2@meta:6379/1",
            "storage": "s3",
            "bucket": "https://bucket.example",
            "access-key": "AKIAEXAMPLE",
            "secret-key": "very-secret-key",
            "envs": '{"TZ": "UTC"}',
        }
    )
    from strategies.clients.base import ClientMount
    from strategies.params import Parameters

    config = juicefs.parse(
        Parameters({"mountOptions": "cache-size=1024"}, known={"mountOptions": ""}, where="p"),
        "juicedata/mount:ce",
    )
    juicefs.check_secrets(config, secrets)
    container = juicefs.container(
        config,
        ClientMount(
            volume_id="v", mountpoint="/fusecsi/mnt", subdir=Path("ns/pvc"), capacity_bytes=3 << 30
        ),
        secrets,
    )
    plan = pods.plan_mount_pod(
        node=NODE,
        namespace="fusecsi",
        share_key="volume:v",
        share_label="v",
        volume_id="v",
        container=container,
        pod_settings=make_pod_settings(),
        client_name="juicefs",
        host_dir=tmp_path,
        secrets_digest=pods.secrets_digest(secrets),
    )
    text = json.dumps(plan.manifest)
    for value in ("hunter2", "AKIAEXAMPLE", "very-secret-key", "bucket.example"):
        assert value not in text
    assert plan.secret is not None and plan.secret["stringData"]["env.TZ"] == "UTC"
    command = plan.manifest["spec"]["containers"][0]["command"]
    assert command[4:] == ["/fusecsi/mnt", "/ns/pvc", "3", "--cache-size=1024"]
    with pytest.raises(InvalidArgument, match=r"secrets\.metaurl"):
        juicefs.check_secrets(config, Secrets({"name": "jfs"}))


def make_pod_settings() -> Any:
    from strategies.mountpod.spec import PodSettings

    return PodSettings(
        resources={}, tolerations=({"operator": "Exists"},), node_selector={}, priority_class=""
    )
