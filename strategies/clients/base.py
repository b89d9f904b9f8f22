"""The Client contract, and the container a client asks for.

Secrets never appear in a client's command line or in annotations: a client names the secret
values it needs (`secret_data`), the strategy puts them in a Secret next to the pod, and the
container reads them through `secretKeyRef` environment variables.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, ClassVar, Generic, TypeVar

from strategies.base import Secrets
from strategies.errors import InvalidArgument
from strategies.params import Parameters

ConfigT = TypeVar("ConfigT")
Obj = dict[str, Any]

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True, kw_only=True)
class ClientMount:
    """What the strategy asks a client to serve, and where."""

    volume_id: str
    mountpoint: str
    """The mount point inside the client's container."""
    subdir: PurePosixPath
    """Directory of the filesystem to mount; `.` mounts the whole filesystem."""
    capacity_bytes: int = 0
    """Capacity to enforce at `subdir` (quota), when the client can; 0 for none."""


@dataclass(frozen=True, kw_only=True)
class ClientContainer:
    """The container that runs a client, before the strategy wraps it into a pod."""

    image: str
    command: list[str]
    env: list[Obj] = field(default_factory=list)
    secret_data: dict[str, str] = field(default_factory=dict)
    """Values for the pod's Secret; `env` refers to them by key."""
    volumes: list[Obj] = field(default_factory=list)
    volume_mounts: list[Obj] = field(default_factory=list)


class Client(abc.ABC, Generic[ConfigT]):
    """One kind of FUSE client. One instance serves every volume that names it."""

    name: ClassVar[str]
    """The value of the `client` parameter that selects this client."""

    parameters: ClassVar[Mapping[str, str]]
    """The parameter keys this client reads, with a one-line description each."""

    cache_dir: ClassVar[str | None] = None
    """Where the client keeps its cache in its container, if it has one: a strategy may put a
    volume of its own there."""

    read_only_env: ClassVar[str | None] = None
    """An env var that, set to 1, makes the container mount read-only; None if there is none
    (a strategy that binds the client's mount read-only does not need it)."""

    @abc.abstractmethod
    def parse(self, params: Parameters, image: str) -> ConfigT:
        """Validate this client's parameters; `image` is the admin's default image ("" if none).

        A missing image is not an error here (the node may learn its default at start-up);
        the strategy refuses to publish without one.

        Pure, like Strategy.parse: the controller validates StorageClasses with it.
        """

    @abc.abstractmethod
    def check_secrets(self, config: ConfigT, secrets: Secrets) -> None:
        """Raise InvalidArgument naming the missing secret key (values are never printed)."""

    @abc.abstractmethod
    def filesystem_identity(self, config: ConfigT, secrets: Secrets) -> str:
        """A string that names the filesystem as a whole (for `share: filesystem`).

        Hashed before use, so it may contain secret values (a metadata URL).
        """

    @abc.abstractmethod
    def container(self, config: ConfigT, mount: ClientMount, secrets: Secrets) -> ClientContainer:
        """The container that mounts `mount.subdir` at `mount.mountpoint` and serves it."""


def secret_env(name: str, secret_key: str) -> Obj:
    """An env var read from the pod's Secret (whose name the strategy fills in)."""
    return {"name": name, "valueFrom": {"secretKeyRef": {"key": secret_key, "name": ""}}}


def env_name_for(key: str, *, field: str) -> str:
    """The env var a secret key becomes: upper case, `-` and `.` turned into `_`."""
    name = re.sub(r"[-.]", "_", key).upper()
    if not _ENV_NAME.match(name):
        raise InvalidArgument(field, f"secret key {key!r} cannot be an environment variable name")
    return name


def host_directory(name: str, path: str) -> tuple[Obj, Obj]:
    """A hostPath volume and its mount at the same path (roots keep their paths in pods)."""
    volume = {"name": name, "hostPath": {"path": path, "type": "Directory"}}
    mount = {"name": name, "mountPath": path, "mountPropagation": "HostToContainer"}
    return volume, mount
