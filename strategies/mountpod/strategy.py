"""mountpod: the FUSE client runs in a Mount Pod on the node; app pods share it through binds.

State lives in Kubernetes objects and the mount table, never only in memory:
- a Mount Pod per (node, share key, settings), named deterministically (`pods.plan_mount_pod`);
- one reference annotation per published target on the Mount Pod, changed with conditional
  patches; at zero references the pod is deleted after `deleteDelay`;
- the node plugin's view of its Mount Pods comes from one watch of the pods on its node
  (`NodePodCache`), which also tells it when a client restarts or a Mount Pod is deleted: it
  then waits for the new mount and stacks a fresh bind on every target of that pod, so app
  containers that mount with `mountPropagation: HostToContainer` see the filesystem again.

The client mounts at `<mountpod_dir>/<pod>/mnt` on the host (a hostPath with Bidirectional
propagation); each target is a bind of that mount, or of the volume's directory inside it when
one pod serves a whole StorageClass or filesystem.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import anyio
from anyio.abc import TaskGroup
from loguru import logger
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from strategies.base import Publication, Secrets, Strategy, VolumeStats
from strategies.clients.base import Client, ClientMount
from strategies.clients.registry import CLIENT_PARAMETERS
from strategies.errors import FailedPrecondition, MountFailed, Unavailable
from strategies.kube.cluster import ApiError, Cluster, Obj
from strategies.kube.podcache import NodePodCache
from strategies.mountpod import pods
from strategies.mountpod.spec import COMMON_PARAMETERS, MountPodSpec, parse_spec
from strategies.params import Parameters
from strategies.system import mounts
from strategies.system.blocking import run_blocking, run_blocking_for
from strategies.system.locks import KeyedLocks
from strategies.system.targets import bind_flags, filesystem_stats, release_target

LIVE_CHECK_INTERVAL = 0.05  # seconds between local mount-table checks while a client starts
LIVE_PROBE_TIMEOUT = 5.0  # a stat of the new mount that takes longer counts as not live
FAILED_START_GRACE = 60.0  # a Mount Pod whose first publish failed waits this long for a retry
PATCH_ATTEMPTS = 5

Connect = Callable[[], Awaitable[Cluster]]

NO_CLUSTER = (
    "the mountpod strategy needs the Kubernetes API: run the node plugin in a cluster, "
    "or give it --kubeconfig"
)


@dataclass(eq=False)
class MountPodState:
    """What this node plugin knows of one of its Mount Pods (rebuildable from the cluster)."""

    name: str
    targets: dict[Path, Publication[MountPodSpec]] = field(default_factory=dict)
    manifest: Obj | None = None
    secret: Obj | None = None
    last_seen: Obj | None = None
    deletion: anyio.CancelScope | None = None
    healing: bool = False
    heal_again: bool = False


class MountPodStrategy(Strategy[MountPodSpec]):
    name = "mountpod"
    parameters = {**COMMON_PARAMETERS, **CLIENT_PARAMETERS}

    def __init__(
        self,
        *,
        clients: Mapping[str, Client[Any]],
        node: str,
        connect: Connect | None,
        host_dir: Path,
        images: Mapping[str, str],
        defaults: Mapping[str, str],
        own_pod: str = "",
        ready_timeout: float = 90.0,
        recovery_timeout: float = 300.0,
    ) -> None:
        self.clients = dict(clients)
        unknown = [key for client in clients.values() for key in client.parameters
                   if key not in self.parameters]  # fmt: skip
        if unknown:
            raise ValueError(f"client parameters {unknown} are missing from mountpod's")
        self.node = node
        self.connect = connect
        self.host_dir = host_dir
        self.images = dict(images)
        self.own_pod = own_pod
        self.ready_timeout = ready_timeout
        self.recovery_timeout = recovery_timeout
        # Admin defaults (the driver's config file); a StorageClass or PV parameter wins.
        self.defaults = dict(Parameters(defaults, known=self.parameters, where="mountpod_defaults"))
        self.cluster: Cluster | None = None
        self.cache: NodePodCache | None = None
        self._tasks: TaskGroup | None = None
        self._states: dict[str, MountPodState] = {}
        self._owner: dict[Path, str] = {}  # target -> Mount Pod name
        self._known: dict[str, Obj] = {}  # our own writes, newer than the watch may be yet
        self._locks = KeyedLocks()
        self._ready = False

    # -- the Strategy contract ---------------------------------------------------------------

    def parse(self, params: Parameters) -> MountPodSpec:
        merged = Parameters({**self.defaults, **params}, known=self.parameters, where=params.where)
        return parse_spec(merged, self.clients, self.images)

    def ready(self) -> bool:
        return self._ready

    async def start(
        self, publications: Sequence[Publication[MountPodSpec]], tasks: TaskGroup
    ) -> None:
        self._tasks = tasks
        if self.connect is None:
            logger.info("mountpod: no Kubernetes API configured; mountpod volumes are refused")
            self._ready = True
            return
        self.cluster = await self.connect()
        if "builtin" not in self.images and self.own_pod:
            self.images["builtin"] = await self._own_image()
        self.cache = NodePodCache(self.cluster, self.node, self._on_pod_change)
        tasks.start_soon(self.cache.run, name="mountpod-watch")
        await self.cache.synced.wait()
        orphans = 0
        for publication in publications:
            owner = self._find_owner(publication.target)
            if owner is None:
                orphans += 1
                logger.bind(
                    volume_id=publication.volume_id, target=str(publication.target)
                ).warning(
                    "mountpod: no Mount Pod references this target; it heals when kubelet "
                    "publishes it again"
                )
                continue
            self._state(owner).targets[publication.target] = publication
            self._owner[publication.target] = owner
        for state in list(self._states.values()):
            if state.targets:
                tasks.start_soon(self._heal, state.name, name=f"mountpod-heal-{state.name}")
        await self._collect_garbage(at_start=True)
        logger.info(
            "mountpod: {} target(s) on {} Mount Pod(s) taken over ({} without a pod)",
            len(self._owner),
            sum(1 for state in self._states.values() if state.targets),
            orphans,
        )
        self._ready = True

    async def publish(self, publication: Publication[MountPodSpec], secrets: Secrets) -> None:
        cluster = self._started()
        spec = publication.spec
        spec.client.check_secrets(spec.config, secrets)
        plan = self._plan(publication, secrets)
        log = logger.bind(volume_id=publication.volume_id, mount_pod=plan.name)
        async with self._locks.hold(plan.name):
            state = self._state(plan.name)
            state.manifest, state.secret = plan.manifest, plan.secret
            self._cancel_deletion(state)
            created = await self._add_ref(cluster, plan, publication.target)
            state.targets[publication.target] = publication
            self._owner[publication.target] = plan.name
        if created:
            log.info("mountpod: created Mount Pod {}", plan.name)
        try:
            await self._wait_live(plan.name, self.ready_timeout)
            async with self._locks.hold(plan.name):
                await self._bind(plan.name, publication)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._drop_target(plan.name, publication.target, grace=FAILED_START_GRACE)
            raise

    async def unpublish(self, publication: Publication[MountPodSpec]) -> None:
        await release_target(publication.target)
        if self.cluster is None:
            return  # never published here: without the API nothing could have been
        name = self._owner.get(publication.target) or self._find_owner(publication.target)
        if name is not None:
            await self._drop_target(name, publication.target)

    async def stats(self, publication: Publication[MountPodSpec]) -> VolumeStats:
        return await filesystem_stats(publication.target)

    async def expand(self, publication: Publication[MountPodSpec], capacity_bytes: int) -> None:
        # builtin re-reads the capacity the controller recorded by itself; a juicefs quota is
        # set when the client starts (docs/strategies/mountpod.md).
        return None

    async def aclose(self) -> None:
        # Mount Pods and their mounts outlive the node plugin on purpose.
        close = getattr(self.cluster, "aclose", None)
        if close is not None:
            await close()

    # -- planning ----------------------------------------------------------------------------

    def _plan(self, publication: Publication[MountPodSpec], secrets: Secrets) -> pods.MountPodPlan:
        spec = publication.spec
        whole_volume = spec.share == "volume"
        if spec.share == "volume":
            share_key = f"volume:{publication.volume_id}"
        elif spec.share == "storageClass":
            share_key = f"class:{spec.client.name}:{spec.class_key}"
        else:
            share_key = "filesystem:" + spec.client.filesystem_identity(spec.config, secrets)
        container = spec.client.container(
            spec.config,
            ClientMount(
                volume_id=publication.volume_id if whole_volume else "",
                mountpoint=pods.MOUNTPOINT_IN_POD,
                subdir=spec.path if whole_volume else PurePosixPath("."),
                capacity_bytes=spec.capacity_bytes if whole_volume else 0,
            ),
            secrets,
        )
        if not container.image:
            raise FailedPrecondition(
                f"no image for client {spec.client.name!r}: set the clientImage parameter or "
                "the driver's client_images setting"
            )
        return pods.plan_mount_pod(
            node=self.node,
            namespace=self._started().namespace,
            share_key=share_key,
            share_label=publication.volume_id if whole_volume else spec.share,
            volume_id=publication.volume_id if whole_volume else "",
            container=container,
            pod_settings=spec.pod,
            client_name=spec.client.name,
            host_dir=self.host_dir,
            secrets_digest=pods.secrets_digest(secrets),
        )

    def _mountpoint(self, name: str) -> Path:
        return self.host_dir / name / "mnt"

    def _source(self, name: str, publication: Publication[MountPodSpec]) -> Path:
        spec = publication.spec
        if spec.share == "volume":
            return self._mountpoint(name)
        return self._mountpoint(name) / spec.path

    # -- references --------------------------------------------------------------------------

    async def _add_ref(self, cluster: Cluster, plan: pods.MountPodPlan, target: Path) -> bool:
        """Reference the Mount Pod from `target`, creating the pod if needed; True if created."""
        key = pods.ref_key(target)
        pod = await self._wait_not_terminating(plan.name)
        if pod is None:
            if plan.secret is not None:
                try:
                    await cluster.create_secret(plan.secret)
                except ApiError as exc:
                    if not exc.already_exists:
                        raise
            await run_blocking(
                f"preparing {self._mountpoint(plan.name)}",
                _prepare_mountpoint,
                self._mountpoint(plan.name),
            )
            try:
                created = await cluster.create_pod(
                    pods.with_refs(plan.manifest, {key: str(target)})
                )
                self._remember(created)
                return True
            except ApiError as exc:
                if not exc.already_exists:
                    raise
                pod = await cluster.get_pod(plan.name)
                if pod is not None:
                    self._remember(pod)
        if pod is not None and pods.refs(pod).get(key) == str(target):
            return False
        await self._patch_refs(plan.name, {key: str(target)})
        return False

    async def _drop_target(self, name: str, target: Path, *, grace: float = 0.0) -> None:
        async with self._locks.hold(name):
            state = self._state(name)
            publication = state.targets.pop(target, None)
            self._owner.pop(target, None)
            key = pods.ref_key(target)
            if key in pods.refs(self._current(name)):
                await self._patch_refs(name, {key: None})
            if not pods.refs(self._current(name)) and not state.targets:
                delay = publication.spec.delete_delay if publication is not None else 0.0
                self._schedule_deletion(state, max(delay, grace))

    async def _patch_refs(self, name: str, changes: Mapping[str, str | None]) -> None:
        """Apply reference changes with a conditional patch; re-read and retry on conflict."""
        cluster = self._started()
        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(PATCH_ATTEMPTS),
            wait=wait_random_exponential(multiplier=0.05, max=1.0),
            retry=retry_if_exception(lambda exc: isinstance(exc, ApiError) and exc.conflict),
            before_sleep=_log_retry,
            reraise=True,
        ):
            with attempt:
                pod = self._current(name)
                if pod is None:
                    return
                patch = {
                    "metadata": {
                        "resourceVersion": pod["metadata"]["resourceVersion"],
                        "annotations": dict(changes),
                    }
                }
                try:
                    self._remember(await cluster.patch_pod(name, patch))
                except ApiError as exc:
                    if exc.not_found:
                        self._known.pop(name, None)
                        return
                    if exc.conflict:
                        fresh = await cluster.get_pod(name)
                        if fresh is None:
                            self._known.pop(name, None)
                            return
                        self._remember(fresh)
                    raise

    def _find_owner(self, target: Path) -> str | None:
        """The Mount Pod whose references include `target`, from the watched pods."""
        key = pods.ref_key(target)
        for pod in self._mount_pods():
            if key in pods.refs(pod):
                return str(pod["metadata"]["name"])
        return None

    # -- Mount Pod lifecycle -----------------------------------------------------------------

    def _schedule_deletion(self, state: MountPodState, delay: float) -> None:
        self._cancel_deletion(state)
        scope = anyio.CancelScope()
        state.deletion = scope
        assert self._tasks is not None
        self._tasks.start_soon(
            self._delete_when_unused, state, delay, scope, name=f"mountpod-delete-{state.name}"
        )

    def _cancel_deletion(self, state: MountPodState) -> None:
        if state.deletion is not None:
            state.deletion.cancel()
            state.deletion = None

    async def _delete_when_unused(
        self, state: MountPodState, delay: float, scope: anyio.CancelScope
    ) -> None:
        cluster = self._started()
        with scope:
            await anyio.sleep(delay)
            async with self._locks.hold(state.name):
                if state.deletion is not scope or state.targets:
                    return
                state.deletion = None
                pod = self._current(state.name)
                if pod is None or pods.refs(pod):
                    return
                try:
                    # Only the version we saw: a reference added meanwhile makes this a 409.
                    await cluster.delete_pod(
                        state.name, resource_version=pod["metadata"]["resourceVersion"]
                    )
                except ApiError as exc:
                    if exc.conflict:
                        return
                    raise
                await cluster.delete_secret(state.name)
                logger.bind(mount_pod=state.name).info("mountpod: deleted unused Mount Pod")

    async def _wait_not_terminating(self, name: str) -> Obj | None:
        """The Mount Pod, once it is not being deleted (None when it does not exist)."""
        with anyio.move_on_after(self.ready_timeout):
            while True:
                pod = self._current(name)
                if pod is None or not pod["metadata"].get("deletionTimestamp"):
                    return pod
                assert self.cache is not None
                with anyio.move_on_after(1.0):
                    await self.cache.changed()
        raise Unavailable(f"Mount Pod {name} is still terminating; retry later")

    async def _wait_live(self, name: str, timeout: float) -> None:
        """Wait until the client's mount answers; fail early if the pod cannot start."""
        cluster = self._started()
        assert self.cache is not None
        mountpoint = self._mountpoint(name)
        with anyio.move_on_after(timeout):
            while True:
                if await _is_live(mountpoint):
                    return
                reason = pods.stuck_reason(self._current(name))
                if reason is not None:
                    details = await cluster.describe_failure(name, pods.CONTAINER)
                    raise MountFailed(
                        f"Mount Pod {cluster.namespace}/{name} cannot run the client: "
                        f"{reason}; {details}"
                    )
                with anyio.move_on_after(LIVE_CHECK_INTERVAL):
                    await self.cache.changed()
        details = await cluster.describe_failure(name, pods.CONTAINER)
        raise Unavailable(
            f"Mount Pod {cluster.namespace}/{name} did not mount the filesystem within "
            f"{timeout:.0f}s; {details}"
        )

    async def _bind(self, name: str, publication: Publication[MountPodSpec]) -> None:
        source = self._source(name, publication)
        flags = bind_flags(readonly=publication.readonly, mount_flags=publication.mount_flags)
        make = publication.spec.share != "volume"
        await run_blocking(
            f"bind mount at {publication.target}",
            _bind_over_dead,
            source,
            publication.target,
            flags,
            make,
        )

    # -- watching and healing ----------------------------------------------------------------

    def _on_pod_change(self, old: Obj | None, new: Obj | None) -> None:
        """Called by the pod cache for every change on this node; never blocks."""
        assert self._tasks is not None and self.cluster is not None
        pod = new or old
        assert pod is not None
        if not pods.is_mount_pod(pod, self.cluster.namespace):
            if new is None and self._ready:  # an app pod is gone: drop what it left
                self._tasks.start_soon(self._collect_garbage, name="mountpod-gc")
            return
        name = str(pod["metadata"]["name"])
        state = self._states.get(name)
        if new is None:
            self._known.pop(name, None)
            if state is not None:
                state.last_seen = old
            if state is not None and state.targets:
                logger.bind(mount_pod=name).warning(
                    "mountpod: Mount Pod deleted while {} target(s) use it; recreating",
                    len(state.targets),
                )
                self._tasks.start_soon(self._heal, name, name=f"mountpod-heal-{name}")
            else:
                self._tasks.start_soon(self._forget, name, name=f"mountpod-forget-{name}")
            return
        if state is not None:
            state.last_seen = new
        restarted = pods.restarts(new) > pods.restarts(old) or (
            old is not None and old["metadata"].get("uid") != new["metadata"].get("uid")
        )
        stopped = pods.is_running(old) and not pods.is_running(new)
        if state is not None and state.targets and (restarted or stopped):
            logger.bind(mount_pod=name).warning(
                "mountpod: client of {} stopped (restarts: {}); healing its targets",
                name,
                pods.restarts(new),
            )
            self._tasks.start_soon(self._heal, name, name=f"mountpod-heal-{name}")

    async def _heal(self, name: str) -> None:
        """Bring the Mount Pod back if needed and stack a live bind on each of its targets."""
        state = self._state(name)
        if state.healing:
            state.heal_again = True
            return
        state.healing = True
        log = logger.bind(mount_pod=name)
        try:
            while True:
                state.heal_again = False
                async with self._locks.hold(name):
                    if not state.targets:
                        return
                    await run_blocking(
                        f"clearing {self._mountpoint(name)}",
                        mounts.detach_dead,
                        self._mountpoint(name),
                    )
                    await self._recreate_if_gone(state)
                try:
                    await self._wait_live(name, self.recovery_timeout)
                except Exception as exc:
                    log.error("mountpod: client did not come back: {}", exc)
                    return
                async with self._locks.hold(name):
                    for publication in list(state.targets.values()):
                        try:
                            await self._bind(name, publication)
                        except Exception as exc:
                            log.error("mountpod: re-bind of {} failed: {}", publication.target, exc)
                    log.info("mountpod: {} target(s) re-bound to the new mount", len(state.targets))
                if not state.heal_again:
                    return
        finally:
            state.healing = False

    async def _recreate_if_gone(self, state: MountPodState) -> None:
        cluster = self._started()
        pod = await self._wait_not_terminating(state.name)
        if pod is not None:
            return
        manifest = state.manifest or (
            pods.recreatable(state.last_seen) if state.last_seen else None
        )
        if manifest is None:
            raise Unavailable(f"Mount Pod {state.name} is gone and its manifest is unknown")
        references = {pods.ref_key(target): str(target) for target in state.targets}
        if state.secret is not None:
            try:
                await cluster.create_secret(state.secret)
            except ApiError as exc:
                if not exc.already_exists:
                    raise
        await run_blocking(
            f"preparing {self._mountpoint(state.name)}",
            _prepare_mountpoint,
            self._mountpoint(state.name),
        )
        try:
            self._remember(await cluster.create_pod(pods.with_refs(manifest, references)))
            logger.bind(mount_pod=state.name).info("mountpod: recreated Mount Pod")
        except ApiError as exc:
            if not exc.already_exists:
                raise

    async def _forget(self, name: str) -> None:
        """A Mount Pod nobody uses is gone: clear its directory on the host."""
        async with self._locks.hold(name):
            state = self._states.get(name)
            if state is not None and (state.targets or state.healing):
                return
            self._states.pop(name, None)
            await run_blocking(
                f"removing {self.host_dir / name}", _remove_pod_dir, self.host_dir / name
            )

    async def _collect_garbage(self, *, at_start: bool = False) -> None:
        """Drop references whose target is not published here and whose pod is gone (or, at
        start, that have no record at all); schedule unused Mount Pods for deletion."""
        assert self.cache is not None
        cluster = self._started()
        live = self.cache.uids()
        for pod in list(self._mount_pods()):
            name = str(pod["metadata"]["name"])
            async with self._locks.hold(name):
                state = self._state(name)
                stale: dict[str, str | None] = {}
                for key, target in pods.refs(self._current(name)).items():
                    if Path(target) in self._owner:
                        continue
                    uid = pods.pod_uid_of_target(target)
                    if at_start or (uid is not None and uid not in live):
                        stale[key] = None
                if stale:
                    logger.bind(mount_pod=name).info(
                        "mountpod: dropping {} reference(s) left by pods that are gone", len(stale)
                    )
                    await self._patch_refs(name, stale)
                current = self._current(name)
                if (
                    current is not None
                    and not pods.refs(current)
                    and not state.targets
                    and state.deletion is None
                    and not current["metadata"].get("deletionTimestamp")
                ):
                    self._schedule_deletion(state, 0.0 if at_start else FAILED_START_GRACE)
        if at_start:
            selector = f"{pods.SELECTOR},{pods.NODE_LABEL}={pods.label_value(self.node)}"
            names = {str(pod["metadata"]["name"]) for pod in self._mount_pods()}
            for secret in await cluster.list_secrets(selector):
                secret_name = str(secret["metadata"]["name"])
                if secret_name not in names:
                    await cluster.delete_secret(secret_name)

    # -- helpers -----------------------------------------------------------------------------

    def _started(self) -> Cluster:
        if self.cluster is None:
            if self.connect is None:
                raise FailedPrecondition(NO_CLUSTER)
            raise Unavailable("the mountpod strategy has not started yet")
        return self.cluster

    def _state(self, name: str) -> MountPodState:
        state = self._states.get(name)
        if state is None:
            state = self._states[name] = MountPodState(name)
        return state

    def _mount_pods(self) -> list[Obj]:
        assert self.cache is not None and self.cluster is not None
        namespace = self.cluster.namespace
        return [pod for pod in self.cache.pods.values() if pods.is_mount_pod(pod, namespace)]

    def _remember(self, pod: Obj) -> None:
        self._known[str(pod["metadata"]["name"])] = pod

    def _current(self, name: str) -> Obj | None:
        """The newest version of a Mount Pod we know: the watch's, or our own last write."""
        assert self.cache is not None and self.cluster is not None
        watched = self.cache.get(self.cluster.namespace, name)
        written = self._known.get(name)
        if written is None:
            return watched
        if watched is None:
            # Our write may not have reached the watch yet; a deletion has (it pops _known).
            return written
        if _version(written) > _version(watched):
            return written
        self._known.pop(name, None)
        return watched

    async def _own_image(self) -> str:
        """The node plugin's image: the default image of the builtin client."""
        cluster = self._started()
        pod = await cluster.get_pod(self.own_pod)
        for container in (pod or {}).get("spec", {}).get("containers", []):
            if container.get("name") == "fusecsi":
                return str(container["image"])
        logger.warning("mountpod: cannot find my own image (pod {})", self.own_pod)
        return ""


def _version(pod: Obj) -> int:
    try:
        return int(pod["metadata"]["resourceVersion"])
    except (KeyError, ValueError):
        return 0


def _log_retry(state: RetryCallState) -> None:
    logger.warning(
        "mountpod: reference update conflicted (attempt {}), retrying: {}",
        state.attempt_number,
        state.outcome.exception() if state.outcome else "",
    )


async def _is_live(mountpoint: Path) -> bool:
    try:
        return await run_blocking_for(
            LIVE_PROBE_TIMEOUT, f"checking {mountpoint}", lambda: _is_live_blocking(mountpoint)
        )
    except Unavailable:
        return False


def _is_live_blocking(mountpoint: Path) -> bool:
    entry = mounts.mounted_at(mountpoint)
    return entry is not None and entry.is_fuse and mounts.probe_statfs(mountpoint) is None


def _prepare_mountpoint(mountpoint: Path) -> None:
    mounts.detach_dead(mountpoint)  # what a crashed client left: the next one mounts cleanly
    mountpoint.mkdir(parents=True, exist_ok=True)


def _remove_pod_dir(directory: Path) -> None:
    mountpoint = directory / "mnt"
    while mounts.mounted_at(mountpoint) is not None:
        mounts.unmount(mountpoint, detach=True)
    for path in (mountpoint, directory):
        try:
            path.rmdir()
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning("mountpod: cannot remove {}: {}", path, exc.strerror)


def _bind_over_dead(source: Path, target: Path, flags: int, make_source: bool) -> None:
    """Bind `source` at `target`, stacked on top of a dead mount rather than replacing it.

    Stacking is what lets app containers recover: their view of the target is a slave of the
    target's mount, so a new mount *on* it propagates into them, while an unmount and a fresh
    bind would not. A live mount on the target is this publication's (the node layer checked
    the arguments), so it is left alone.
    """
    if make_source:
        try:
            source.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FailedPrecondition(f"cannot create {source}: {exc.strerror}") from exc
    if mounts.mounted_at(target) is not None:
        broken = mounts.probe_statfs(target)
        if broken is None:
            return
        if broken.errno not in mounts.DEAD_MOUNT_ERRNOS | {errno.ENODEV}:
            raise MountFailed(f"target {target} is unusable: {os.strerror(broken.errno or 0)}")
    mounts.bind(source, target, flags=flags)
