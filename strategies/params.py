"""Reading volume parameters (StorageClass `parameters`, PV `volumeAttributes`) into typed values.

Every strategy declares the keys it accepts; `Parameters` rejects any other key at once, naming
it and listing the known ones, so a typo in a StorageClass surfaces as a clear error rather than
a silently ignored setting.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import PurePosixPath

from strategies.errors import InvalidArgument
from strategies.system.paths import relative_path

# Keys Kubernetes itself puts into a volume context or CreateVolume parameters.
RESERVED_PREFIXES = ("csi.storage.k8s.io/", "storage.kubernetes.io/")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTPE]i?)?[bB]?\s*$")
_UNITS = {
    None: 1,
    "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}  # fmt: skip
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)$")
_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_size(value: str, *, field: str) -> int:
    """A Kubernetes-style quantity ('10Gi', '500M', '1024') in bytes."""
    match = _SIZE.match(value)
    if not match:
        raise InvalidArgument(field, f"{value!r} is not a size (examples: 1073741824, 10Gi, 500M)")
    number, unit = match.groups()
    return int(float(number) * _UNITS[unit])


def parse_duration(value: str, *, field: str) -> float:
    """A duration such as '30s', '5m', '250ms', in seconds."""
    match = _DURATION.match(value.strip())
    if not match:
        raise InvalidArgument(field, f"{value!r} is not a duration (examples: 30s, 5m, 250ms)")
    return float(match.group(1)) * _SECONDS[match.group(2)]


def without_reserved(values: Mapping[str, str]) -> dict[str, str]:
    """The user's own keys, without what Kubernetes adds (pod info, provisioner identity)."""
    return {key: value for key, value in values.items() if not key.startswith(RESERVED_PREFIXES)}


class Parameters(Mapping[str, str]):
    """The parameters of one volume, validated against the keys a strategy declares.

    `where` names the request field they came from (`volume_context`, `parameters`), so that
    every message points at what the user wrote: `volume_context.root: unknown root "x"`.
    """

    def __init__(self, values: Mapping[str, str], *, known: Mapping[str, str], where: str) -> None:
        self._values = dict(values)
        self.where = where
        unknown = sorted(set(self._values) - set(known))
        if unknown:
            allowed = ", ".join(sorted(known)) or "none"
            raise InvalidArgument(
                self.field(unknown[0]), f"unknown parameter; this strategy accepts: {allowed}"
            )

    def field(self, key: str) -> str:
        return f"{self.where}.{key}"

    def __getitem__(self, key: str) -> str:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def text(self, key: str, default: str) -> str:
        return self._values.get(key, default)

    def choice(self, key: str, allowed: tuple[str, ...], default: str) -> str:
        value = self._values.get(key, default)
        if value not in allowed:
            raise InvalidArgument(self.field(key), f"{value!r} is not one of: {', '.join(allowed)}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self._values.get(key)
        if value is None:
            return default
        if value.lower() in ("true", "yes", "1"):
            return True
        if value.lower() in ("false", "no", "0"):
            return False
        raise InvalidArgument(self.field(key), f"{value!r} is not a boolean (true or false)")

    def size(self, key: str) -> int | None:
        value = self._values.get(key)
        return None if value is None else parse_size(value, field=self.field(key))

    def duration(self, key: str, default: float) -> float:
        value = self._values.get(key)
        return default if value is None else parse_duration(value, field=self.field(key))

    def relative(self, key: str, default: str = "") -> PurePosixPath:
        return relative_path(self._values.get(key, default), field=self.field(key))
