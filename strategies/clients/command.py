"""command: any FUSE client (rclone, s3fs, sshfs, ...) from a command template and an image.

The template is split like a shell would (no shell runs it) and its placeholders are filled in:
`${mountpoint}`, `${path}` (the volume's directory, `.` for the whole filesystem), `${source}`
(the `source` parameter) and `${mountOptions}`. Every key of the volume's Secret becomes an
environment variable (upper case, `-` and `.` as `_`), read from a Secret, never from args.
"""

from __future__ import annotations

import hashlib
import re
import shlex
from dataclasses import dataclass

from strategies.base import Secrets
from strategies.clients.base import (
    Client,
    ClientContainer,
    ClientMount,
    env_name_for,
    host_directory,
    secret_env,
)
from strategies.clients.builtin import mount_options
from strategies.errors import InvalidArgument
from strategies.params import Parameters
from strategies.volumes import Roots

PLACEHOLDERS = ("mountpoint", "path", "source", "mountOptions")
_PLACEHOLDER = re.compile(r"\$\{([A-Za-z]+)\}")


@dataclass(frozen=True, slots=True)
class CommandConfig:
    argv: tuple[str, ...]
    source: str
    image: str
    options: str
    root_path: str  # an allowed root mounted into the pod ("" for none)


class CommandClient(Client[CommandConfig]):
    name = "command"
    parameters = {
        "command": "command: the client's command line, with ${mountpoint}, ${path}, ${source}",
        "source": "command: what ${source} stands for (a remote, a bucket, host:/dir)",
        "root": "name of an allowed root to mount into the client's pod at its own path",
    }

    def __init__(self, roots: Roots) -> None:
        self.roots = roots

    def parse(self, params: Parameters, image: str) -> CommandConfig:
        template = params.text("command", "")
        if not template:
            raise InvalidArgument(params.field("command"), "is required for client: command")
        try:
            argv = tuple(shlex.split(template))
        except ValueError as exc:
            raise InvalidArgument(params.field("command"), f"cannot be split: {exc}") from None
        for word in argv:
            for name in _PLACEHOLDER.findall(word):
                if name not in PLACEHOLDERS:
                    raise InvalidArgument(
                        params.field("command"),
                        f"unknown placeholder ${{{name}}}; known: "
                        + ", ".join(f"${{{p}}}" for p in PLACEHOLDERS),
                    )
        if not any("${mountpoint}" in word for word in argv):
            raise InvalidArgument(params.field("command"), "must contain ${mountpoint}")
        image = params.text("clientImage", image)
        root_path = ""
        if "root" in params:
            root_path = str(self.roots.path(params["root"], field=params.field("root")))
        return CommandConfig(
            argv, params.text("source", ""), image, ",".join(mount_options(params)), root_path
        )

    def check_secrets(self, config: CommandConfig, secrets: Secrets) -> None:
        for key in secrets:
            env_name_for(key, field="secrets")

    def filesystem_identity(self, config: CommandConfig, secrets: Secrets) -> str:
        digest = hashlib.sha256()
        for key in sorted(secrets):
            digest.update(f"{key}={secrets[key]}\0".encode())
        return f"command:{config.image}:{config.argv}:{config.source}:{digest.hexdigest()}"

    def container(
        self, config: CommandConfig, mount: ClientMount, secrets: Secrets
    ) -> ClientContainer:
        values = {
            "mountpoint": mount.mountpoint,
            "path": str(mount.subdir),
            "source": config.source,
            "mountOptions": config.options,
        }
        command = [
            _PLACEHOLDER.sub(lambda match: values[match.group(1)], word) for word in config.argv
        ]
        env = [secret_env(env_name_for(key, field="secrets"), key) for key in sorted(secrets)]
        volumes, mounts = [], []
        if config.root_path:
            volume, volume_mount = host_directory("root", config.root_path)
            volumes.append(volume)
            mounts.append(volume_mount)
        return ClientContainer(
            image=config.image,
            command=command,
            env=env,
            secret_data={key: secrets[key] for key in secrets},
            volumes=volumes,
            volume_mounts=mounts,
        )
