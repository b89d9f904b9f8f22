"""sidecar: the node plugin mounts the target with a /dev/fuse fd and hands it to the pod's sidecar.

NodePublishVolume runs before the pod's containers start, so the node plugin does not wait for
the client: it opens /dev/fuse, mounts the target with `fd=N` (calls on it wait until a server
answers) and listens on the volume's socket in the pod's `fusecsi-sidecar` emptyDir. The
unprivileged sidecar (`fusecsi sidecar`, injected by the admission webhook) connects, receives
the fd with SCM_RIGHTS and serves it; the plugin then closes its own copy, so that a sidecar
that dies leaves a dead mount (ENOTCONN) rather than callers waiting forever.

A restarted sidecar connects again: the fd of the first connection belongs to a FUSE session
that already did its INIT handshake, which a new libfuse server cannot take over, so the plugin
mounts a fresh connection *on top of* the dead one and hands that. Containers that mount the
volume with `mountPropagation: HostToContainer` see it (as with Mount Pods).

Clients that cannot take an fd (juicefs, command) run in a privileged sidecar that mounts by
itself (see spec.py). For them NodePublish binds the emptyDir's `vol-<key>` directory onto the
target (a peer of the shared emptyDir mount), so that the bind of its client's mount the
sidecar stacks there, through its Bidirectional mount of the emptyDir, reaches the target and
the app containers, again on top when a restarted client mounts anew; and it leaves the
client's environment (its secret values included) in the pod's memory-backed emptyDir, where
only the sidecar reads it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shlex
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from anyio.abc import TaskGroup
from loguru import logger

from strategies.base import Publication, Secrets, Strategy, VolumeStats
from strategies.clients.base import ClientContainer
from strategies.errors import FailedPrecondition, Unavailable
from strategies.params import Parameters
from strategies.sidecar import contract
from strategies.sidecar.spec import (
    PARAMETERS,
    FdServing,
    PrivilegedServing,
    SidecarSpec,
    parse_sidecar_spec,
)
from strategies.system import fusefd, mounts
from strategies.system.blocking import run_blocking
from strategies.system.locks import KeyedLocks
from strategies.system.paths import resolve_inside
from strategies.system.targets import (
    bind_flags,
    check_directory_blocking,
    filesystem_stats,
    release_target,
)
from strategies.volumes import VolumeStore

ClaimOf = Callable[[str], Awaitable[tuple[str, str] | None]]
"""PV name -> (namespace, claim) of the PVC bound to it, or None (static volume, no API)."""
SidecarExpected = Callable[[str, str, str], Awaitable[bool | None]]
"""(namespace, pod, container) -> whether the pod has that container; None when unknown."""


@dataclass(eq=False)
class Handoff:
    """One published target: its socket, and how many fds it handed out."""

    publication: Publication[SidecarSpec]
    key: str
    listener: socket.socket | None = None
    first_fd: int | None = None
    handed: int = 0
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)


class SidecarStrategy(Strategy[SidecarSpec]):
    name = "sidecar"
    parameters = PARAMETERS

    def __init__(
        self,
        volumes: VolumeStore,
        *,
        claim_of: ClaimOf | None = None,
        sidecar_expected: SidecarExpected | None = None,
        images: Mapping[str, str] | None = None,
    ) -> None:
        self.volumes = volumes
        self.images = dict(images or {})
        self.claim_of = claim_of
        self.sidecar_expected = sidecar_expected
        self._handoffs: dict[Path, Handoff] = {}
        self._locks = KeyedLocks()
        self._tasks: TaskGroup | None = None

    def parse(self, params: Parameters) -> SidecarSpec:
        return parse_sidecar_spec(params, self.volumes.roots, self.images)

    def ready(self) -> bool:
        return self._tasks is not None

    async def start(
        self, publications: Sequence[Publication[SidecarSpec]], tasks: TaskGroup
    ) -> None:
        self._tasks = tasks
        for publication in publications:
            # The running sidecar keeps serving; listen again so that a restarted one can
            # reconnect (it gets a fresh mount stacked on the dead one). A privileged sidecar
            # needs nothing from the plugin once published.
            try:
                key = await self._key(publication)
                if isinstance(publication.spec.serving, PrivilegedServing):
                    self._handoffs[publication.target] = Handoff(publication, key)
                    continue
                await self._listen(Handoff(publication, key, handed=1))
            except Exception as exc:
                logger.bind(target=str(publication.target)).warning(
                    "sidecar: cannot listen for {} again: {}", publication.target, exc
                )

    async def publish(self, publication: Publication[SidecarSpec], secrets: Secrets) -> None:
        if self._tasks is None:
            raise Unavailable("the sidecar strategy has not started yet")
        target = publication.target
        async with self._locks.hold(target):
            if target in self._handoffs:
                return  # republished (kubelet does that): mounted and listening already
            key = await self._key(publication)
            emptydir = contract.emptydir_on_host(target)
            if emptydir is None:
                raise FailedPrecondition(
                    f"target_path {target} is not in a pod's directory: sidecar volumes are "
                    "published into pods only"
                )
            if not await run_blocking(f"checking {emptydir}", emptydir.is_dir):
                await self._explain_missing_sidecar(publication, key)
            serving = publication.spec.serving
            if isinstance(serving, FdServing):
                await self._publish_fd(publication, serving, key)
            else:
                await self._publish_privileged(publication, serving, key, emptydir, secrets)

    async def _publish_fd(
        self, publication: Publication[SidecarSpec], serving: FdServing, key: str
    ) -> None:
        target = publication.target
        await run_blocking(f"checking the volume of {target}", self._check_source, serving)
        flags = bind_flags(readonly=publication.readonly, mount_flags=publication.mount_flags)
        fd = await run_blocking(
            f"FUSE mount at {target}",
            fusefd.mount_fuse_fd,
            target,
            fsname=f"fusecsi:{publication.volume_id}",
            subtype="fusecsi",
            flags=flags,
        )
        handoff = Handoff(publication, key, first_fd=fd)
        try:
            await self._listen(handoff)
        except BaseException:
            os.close(fd)
            with anyio.CancelScope(shield=True):
                await release_target(target)
            raise

    async def _publish_privileged(
        self,
        publication: Publication[SidecarSpec],
        serving: PrivilegedServing,
        key: str,
        emptydir: Path,
        secrets: Secrets,
    ) -> None:
        """Leave the client's environment for the sidecar, and bind the emptyDir's volume
        directory onto the target for the sidecar's mounts to propagate to."""
        if publication.mount_flags:
            raise FailedPrecondition(
                f"mount flags ({', '.join(publication.mount_flags)}) cannot be applied to a mount "
                f"that client: {publication.spec.client} makes in its sidecar; use mountOptions"
            )
        serving.client.check_secrets(serving.config, secrets)
        environment = client_environment(
            serving.container(publication.volume_id, key, publication.spec.capacity_bytes, secrets)
        )
        if publication.readonly:
            variable = serving.client.read_only_env
            if variable is None:
                raise FailedPrecondition(
                    f"client: {publication.spec.client} cannot be made read-only by fusecsi in a "
                    "sidecar; mount it read-write, or use strategy: mountpod"
                )
            environment[variable] = "1"
        env_path = emptydir / contract.env_file_name(key)
        target = publication.target
        try:
            await run_blocking(
                f"writing {env_path}", _write_environment, emptydir, env_path, environment
            )
            await run_blocking(
                f"binding the volume directory onto {target}",
                _bind_volume_dir,
                emptydir,
                key,
                target,
            )
        except BaseException:
            with anyio.CancelScope(shield=True):
                await release_target(target)
                await run_blocking(f"removing {env_path}", _remove, env_path)
            raise
        self._handoffs[target] = Handoff(publication, key)

    async def unpublish(self, publication: Publication[SidecarSpec]) -> None:
        async with self._locks.hold(publication.target):
            handoff = self._handoffs.pop(publication.target, None)
            if handoff is not None:
                self._close(handoff)
            await release_target(publication.target)
            emptydir = contract.emptydir_on_host(publication.target)
            if handoff is not None and emptydir is not None:
                # Privileged mode: the sidecar's binds, stacked there (else kubelet could not
                # unmount the emptyDir). Nothing is mounted there in fd mode.
                await release_target(emptydir / contract.volume_dir_name(handoff.key))

    async def stats(self, publication: Publication[SidecarSpec]) -> VolumeStats:
        return await filesystem_stats(publication.target)

    async def expand(self, publication: Publication[SidecarSpec], capacity_bytes: int) -> None:
        # The sidecar's filesystem re-reads the volume's record by itself (as in Mount Pods).
        return None

    async def aclose(self) -> None:
        for handoff in list(self._handoffs.values()):
            self._close(handoff)
        self._handoffs.clear()

    # -- helpers -----------------------------------------------------------------------------

    async def _key(self, publication: Publication[SidecarSpec]) -> str:
        """The volume's socket key, as the webhook computed it (see contract)."""
        pod = publication.pod
        volume_dir = publication.target.parent.name  # PV name, or the inline volume's name
        if pod is not None and pod.ephemeral:
            return contract.inline_key(volume_dir)
        claim = await self.claim_of(volume_dir) if self.claim_of is not None else None
        if claim is None:
            return contract.inline_key(volume_dir)
        return contract.pvc_key(*claim)

    async def _explain_missing_sidecar(
        self, publication: Publication[SidecarSpec], key: str
    ) -> None:
        pod = publication.pod
        expected = None
        if pod is not None and self.sidecar_expected is not None:
            expected = await self.sidecar_expected(
                pod.namespace, pod.name, contract.container_name(key)
            )
        if expected is False:
            raise FailedPrecondition(
                f"pod {pod.namespace}/{pod.name} has no fusecsi sidecar for this volume: the "  # type: ignore[union-attr]
                "admission webhook did not inject it (was it down, or is injection disabled "
                f"for the pod or its namespace with {contract.OPT_OUT_LABEL}=disabled?); "
                "recreate the pod"
            )
        raise Unavailable(
            f"the pod's {contract.EMPTYDIR_VOLUME} emptyDir is not set up yet; kubelet retries"
        )

    def _check_source(self, serving: FdServing) -> None:
        location = serving.location
        source = resolve_inside(location.root, location.path, field="volume_context.path")
        check_directory_blocking(source, "volume directory")

    async def _listen(self, handoff: Handoff) -> None:
        """Listen on the volume's socket in the pod's emptyDir (created 0666 for the sidecar)."""
        target = handoff.publication.target
        emptydir = contract.emptydir_on_host(target)
        assert emptydir is not None and self._tasks is not None
        name = f"{handoff.key}.sock"

        def bind() -> socket.socket:
            directory = os.open(emptydir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                path = fusefd.short_socket_path(directory, name)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
                try:
                    listener.bind(path)
                    os.chmod(path, 0o666)
                    listener.listen(4)
                    listener.setblocking(False)
                except BaseException:
                    listener.close()
                    raise
                return listener
            finally:
                os.close(directory)

        handoff.listener = await run_blocking(f"listening in {emptydir}", bind)
        self._handoffs[target] = handoff
        self._tasks.start_soon(
            self._serve, handoff, handoff.listener, name=f"sidecar-{handoff.key}"
        )

    async def _serve(self, handoff: Handoff, listener: socket.socket) -> None:
        """Hand an fd to each sidecar that connects: the first gets the publish-time mount."""
        log = logger.bind(
            volume_id=handoff.publication.volume_id, target=str(handoff.publication.target)
        )
        with listener, handoff.scope:  # the listener closes here, once nothing waits on it
            while True:
                try:
                    await anyio.wait_readable(listener)
                except anyio.ClosedResourceError:
                    return
                try:
                    connection, _ = listener.accept()
                except BlockingIOError:
                    continue
                with connection:
                    connection.setblocking(True)
                    try:
                        await self._hand_over(handoff, connection)
                    except Exception as exc:
                        log.error("sidecar: handing the FUSE fd over failed: {}", exc)
                        continue
                log.info("sidecar: FUSE fd handed to the sidecar (connection {})", handoff.handed)

    async def _hand_over(self, handoff: Handoff, connection: socket.socket) -> None:
        publication = handoff.publication
        async with self._locks.hold(publication.target):
            fd = handoff.first_fd
            handoff.first_fd = None
            if fd is None:
                # A restarted sidecar: the previous session is dead; stack a fresh mount.
                flags = bind_flags(
                    readonly=publication.readonly, mount_flags=publication.mount_flags
                )
                fd = await run_blocking(
                    f"FUSE mount at {publication.target}",
                    fusefd.mount_fuse_fd,
                    publication.target,
                    fsname=f"fusecsi:{publication.volume_id}",
                    subtype="fusecsi",
                    flags=flags,
                )
            try:
                await run_blocking(
                    "sending the FUSE fd",
                    fusefd.send_fd,
                    connection,
                    fd,
                    self._message(publication),
                )
                handoff.handed += 1
            finally:
                os.close(fd)

    def _message(self, publication: Publication[SidecarSpec]) -> dict[str, object]:
        spec = publication.spec
        assert isinstance(spec.serving, FdServing)
        location = spec.serving.location
        record = self.volumes.record_file(publication.volume_id)
        return {
            "source": os.path.normpath(os.path.join(location.root, location.path)),
            "capacityBytes": spec.capacity_bytes,
            "capacityFile": os.fspath(record) if record is not None else None,
            "readOnly": publication.readonly,
            "fsname": f"fusecsi:{publication.volume_id}",
        }

    def _close(self, handoff: Handoff) -> None:
        handoff.scope.cancel()  # _serve then closes the listener
        handoff.listener = None
        if handoff.first_fd is not None:
            os.close(handoff.first_fd)
            handoff.first_fd = None
        emptydir = contract.emptydir_on_host(handoff.publication.target)
        if emptydir is not None:
            for name in (f"{handoff.key}.sock", contract.env_file_name(handoff.key)):
                _remove(emptydir / name)


def client_environment(container: ClientContainer) -> dict[str, str]:
    """The client container's env with the secret references resolved to their values."""
    environment = {}
    for item in container.env:
        reference = (item.get("valueFrom") or {}).get("secretKeyRef")
        value = container.secret_data[reference["key"]] if reference else item.get("value", "")
        environment[str(item["name"])] = str(value)
    return environment


def _write_environment(emptydir: Path, path: Path, environment: Mapping[str, str]) -> None:
    """Write `export NAME='value'` lines, readable by root only, into the pod's emptyDir; only
    when that emptyDir is in memory, since the values may be secret."""
    entry = mounts.mounted_at(emptydir)
    if environment and (entry is None or entry.fstype != "tmpfs"):
        raise FailedPrecondition(
            f"the pod's {contract.EMPTYDIR_VOLUME} emptyDir is not memory-backed (medium: "
            "Memory), so the client's credentials cannot be left there; recreate the pod so "
            "that the webhook sets it up"
        )
    lines = ["# The environment of the fusecsi sidecar's client, from the node plugin."]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in environment.items()]
    partial = path.with_name(path.name + ".new")
    _remove(partial)
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write("\n".join(lines) + "\n")
    os.replace(partial, path)


def _bind_volume_dir(emptydir: Path, key: str, target: Path) -> None:
    """Bind `<emptyDir>/vol-<key>` onto the target. The emptyDir is a shared mount (kubelet keeps
    its directory shared; made so here otherwise), so the bind is its peer: what the sidecar
    mounts on `vol-<key>` through its Bidirectional mount of the emptyDir appears on the target,
    and what it stacks later (a restarted client) appears on top, in the app containers too."""
    source = emptydir / contract.volume_dir_name(key)
    os.makedirs(source, exist_ok=True)
    os.makedirs(target, exist_ok=True)
    holder = mounts.mounted_at(emptydir)
    if holder is None:
        raise FailedPrecondition(f"the pod's {contract.EMPTYDIR_VOLUME} emptyDir is not a mount")
    if not holder.shared:
        mounts.make_shared(emptydir)
    if not mounts.is_mount_point(target):
        mounts.bind(source, target)


def _remove(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.ENAMETOOLONG, errno.ENOTDIR):
            logger.warning("sidecar: cannot remove {}: {}", path, exc)
