"""The node's record of which volume is published at which target, by which strategy.

NodeUnpublishVolume carries only a volume ID and a target, so the node must remember which
strategy owns a target and with what parameters (to answer a repeated publish with OK or
ALREADY_EXISTS, and to take targets over after a restart). One small JSON file per target in
the state directory: written before anything is mounted, removed after the unmount. The
default state directory is on tmpfs (`/run/fusecsi`) on purpose: records then live exactly as
long as the mounts they describe, which a reboot also clears.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from loguru import logger


class PublicationRecords:
    """Raw records (parsed JSON) by target path, with an in-memory index for the hot path."""

    def __init__(self, state_dir: Path) -> None:
        self.directory = state_dir / "targets"
        self._prefix = os.fspath(self.directory) + "/"
        # Parsed records, or the JSON text of those saved since the start (parsed when read:
        # nothing on the publish path reads them back).
        self._by_target: dict[str, dict[str, Any] | str] = {}

    def _file(self, target: Path) -> Path:
        return Path(self._path(target))

    def _path(self, target: Path) -> str:
        digest = hashlib.sha256(os.fsencode(target)).hexdigest()[:40]
        return f"{self._prefix}{digest}.json"

    def load(self) -> list[dict[str, Any]]:
        """Read every record from disk (at start-up); unreadable files are logged and kept aside."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._by_target.clear()
        for path in sorted(self.directory.glob("*.json")):
            try:
                record = json.loads(path.read_text())
                self._by_target[record["target"]] = record
            except (OSError, ValueError, KeyError) as exc:
                logger.error("ignoring unreadable publication record {}: {}", path, exc)
                path.rename(path.with_suffix(".broken"))
        return self.all()

    def get(self, target: Path) -> dict[str, Any] | None:
        key = str(target)
        record = self._by_target.get(key)
        if isinstance(record, str):
            record = self._by_target[key] = json.loads(record)
        return record

    def save(self, target: Path, record_json: str) -> None:
        """Atomically write the record for `target` (blocking; small and on tmpfs).

        Written to a temporary file, fsync'ed, then renamed over the record: a crash leaves
        the old record or the new one, never a torn one. Plain os calls (no file objects):
        this runs on every publish.
        """
        path = self._path(target)
        temp = path[: -len(".json")] + ".tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        try:
            fd = os.open(temp, flags, 0o644)
        except FileNotFoundError:  # the directory is made on first use, not stat'ed every time
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(temp, flags, 0o644)
        try:
            data = record_json.encode()
            while data:
                data = data[os.write(fd, data) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
        self._by_target[str(target)] = record_json

    def remove(self, target: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(target))
        self._by_target.pop(str(target), None)

    def all(self) -> list[dict[str, Any]]:
        for key, record in self._by_target.items():
            if isinstance(record, str):
                self._by_target[key] = json.loads(record)
        return [record for record in self._by_target.values() if isinstance(record, dict)]
