"""builtin: fusecsi's own passthrough filesystem (`fusecsi fuse`), serving a directory of a root.

The same filesystem the inprocess strategy runs, here inside a Mount Pod: it enforces the
volume's capacity (re-read from the volume's record when the controller expands it) and
needs nothing but the root mounted into the pod at its own path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from strategies.base import Secrets
from strategies.clients.base import Client, ClientContainer, ClientMount, host_directory
from strategies.errors import InvalidArgument
from strategies.params import Parameters
from strategies.volumes import Location, VolumeStore

# mountOptions the builtin filesystem understands, and the flag each becomes.
_OPTIONS = {
    "writeback-cache": "--writeback-cache",
    "read-ahead-kb": "--read-ahead-kb",
    "rescan-interval": "--rescan-interval",
    "debug": "--debug",
}


@dataclass(frozen=True, slots=True)
class BuiltinConfig:
    location: Location
    image: str
    flags: tuple[str, ...]


class BuiltinClient(Client[BuiltinConfig]):
    name = "builtin"
    parameters = {
        "root": "builtin: name of an allowed root that holds the data; default: `default`",
    }

    def __init__(self, volumes: VolumeStore) -> None:
        self.volumes = volumes

    def parse(self, params: Parameters, image: str) -> BuiltinConfig:
        location = self.volumes.roots.locate(params)
        return BuiltinConfig(location, params.text("clientImage", image), _flags(params))

    def check_secrets(self, config: BuiltinConfig, secrets: Secrets) -> None:
        return None  # a local directory needs no credentials

    def filesystem_identity(self, config: BuiltinConfig, secrets: Secrets) -> str:
        return f"builtin:{config.location.root_name}"

    def container(
        self, config: BuiltinConfig, mount: ClientMount, secrets: Secrets
    ) -> ClientContainer:
        root = os.fspath(config.location.root)
        command = [
            "fusecsi",
            "fuse",
            os.path.normpath(os.path.join(root, mount.subdir)),
            mount.mountpoint,
            "--fsname",
            f"fusecsi:{mount.volume_id}",
        ]
        if mount.capacity_bytes:
            command += ["--capacity", str(mount.capacity_bytes)]
        record = self.volumes.record_file(mount.volume_id)
        if record is not None and str(mount.subdir) != ".":
            # A dynamic volume's capacity lives in its record, which the controller rewrites
            # on expansion; the filesystem notices the change by itself.
            command += ["--capacity-file", os.fspath(record)]
        command += config.flags
        volume, volume_mount = host_directory("root", root)
        return ClientContainer(
            image=config.image, command=command, volumes=[volume], volume_mounts=[volume_mount]
        )


def _flags(params: Parameters) -> tuple[str, ...]:
    flags: list[str] = []
    for option in mount_options(params):
        key, _, value = option.partition("=")
        flag = _OPTIONS.get(key)
        if flag is None:
            raise InvalidArgument(
                params.field("mountOptions"),
                f"unknown option {key!r} for the builtin client; known: {', '.join(_OPTIONS)}",
            )
        flags += [flag, value] if value else [flag]
    return tuple(flags)


def mount_options(params: Parameters) -> list[str]:
    """The comma-separated `mountOptions` parameter as a list (empty items dropped)."""
    return [item.strip() for item in params.text("mountOptions", "").split(",") if item.strip()]
