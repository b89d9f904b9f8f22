"""The node's record of which volume is published at which target, by which strategy.

NodeUnpublishVolume carries only a volume ID and a target, so the node must remember which
strategy owns a target and with what parameters (to answer a repeated publish with OK or
ALREADY_EXISTS, and to take targets over after a restart). One small JSON file per target in
the state directory: written before anything is mounted, removed after the unmount. The
default state directory is on tmpfs (`/run/fusecsi`) on purpose: records then live exactly as
long as the mounts they describe, which a reboot also clears.
"""

from __future__ import annotations

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
        self._by_target: dict[str, dict[str, Any]] = {}

    def _file(self, target: Path) -> Path:
        digest = hashlib.sha256(os.fsencode(target)).hexdigest()[:40]
        return self.directory / f"{digest}.json"

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
        return list(self._by_target.values())

    def get(self, target: Path) -> dict[str, Any] | None:
        return self._by_target.get(str(target))

    def save(self, target: Path, record_json: str) -> None:
        """Atomically write the record for `target` (blocking; small and on tmpfs)."""
        path = self._file(target)
        temp = path.with_suffix(".tmp")
        try:
            handle = temp.open("w")
        except FileNotFoundError:  # the directory is made on first use, not stat'ed every time
            self.directory.mkdir(parents=True, exist_ok=True)
            handle = temp.open("w")
        with handle:
            handle.write(record_json)
            handle.flush()
            os.fsync(handle.fileno())
        temp.replace(path)
        self._by_target[str(target)] = json.loads(record_json)

    def remove(self, target: Path) -> None:
        self._file(target).unlink(missing_ok=True)
        self._by_target.pop(str(target), None)

    def all(self) -> list[dict[str, Any]]:
        return list(self._by_target.values())
