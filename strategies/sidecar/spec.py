"""The parameters of a sidecar volume, and the container the webhook injects for it."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import Any

from strategies.errors import InvalidArgument
from strategies.params import Parameters
from strategies.sidecar import contract
from strategies.volumes import Location, Roots

PARAMETERS = {
    "client": "the FUSE client in the sidecar; only builtin takes a /dev/fuse fd today",
    "root": "name of an allowed root that holds the data; default: `default`",
    "path": "directory of the volume, relative to the root; default: the root itself",
    "capacity": "capacity of a static volume (e.g. 10Gi); dynamic volumes use the PVC's size",
    "clientImage": "image of the sidecar (default: the webhook's sidecar_image setting)",
    "clientResources": 'JSON requests/limits of the sidecar, e.g. {"limits": {"memory": "512Mi"}}',
    "clientUser": "uid:gid the sidecar runs as (never 0); default 65534:65534",
}
FD_CLIENTS = ("builtin",)


@dataclass(frozen=True, slots=True)
class SidecarSpec:
    client: str
    location: Location
    capacity_bytes: int
    image: str
    resources: dict[str, Any]
    uid: int
    gid: int


def parse_sidecar_spec(params: Parameters, roots: Roots) -> SidecarSpec:
    client = params.text("client", "builtin")
    if client not in FD_CLIENTS:
        raise InvalidArgument(
            params.field("client"),
            f"{client!r} cannot serve a /dev/fuse fd; the sidecar strategy supports: "
            f"{', '.join(FD_CLIENTS)} (use strategy: mountpod for other clients)",
        )
    resources: Any = {}
    if "clientResources" in params:
        try:
            resources = json.loads(params["clientResources"])
        except ValueError as exc:
            raise InvalidArgument(params.field("clientResources"), f"is not JSON: {exc}") from None
        if not isinstance(resources, dict) or set(resources) - {"requests", "limits"}:
            raise InvalidArgument(
                params.field("clientResources"), "must be a JSON object of requests and limits"
            )
    uid, gid = _user(params)
    return SidecarSpec(
        client=client,
        location=roots.locate(params),
        capacity_bytes=params.size("capacity") or 0,
        image=params.text("clientImage", ""),
        resources=resources,
        uid=uid,
        gid=gid,
    )


def _user(params: Parameters) -> tuple[int, int]:
    text = params.text("clientUser", "65534:65534")
    uid_text, _, gid_text = text.partition(":")
    try:
        uid, gid = int(uid_text), int(gid_text or uid_text)
    except ValueError:
        raise InvalidArgument(params.field("clientUser"), f"{text!r} is not uid:gid") from None
    if uid <= 0 or gid < 0:
        raise InvalidArgument(params.field("clientUser"), "the sidecar never runs as root")
    return uid, gid


def sidecar_container(spec: SidecarSpec, key: str, default_image: str) -> dict[str, Any]:
    """The native sidecar (init container, restartPolicy Always) serving one volume.

    It runs `fusecsi sidecar`, which waits for the node plugin's /dev/fuse fd on the volume's
    socket and then serves the volume's directory through it: no privilege, no capability.
    """
    root = os.fspath(spec.location.root)
    source = os.path.normpath(os.path.join(root, spec.location.path))
    return {
        "name": contract.container_name(key),
        "image": spec.image or default_image,
        "imagePullPolicy": "IfNotPresent",
        "restartPolicy": "Always",
        "command": [
            "fusecsi",
            "sidecar",
            "--socket",
            str(contract.socket_in_pod(key)),
            "--source",
            source,
        ],
        "resources": spec.resources,
        "securityContext": {
            "runAsUser": spec.uid,
            "runAsGroup": spec.gid,
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": contract.EMPTYDIR_VOLUME, "mountPath": str(contract.EMPTYDIR_MOUNT)},
            {"name": root_volume_name(spec), "mountPath": root},
        ],
    }


def root_volume_name(spec: SidecarSpec) -> str:
    """A valid volume name (DNS label) for the root, whatever characters its name has."""
    name = re.sub(r"[^a-z0-9-]", "-", spec.location.root_name.lower()).strip("-")
    digest = hashlib.sha256(spec.location.root_name.encode()).hexdigest()[:8]
    return (
        f"fusecsi-root-{name[:40]}-{digest}"
        if name != spec.location.root_name
        else (f"fusecsi-root-{name}"[:63])
    )


def root_volume(spec: SidecarSpec) -> dict[str, Any]:
    """The allowed root as a hostPath volume of the pod (the builtin client reads it)."""
    return {
        "name": root_volume_name(spec),
        "hostPath": {"path": os.fspath(spec.location.root), "type": "Directory"},
    }
