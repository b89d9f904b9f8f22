"""Volumes as directories of a shared filesystem, and the small records that describe them.

A dynamically provisioned volume is a subdirectory of one of the admin's roots. Its record,
`<root>/.fusecsi/volumes/<name>.json`, lives in the shared filesystem itself, next to the data
and outside every volume's directory, so that the controller and every node read the same
truth (capacity after an expansion, what to do on delete) without any other store, and an
application cannot edit its own quota. Volume IDs have the form `<root>/<name>`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Literal

from loguru import logger

from strategies.errors import AlreadyExists, InvalidArgument, NotFound
from strategies.params import Parameters
from strategies.system.blocking import run_blocking, run_blocking_for
from strategies.system.paths import relative_path

META_DIR = ".fusecsi"
OnDelete = Literal["delete", "retain", "archive"]
ON_DELETE_CHOICES: tuple[OnDelete, ...] = ("delete", "retain", "archive")


@dataclass(frozen=True, slots=True)
class Location:
    """Where a volume's data lives: a named root and a path below it."""

    root_name: str
    root: Path
    path: PurePosixPath

    @property
    def directory(self) -> Path:
        return self.root / self.path


class Roots:
    """The directories the admin allows volumes to live in, by name (from the driver settings)."""

    def __init__(self, roots: Mapping[str, Path]) -> None:
        self._roots = dict(roots)

    def __contains__(self, name: object) -> bool:
        return name in self._roots

    def names(self) -> list[str]:
        return sorted(self._roots)

    def path(self, name: str, *, field: str) -> Path:
        try:
            return self._roots[name]
        except KeyError:
            allowed = ", ".join(self.names()) or "none configured"
            raise InvalidArgument(
                field, f"unknown root {name!r}; allowed roots: {allowed}"
            ) from None

    def default_name(self) -> str:
        """`default` if configured, else the only root; empty when the choice is ambiguous."""
        if "default" in self._roots:
            return "default"
        return next(iter(self._roots)) if len(self._roots) == 1 else ""

    def locate(self, params: Parameters) -> Location:
        """Read the `root` and `path` parameters; `path` may not reach into fusecsi's metadata."""
        root_name = params.text("root", self.default_name())
        root = self.path(root_name, field=params.field("root"))
        path = params.relative("path")
        if path.parts and path.parts[0] == META_DIR:
            raise InvalidArgument(
                params.field("path"), f"{META_DIR}/ is reserved for fusecsi's records"
            )
        return Location(root_name, root, path)


@dataclass(frozen=True, slots=True)
class VolumeRecord:
    """What the controller knows of a volume; the file is the source of truth."""

    name: str
    root: str
    path: str
    capacity_bytes: int
    on_delete: OnDelete
    context: dict[str, str] = field(default_factory=dict)
    created_at: float = 0.0

    @property
    def volume_id(self) -> str:
        return volume_id_for(self.root, self.name)


MAX_VOLUME_ID = 128  # CSI: a volume ID must not exceed 128 bytes


def volume_id_for(root: str, name: str) -> str:
    """`<root>/<name>`, with the name replaced by its digest when the ID would pass 128 bytes."""
    volume_id = f"{root}/{name}"
    if len(volume_id.encode()) <= MAX_VOLUME_ID:
        return volume_id
    return f"{root}/h-{hashlib.sha256(name.encode()).hexdigest()[:40]}"


def split_volume_id(volume_id: str) -> tuple[str, str] | None:
    """`<root>/<name>` -> (root, name); None for IDs fusecsi did not make (static PVs)."""
    root, sep, name = volume_id.partition("/")
    if not sep or not root or not name or "/" in name or name in (".", ".."):
        return None
    return root, name


class VolumeStore:
    """Create, find, resize and delete directory volumes; idempotent by name as CSI requires."""

    def __init__(self, roots: Roots, *, delete_timeout: float = 600.0) -> None:
        self.roots = roots
        self.delete_timeout = delete_timeout

    def record_file(self, volume_id: str) -> Path | None:
        """Where the record of `volume_id` lives, or None when the ID is not one of ours."""
        parts = split_volume_id(volume_id)
        if parts is None or parts[0] not in self.roots:
            return None
        root, key = parts
        return self.roots.path(root, field="volume_id") / META_DIR / "volumes" / f"{key}.json"

    async def get(self, volume_id: str) -> VolumeRecord | None:
        path = self.record_file(volume_id)
        if path is None:
            return None
        return await run_blocking(f"reading {path}", _read_record, path)

    async def create(
        self,
        *,
        name: str,
        location: Location,
        capacity_bytes: int,
        on_delete: OnDelete,
        context: Mapping[str, str],
    ) -> VolumeRecord:
        """Make the directory and its record; the same request again returns the same volume."""
        wanted = VolumeRecord(
            name=name,
            root=location.root_name,
            path=str(location.path),
            capacity_bytes=capacity_bytes,
            on_delete=on_delete,
            context=dict(context),
        )
        record_path = self.record_file(wanted.volume_id)
        if record_path is None:
            raise InvalidArgument(
                "name", f"{name!r} cannot be a volume name (it must not contain '/')"
            )
        existing = await self.get(wanted.volume_id)
        if existing is not None:
            if replace(existing, created_at=0.0) != wanted:
                raise AlreadyExists(
                    f"volume {name!r} exists with other parameters "
                    f"(capacity {existing.capacity_bytes}, path {existing.path!r})"
                )
            return existing
        record = replace(wanted, created_at=time.time())
        await run_blocking(f"creating {location.directory}", _create, location, record_path, record)
        logger.bind(volume_id=record.volume_id).info("created directory {}", location.directory)
        return record

    async def resize(self, volume_id: str, capacity_bytes: int) -> VolumeRecord:
        record = await self.get(volume_id)
        if record is None:
            raise NotFound(f"volume {volume_id!r} does not exist")
        if capacity_bytes <= record.capacity_bytes:
            return record
        updated = replace(record, capacity_bytes=capacity_bytes)
        path = self.record_file(volume_id)
        assert path is not None  # get() found a record, so the ID is ours
        await run_blocking(f"writing {path}", _write_record, path, updated)
        return updated

    async def delete(self, volume_id: str) -> None:
        """Apply the volume's onDelete policy, then drop its record. A missing volume is fine."""
        record = await self.get(volume_id)
        if record is None:
            return
        root = self.roots.path(record.root, field="volume_id")
        directory = root / record.path
        log = logger.bind(volume_id=volume_id)
        if record.on_delete == "delete":
            await run_blocking_for(
                self.delete_timeout, f"deleting {directory}", lambda: _remove_tree(root, directory)
            )
            log.info("deleted directory {}", directory)
        elif record.on_delete == "archive":
            archived = await run_blocking(f"archiving {directory}", _archive, root, record)
            log.info("archived directory {} to {}", directory, archived)
        else:
            log.info("retained directory {}", directory)
        path = self.record_file(volume_id)
        assert path is not None
        await run_blocking(f"removing {path}", path.unlink, missing_ok=True)


_RECORD_KEYS = {
    "name": "name",
    "root": "root",
    "path": "path",
    "capacity_bytes": "capacityBytes",
    "on_delete": "onDelete",
    "context": "context",
    "created_at": "createdAt",
}


def _read_record(path: Path) -> VolumeRecord | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    return VolumeRecord(**{attr: data[key] for attr, key in _RECORD_KEYS.items() if key in data})


def _write_record(path: Path, record: VolumeRecord) -> None:
    """Write atomically (temp file, fsync, rename): a reader never sees half a record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_suffix(f".tmp-{os.getpid()}")
    with temp.open("w") as handle:
        json.dump(
            {key: getattr(record, attr) for attr, key in _RECORD_KEYS.items()},
            handle,
            sort_keys=True,
        )
        handle.flush()
        os.fsync(handle.fileno())
    temp.replace(path)


def _create(location: Location, record_path: Path, record: VolumeRecord) -> None:
    directory = location.directory
    directory.mkdir(parents=True, exist_ok=True)
    # Volumes are shared between pods running as different users: the directory is world
    # writable, like the subdirectories of other shared-filesystem provisioners.
    directory.chmod(0o777)
    _write_record(record_path, record)


def _remove_tree(root: Path, directory: Path) -> None:
    """Move the tree aside (atomic), then delete it: a retry never finds half a volume in place."""
    if not directory.exists() or directory == root:
        return
    trash = root / META_DIR / "trash" / f"{directory.name}-{time.time_ns()}"
    trash.parent.mkdir(parents=True, exist_ok=True)
    directory.rename(trash)
    shutil.rmtree(trash)


def _archive(root: Path, record: VolumeRecord) -> Path | None:
    directory = root / record.path
    if not directory.exists() or directory == root:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = root / META_DIR / "archive" / f"{record.volume_id.partition('/')[2]}-{stamp}"
    target.parent.mkdir(parents=True, exist_ok=True)
    directory.rename(target)
    return target


def volume_path_from_pattern(
    pattern: str, metadata: Mapping[str, str], *, field: str
) -> PurePosixPath:
    """Expand a `pathPattern` such as `${pvc.namespace}/${pvc.name}` with the PVC's metadata."""
    names = {
        "pvc.name": metadata.get("csi.storage.k8s.io/pvc/name"),
        "pvc.namespace": metadata.get("csi.storage.k8s.io/pvc/namespace"),
        "pv.name": metadata.get("csi.storage.k8s.io/pv/name"),
    }
    result = pattern
    for placeholder in _placeholders(pattern, field=field):
        if placeholder not in names:
            raise InvalidArgument(
                field,
                f"unknown placeholder ${{{placeholder}}}; use one of: "
                + ", ".join(f"${{{name}}}" for name in names),
            )
        value = names[placeholder]
        if not value:
            raise InvalidArgument(
                field,
                f"${{{placeholder}}} is unknown for this request; run external-provisioner with "
                "--extra-create-metadata",
            )
        result = result.replace(f"${{{placeholder}}}", value)
    path = relative_path(result, field=field)
    if not path.parts:
        raise InvalidArgument(field, f"{pattern!r} expands to an empty path")
    return path


def _placeholders(pattern: str, *, field: str) -> list[str]:
    found, rest = [], pattern
    while "${" in rest:
        start = rest.index("${") + 2
        end = rest.find("}", start)
        if end < 0:
            raise InvalidArgument(field, f"unclosed '${{' in {pattern!r}")
        found.append(rest[start:end])
        rest = rest[end + 1 :]
    return found
