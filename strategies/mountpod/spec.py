"""The parameters of a mountpod volume, parsed once into a typed spec."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Literal

from strategies.clients.base import Client
from strategies.errors import InvalidArgument
from strategies.params import Parameters

Share = Literal["volume", "storageClass", "filesystem"]
SHARES: tuple[Share, ...] = ("volume", "storageClass", "filesystem")

# Keys every client shares; each client adds its own (`clients.*.parameters`).
COMMON_PARAMETERS = {
    "client": "the FUSE client: builtin, command or juicefs; default: builtin",
    "path": "directory of the volume inside the filesystem; default: the whole filesystem",
    "capacity": "capacity of a static volume (e.g. 10Gi): builtin enforces it, juicefs as quota",
    "share": "what one Mount Pod serves: volume (default), storageClass or filesystem",
    "deleteDelay": "how long a Mount Pod outlives its last reference, e.g. 60s; default 0s",
    "clientImage": "image of the client container (default: the admin's, per client)",
    "clientResources": 'JSON requests/limits, e.g. {"limits": {"memory": "1Gi"}}',
    "clientTolerations": "JSON list of tolerations; default: tolerate everything",
    "clientNodeSelector": "JSON object of node labels the Mount Pod requires",
    "clientPriorityClass": "priorityClassName of the Mount Pod; default: system-node-critical",
    "mountOptions": "comma-separated options for the client (its own flags, without dashes)",
}

# Keys that differ between the volumes of one StorageClass, so not part of its share key.
PER_VOLUME_KEYS = frozenset({"path", "capacity"})


@dataclass(frozen=True, slots=True)
class PodSettings:
    """What the admin or the StorageClass says about the Mount Pod itself."""

    resources: Mapping[str, Any]
    tolerations: tuple[Mapping[str, Any], ...]
    node_selector: Mapping[str, str]
    priority_class: str


@dataclass(frozen=True, slots=True)
class MountPodSpec:
    client: Client[Any]
    config: Any
    path: PurePosixPath
    capacity_bytes: int
    share: Share
    class_key: str
    """The StorageClass's parameters without the per-volume keys (for `share: storageClass`)."""
    delete_delay: float
    pod: PodSettings


def parse_spec(
    params: Parameters,
    clients: Mapping[str, Client[Any]],
    images: Mapping[str, str],
) -> MountPodSpec:
    client_name = params.choice("client", tuple(clients), "builtin")
    client = clients[client_name]
    for name, other in clients.items():
        for key in other.parameters:
            if name != client_name and key not in client.parameters and key in params:
                raise InvalidArgument(
                    params.field(key), f"is a parameter of client: {name}, not {client_name}"
                )
    config = client.parse(params, images.get(client_name, ""))
    return MountPodSpec(
        client=client,
        config=config,
        path=params.relative("path"),
        capacity_bytes=params.size("capacity") or 0,
        share=params.choice("share", SHARES, "volume"),  # type: ignore[arg-type]
        class_key=json.dumps(
            {key: value for key, value in params.items() if key not in PER_VOLUME_KEYS},
            sort_keys=True,
        ),
        delete_delay=params.duration("deleteDelay", 0.0),
        pod=PodSettings(
            resources=_json(params, "clientResources", dict, {}),
            tolerations=tuple(_json(params, "clientTolerations", list, [{"operator": "Exists"}])),
            node_selector=_json(params, "clientNodeSelector", dict, {}),
            priority_class=params.text("clientPriorityClass", "system-node-critical"),
        ),
    )


def _json(params: Parameters, key: str, kind: type, default: Any) -> Any:
    raw = params.get(key)
    if raw is None:
        return default
    try:
        value: Any = json.loads(raw)
    except ValueError as exc:
        raise InvalidArgument(params.field(key), f"is not JSON: {exc}") from None
    if not isinstance(value, kind):
        raise InvalidArgument(params.field(key), f"must be a JSON {kind.__name__}")
    if isinstance(value, dict) and key == "clientResources":
        unknown = sorted(set(value) - {"requests", "limits"})
        if unknown:
            raise InvalidArgument(
                params.field(key), f"unknown key {unknown[0]!r}; use requests and limits"
            )
    return value
