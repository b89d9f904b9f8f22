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
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from anyio.abc import TaskGroup
from loguru import logger

from strategies.base import Publication, Secrets, Strategy, VolumeStats
from strategies.errors import FailedPrecondition, Unavailable
from strategies.params import Parameters
from strategies.sidecar import contract
from strategies.sidecar.spec import PARAMETERS, SidecarSpec, parse_sidecar_spec
from strategies.system import fusefd
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
    ) -> None:
        self.volumes = volumes
        self.claim_of = claim_of
        self.sidecar_expected = sidecar_expected
        self._handoffs: dict[Path, Handoff] = {}
        self._locks = KeyedLocks()
        self._tasks: TaskGroup | None = None

    def parse(self, params: Parameters) -> SidecarSpec:
        return parse_sidecar_spec(params, self.volumes.roots)

    def ready(self) -> bool:
        return self._tasks is not None

    async def start(
        self, publications: Sequence[Publication[SidecarSpec]], tasks: TaskGroup
    ) -> None:
        self._tasks = tasks
        for publication in publications:
            # The running sidecar keeps serving; listen again so that a restarted one can
            # reconnect (it gets a fresh mount stacked on the dead one).
            try:
                key = await self._key(publication)
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
            current = self._handoffs.get(target)
            if current is not None and current.listener is not None:
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
            await run_blocking(
                f"checking the volume of {target}", self._check_source, publication.spec
            )
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

    async def unpublish(self, publication: Publication[SidecarSpec]) -> None:
        async with self._locks.hold(publication.target):
            handoff = self._handoffs.pop(publication.target, None)
            if handoff is not None:
                self._close(handoff)
            await release_target(publication.target)

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

    def _check_source(self, spec: SidecarSpec) -> None:
        source = resolve_inside(spec.location.root, spec.location.path, field="volume_context.path")
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
        location = spec.location
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
            try:
                os.unlink(emptydir / f"{handoff.key}.sock")
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ENAMETOOLONG, errno.ENOTDIR):
                    logger.warning("sidecar: cannot remove the socket: {}", exc)
