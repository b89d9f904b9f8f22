"""inprocess: one FUSE session per volume, served by the node plugin, bind-mounted into targets.

pyfuse3 keeps its session in module globals, so one Python process can serve exactly one FUSE
mount. The node plugin therefore runs each volume's filesystem as a child process
(`fusecsi fuse`), supervised from its task group: it starts the child, waits for the
mount to be live, restarts it if it dies, and re-binds every target of that volume to the new
mount. Children die with the plugin (PR_SET_PDEATHSIG); after a plugin restart, `start`
serves the recorded volumes again and replaces the dead binds.
"""

from __future__ import annotations

import hashlib
import os
import signal
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from anyio.abc import Process, TaskGroup
from loguru import logger

from strategies.base import Publication, Secrets, Strategy, VolumeStats
from strategies.errors import FailedPrecondition, MountFailed, Unavailable
from strategies.params import Parameters
from strategies.system import mounts
from strategies.system.blocking import run_blocking, run_blocking_for
from strategies.system.locks import KeyedLocks
from strategies.system.paths import resolve_inside
from strategies.system.targets import bind_target, check_directory, filesystem_stats, release_target
from strategies.volumes import Location, Roots, VolumeStore

RESTART_BACKOFF = (0.5, 1.0, 2.0, 5.0, 10.0)  # seconds between restarts of a crashed session
STOP_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class InprocessSpec:
    location: Location
    capacity_bytes: int  # from the `capacity` parameter (static volumes); 0 = unlimited


@dataclass(eq=False)
class Session:
    """One running `fusecsi fuse` child and the targets bound to its mount."""

    volume_id: str
    source: Path
    mountpoint: Path
    argv: list[str]
    targets: dict[Path, Publication[InprocessSpec]] = field(default_factory=dict)
    process: Process | None = None
    stderr_tail: deque[str] = field(default_factory=lambda: deque(maxlen=20))
    stopping: bool = False
    exited: anyio.Event = field(default_factory=anyio.Event)


class InprocessStrategy(Strategy[InprocessSpec]):
    name = "inprocess"
    parameters = {
        "root": "name of an allowed root (driver setting --root NAME=PATH); default: `default`",
        "path": "directory of the volume, relative to the root; default: the root itself",
        "capacity": "capacity of a static volume (e.g. 10Gi); dynamic volumes use the PVC's size",
    }

    def __init__(
        self,
        roots: Roots,
        volumes: VolumeStore,
        *,
        state_dir: Path,
        fuse_command: tuple[str, ...],
        start_timeout: float,
    ) -> None:
        self.roots = roots
        self.volumes = volumes
        self.state_dir = state_dir
        self.fuse_command = fuse_command
        self.start_timeout = start_timeout
        self._sessions: dict[str, Session] = {}
        self._volume_locks = KeyedLocks()
        self._tasks: TaskGroup | None = None
        self._ready = False

    def parse(self, params: Parameters) -> InprocessSpec:
        return InprocessSpec(self.roots.locate(params), params.size("capacity") or 0)

    def ready(self) -> bool:
        return self._ready

    async def start(
        self, publications: Sequence[Publication[InprocessSpec]], tasks: TaskGroup
    ) -> None:
        self._tasks = tasks
        by_volume: dict[str, list[Publication[InprocessSpec]]] = {}
        for publication in publications:
            by_volume.setdefault(publication.volume_id, []).append(publication)
        for volume_id, owned in by_volume.items():
            log = logger.bind(volume_id=volume_id)
            try:
                async with self._volume_locks.hold(volume_id):
                    session = await self._session_for(owned[0])
                    for publication in owned:
                        await self._bind(session, publication)
                log.info("inprocess: took over {} target(s)", len(owned))
            except Exception as exc:
                # The targets stay recorded; kubelet's next publish or unpublish retries them.
                log.error("inprocess: could not take over volume: {}", exc)
        self._ready = True

    async def publish(self, publication: Publication[InprocessSpec], secrets: Secrets) -> None:
        if self._tasks is None:
            raise Unavailable("the inprocess strategy has not started yet")
        async with self._volume_locks.hold(publication.volume_id):
            session = await self._session_for(publication)
            try:
                await self._bind(session, publication)
            except Exception:
                session.targets.pop(publication.target, None)
                if not session.targets:
                    await self._stop(session)
                raise

    async def unpublish(self, publication: Publication[InprocessSpec]) -> None:
        await release_target(publication.target)
        async with self._volume_locks.hold(publication.volume_id):
            session = self._sessions.get(publication.volume_id)
            if session is None:
                return
            session.targets.pop(publication.target, None)
            if not session.targets:
                await self._stop(session)

    async def stats(self, publication: Publication[InprocessSpec]) -> VolumeStats:
        return await filesystem_stats(publication.target)

    async def expand(self, publication: Publication[InprocessSpec], capacity_bytes: int) -> None:
        """The controller already wrote the new capacity; tell the session to re-read it now."""
        session = self._sessions.get(publication.volume_id)
        if (
            session is not None
            and session.process is not None
            and session.process.returncode is None
        ):
            session.process.send_signal(signal.SIGHUP)

    async def aclose(self) -> None:
        for session in list(self._sessions.values()):
            await self._stop(session)

    # -- sessions -------------------------------------------------------------------------

    async def _bind(self, session: Session, publication: Publication[InprocessSpec]) -> None:
        session.targets[publication.target] = publication
        await bind_target(
            session.mountpoint,
            publication.target,
            readonly=publication.readonly,
            mount_flags=publication.mount_flags,
        )

    async def _session_for(self, publication: Publication[InprocessSpec]) -> Session:
        """The live session of the publication's volume; started if there is none."""
        session = self._sessions.get(publication.volume_id)
        if (
            session is not None
            and session.process is not None
            and session.process.returncode is None
        ):
            return session
        location = publication.spec.location
        source = await run_blocking(
            f"resolving {location.directory}",
            resolve_inside,
            location.root,
            location.path,
            field="volume_context.path",
        )
        await check_directory(source, "volume directory")
        digest = hashlib.sha256(publication.volume_id.encode()).hexdigest()[:24]
        mountpoint = self.state_dir / digest / "mnt"
        argv = [
            *self.fuse_command,
            os.fspath(source),
            os.fspath(mountpoint),
            "--fsname",
            f"fusecsi:{publication.volume_id}",
        ]
        if publication.spec.capacity_bytes:
            argv += ["--capacity", str(publication.spec.capacity_bytes)]
        capacity_file = self.volumes.record_file(publication.volume_id)
        if capacity_file is not None:
            argv += ["--capacity-file", os.fspath(capacity_file)]
        previous = self._sessions.get(publication.volume_id)
        session = Session(publication.volume_id, source, mountpoint, argv)
        await self._launch(session)
        self._sessions[publication.volume_id] = session
        assert self._tasks is not None
        self._tasks.start_soon(self._supervise, session, name=f"inprocess-{publication.volume_id}")
        if previous is not None:
            # A session whose supervisor gave up: its targets come back with the new one.
            for old in previous.targets.values():
                await self._bind(session, old)
        return session

    async def _launch(self, session: Session) -> None:
        """Start the child and wait until it says the mount is live (or fail with its stderr)."""
        await run_blocking(f"preparing {session.mountpoint}", _clear_mountpoint, session.mountpoint)
        read_end, write_end = os.pipe()
        try:
            process = await anyio.open_process(
                [*session.argv, "--ready-fd", str(write_end)],
                stdin=None,
                stdout=None,
                pass_fds=(write_end,),
            )
        finally:
            os.close(write_end)
        session.process = process
        session.exited = anyio.Event()
        assert self._tasks is not None
        self._tasks.start_soon(self._forward_stderr, session, process, name="inprocess-stderr")
        try:
            answer = await run_blocking_for(
                self.start_timeout,
                f"starting the FUSE session of {session.volume_id}",
                lambda: os.read(read_end, 16),
            )
        except Unavailable:
            process.kill()
            raise
        finally:
            os.close(read_end)
        if answer != b"ready\n":
            await process.wait()
            tail = " | ".join(session.stderr_tail) or "no output"
            raise MountFailed(
                f"FUSE session for {session.volume_id} exited with {process.returncode}: {tail}"
            )
        logger.bind(volume_id=session.volume_id).info(
            "inprocess: serving {} at {}", session.source, session.mountpoint
        )

    async def _forward_stderr(self, session: Session, process: Process) -> None:
        assert process.stderr is not None
        buffer = b""
        async for chunk in process.stderr:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                text = line.decode(errors="replace").rstrip()
                session.stderr_tail.append(text)
                logger.bind(volume_id=session.volume_id).debug("fuse: {}", text)

    async def _supervise(self, session: Session) -> None:
        """Restart a session whose process died unexpectedly, then re-bind its targets."""
        attempt = 0
        while True:
            assert session.process is not None
            code = await session.process.wait()
            session.exited.set()
            if session.stopping or self._sessions.get(session.volume_id) is not session:
                return
            log = logger.bind(volume_id=session.volume_id)
            log.error(
                "inprocess: FUSE session exited with {}: {}", code, " | ".join(session.stderr_tail)
            )
            if attempt >= len(RESTART_BACKOFF):
                log.error("inprocess: giving up after {} restarts; targets stay broken", attempt)
                return
            await anyio.sleep(RESTART_BACKOFF[attempt])
            attempt += 1
            try:
                async with self._volume_locks.hold(session.volume_id):
                    if session.stopping:
                        return
                    await self._launch(session)
                    for publication in list(session.targets.values()):
                        await self._bind(session, publication)
                log.info(
                    "inprocess: session restarted, {} target(s) re-bound", len(session.targets)
                )
                attempt = 0
            except Exception as exc:
                log.error("inprocess: restart failed: {}", exc)

    async def _stop(self, session: Session) -> None:
        session.stopping = True
        if self._sessions.get(session.volume_id) is session:
            del self._sessions[session.volume_id]
        process = session.process
        if process is not None:
            with anyio.CancelScope(shield=True):
                if process.returncode is None:
                    process.terminate()
                    with anyio.move_on_after(STOP_TIMEOUT):
                        await process.wait()
                    if process.returncode is None:
                        process.kill()
                await process.aclose()  # reaps it and closes its pipes
        await run_blocking(
            f"unmounting {session.mountpoint}", _clear_mountpoint, session.mountpoint
        )
        logger.bind(volume_id=session.volume_id).info("inprocess: session stopped")


def _clear_mountpoint(mountpoint: Path) -> None:
    """Detach whatever a previous session left (a dead FUSE mount), then make the directory."""
    while mounts.mounted_at(mountpoint) is not None:
        mounts.unmount(mountpoint, detach=True)
    try:
        mountpoint.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FailedPrecondition(f"cannot create {mountpoint}: {exc.strerror}") from exc
