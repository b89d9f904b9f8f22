"""The parameters of a sidecar volume, and the container the webhook injects for it.

A sidecar serves its volume in one of two ways, fixed by the client:

* `builtin` takes a /dev/fuse fd from the node plugin and runs unprivileged (`FdServing`);
* `juicefs` and `command` cannot take an fd: their sidecar is privileged, mounts the pod's
  volume itself with Bidirectional propagation and runs the client on it (`PrivilegedServing`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from strategies.base import Secrets
from strategies.clients.base import Client, ClientContainer, ClientMount
from strategies.clients.command import CommandClient
from strategies.clients.juicefs import JuiceFSClient
from strategies.errors import InvalidArgument
from strategies.params import Parameters
from strategies.sidecar import contract
from strategies.volumes import Location, Roots

PARAMETERS = {
    "client": "builtin (default: an unprivileged sidecar fed a /dev/fuse fd), juicefs or "
    "command (a privileged sidecar that mounts by itself)",
    "root": "name of an allowed root: builtin's data; juicefs/command: mounted into the sidecar",
    "path": "directory of the volume: below the root (builtin), in the filesystem (others)",
    "capacity": "capacity of a static volume (e.g. 10Gi); dynamic volumes use the PVC's size",
    "clientImage": "image of the sidecar (default: the webhook's sidecar_image setting for "
    "builtin, its client_images setting for the others)",
    "clientResources": 'JSON requests/limits of the sidecar, e.g. {"limits": {"memory": "512Mi"}}',
    "clientUser": "builtin: uid:gid the sidecar runs as (never 0); default 65534:65534",
    "mountOptions": "juicefs/command: comma-separated options for the client",
    **{key: text for key, text in CommandClient.parameters.items() if key != "root"},
}
FD_CLIENTS = ("builtin",)
PRIVILEGED_CLIENTS = ("juicefs", "command")
_CLIENT_ONLY = {"clientUser": FD_CLIENTS, "mountOptions": PRIVILEGED_CLIENTS}
_CLIENT_ONLY.update({key: ("command",) for key in CommandClient.parameters if key != "root"})


@dataclass(frozen=True, slots=True)
class FdServing:
    """builtin: the node plugin mounts with a /dev/fuse fd; an unprivileged sidecar serves it."""

    location: Location
    uid: int
    gid: int


@dataclass(frozen=True, slots=True)
class PrivilegedServing:
    """juicefs, command: the sidecar's client mounts FUSE on the pod's volume by itself."""

    client: Client[Any]
    config: Any
    subdir: PurePosixPath

    def container(
        self, volume_id: str, key: str, capacity_bytes: int, secrets: Secrets
    ) -> ClientContainer:
        """The client's container, mounting at the sidecar's mount of the volume."""
        mount = ClientMount(
            volume_id=volume_id,
            mountpoint=str(contract.stage_in_pod(key)),
            subdir=self.subdir,
            capacity_bytes=capacity_bytes,
        )
        return self.client.container(self.config, mount, secrets)


@dataclass(frozen=True, slots=True)
class SidecarSpec:
    client: str
    serving: FdServing | PrivilegedServing
    capacity_bytes: int
    image: str
    """The sidecar's image; "" for the webhook's default (builtin only)."""
    resources: dict[str, Any]


def parse_sidecar_spec(
    params: Parameters, roots: Roots, images: Mapping[str, str] | None = None
) -> SidecarSpec:
    """Validate a sidecar volume's parameters; `images` are the admin's per-client images."""
    client = params.choice("client", FD_CLIENTS + PRIVILEGED_CLIENTS, "builtin")
    for key, clients in _CLIENT_ONLY.items():
        if key in params and client not in clients:
            raise InvalidArgument(
                params.field(key), f"is a parameter of client: {', '.join(clients)}, not {client}"
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
    serving: FdServing | PrivilegedServing
    if client in FD_CLIENTS:
        uid, gid = _user(params)
        serving = FdServing(roots.locate(params), uid, gid)
        image = params.text("clientImage", "")
    else:
        runner = privileged_clients(roots)[client]
        config = runner.parse(params, (images or {}).get(client, ""))
        serving = PrivilegedServing(runner, config, params.relative("path"))
        image = config.image
    return SidecarSpec(
        client=client,
        serving=serving,
        capacity_bytes=params.size("capacity") or 0,
        image=image,
        resources=resources,
    )


def privileged_clients(roots: Roots) -> dict[str, Client[Any]]:
    return {"juicefs": JuiceFSClient(roots), "command": CommandClient(roots)}


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


# What a FUSE mount's liveness is judged by, in `sh`: statfs or a directory read always reach
# the client (a stat may be answered from the kernel's attribute cache, even when dead).
_SHELL_HELPERS = r"""top_type() {
  top=
  while read -r device point type rest; do
    if [ "$point" = "$1" ]; then top=$type; fi
  done < /proc/self/mounts
  echo "$top"
}
served() {
  case $(top_type "$1") in
    fuse | fuse.*) stat -f "$1" >/dev/null 2>&1 || ls "$1" >/dev/null 2>&1 ;;
    *) return 1 ;;
  esac
}
"""
# Privileged mode: wait for the environment the node plugin wrote at NodePublishVolume (before
# any container started, so normally at once), run the client on its stage, and once it serves,
# stack a bind of it on the emptyDir's volume directory: the bind propagates (Bidirectional) to
# the target the node plugin bound from there, and to the app containers; stacked on the bind
# of a client that died, it reaches containers that mount with HostToContainer in place. The
# sidecar's own mounts are of the emptyDir (alive), never of a dead FUSE mount, so kubelet can
# always restart it. Arguments: the env file, the stage, the volume directory, then the client.
WRAPPER = (
    r"""set -u
env_file=$1 stage=$2 volume=$3
shift 3
"""
    + _SHELL_HELPERS
    + r"""waited=0
while [ ! -r "$env_file" ]; do
  if [ "$waited" -ge 600 ]; then
    echo "fusecsi: the node plugin left no $env_file; is the volume published?" >&2
    exit 1
  fi
  sleep 1
  waited=$((waited + 1))
done
. "$env_file"
mkdir -p "$stage"
"$@" &
client=$!
trap 'kill -TERM "$client" 2>/dev/null' TERM INT
until served "$stage"; do
  kill -0 "$client" 2>/dev/null || break
  sleep 0.2
done
if served "$stage"; then
  mount --bind "$stage" "$volume" || kill -TERM "$client"
fi
while :; do
  wait "$client"
  status=$?
  kill -0 "$client" 2>/dev/null || break
done
exit "$status"
"""
)
# Privileged mode: the startup probe; app containers start once the top mount is a FUSE mount
# that answers.
PROBE = (
    _SHELL_HELPERS
    + r"""served "$1"
"""
)
SCRATCH_DIR = "/tmp"
"""Every sidecar gets an emptyDir here: the client's temporary files (its root filesystem may
be read-only)."""
STARTUP_SECONDS = 600
"""How long a privileged sidecar may take to mount (a first `juicefs format` included)."""


def sidecar_image(spec: SidecarSpec, default_image: str) -> str:
    """The sidecar's image; "" when there is none (only builtin falls back to the webhook's)."""
    if spec.image:
        return spec.image
    return default_image if isinstance(spec.serving, FdServing) else ""


def sidecar_container(spec: SidecarSpec, key: str, default_image: str) -> dict[str, Any]:
    """The native sidecar (init container, restartPolicy Always) serving the volume `key`."""
    container: dict[str, Any] = {
        "name": contract.container_name(key),
        "image": sidecar_image(spec, default_image),
        "imagePullPolicy": "IfNotPresent",
        "restartPolicy": "Always",
        "resources": spec.resources,
    }
    if isinstance(spec.serving, FdServing):
        return container | _fd_sidecar(spec.serving, key)
    return container | _privileged_sidecar(spec, spec.serving, key)


def _fd_sidecar(serving: FdServing, key: str) -> dict[str, Any]:
    """`fusecsi sidecar` waits for the node plugin's /dev/fuse fd on the volume's socket, then
    serves the volume's directory through it: no privilege, no capability."""
    root = os.fspath(serving.location.root)
    source = os.path.normpath(os.path.join(root, serving.location.path))
    return {
        "command": [
            "fusecsi",
            "sidecar",
            "--socket",
            str(contract.socket_in_pod(key)),
            "--source",
            source,
        ],
        "securityContext": {
            "runAsUser": serving.uid,
            "runAsGroup": serving.gid,
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": contract.EMPTYDIR_VOLUME, "mountPath": str(contract.EMPTYDIR_MOUNT)},
            {"name": root_volume_name(serving.location), "mountPath": root},
            {"name": _own_volume_name(key, "scratch"), "mountPath": SCRATCH_DIR},
        ],
    }


def _privileged_sidecar(spec: SidecarSpec, serving: PrivilegedServing, key: str) -> dict[str, Any]:
    """The client mounts FUSE in the sidecar's own filesystem; the sidecar stacks a bind of it
    on the emptyDir's volume directory, which Bidirectional propagation (privileged only) carries
    to the host, the target bound from there, and the app containers, which start after the
    startup probe has seen it. No secret is in the spec: the node plugin hands the environment
    over through the emptyDir."""
    client = serving.container("", key, spec.capacity_bytes, Secrets())
    env_file = str(contract.EMPTYDIR_MOUNT / contract.env_file_name(key))
    volume = str(contract.EMPTYDIR_MOUNT / contract.volume_dir_name(key))
    stage = str(contract.stage_in_pod(key))
    return {
        "command": [
            "sh",
            "-c",
            WRAPPER,
            "fusecsi-sidecar",
            env_file,
            stage,
            volume,
            *client.command,
        ],
        "securityContext": {"privileged": True, "runAsUser": 0, "runAsGroup": 0},
        "startupProbe": {
            "exec": {"command": ["sh", "-c", PROBE, "fusecsi-probe", volume]},
            "periodSeconds": 1,
            "timeoutSeconds": 5,
            "failureThreshold": STARTUP_SECONDS,
        },
        "volumeMounts": [
            {
                "name": contract.EMPTYDIR_VOLUME,
                "mountPath": str(contract.EMPTYDIR_MOUNT),
                "mountPropagation": "Bidirectional",
            },
            {"name": _own_volume_name(key, "scratch"), "mountPath": SCRATCH_DIR},
            *(
                [{"name": _own_volume_name(key, "cache"), "mountPath": serving.client.cache_dir}]
                if serving.client.cache_dir
                else []
            ),
            *({**m, "name": _own_volume_name(key, m["name"])} for m in client.volume_mounts),
        ],
    }


def _own_volume_name(key: str, name: str) -> str:
    """A pod volume of one sidecar: its scratch and cache emptyDirs, its client's volumes."""
    return f"fusecsi-{key}-{name}"[:63]


def sidecar_volumes(spec: SidecarSpec, key: str) -> list[dict[str, Any]]:
    """The pod volumes a sidecar needs besides the shared emptyDir (names unique per need): its
    scratch space (its root filesystem may be read-only), a cache for a client that keeps one
    (billed to the pod, gone with it), and what the client reads (the root, for builtin)."""
    own = [{"name": _own_volume_name(key, "scratch"), "emptyDir": {}}]
    if isinstance(spec.serving, FdServing):
        location = spec.serving.location
        return [
            {
                "name": root_volume_name(location),
                "hostPath": {"path": os.fspath(location.root), "type": "Directory"},
            },
            *own,
        ]
    if spec.serving.client.cache_dir:
        own.append({"name": _own_volume_name(key, "cache"), "emptyDir": {}})
    client = spec.serving.container("", key, spec.capacity_bytes, Secrets())
    return [*own, *({**v, "name": _own_volume_name(key, v["name"])} for v in client.volumes)]


def root_volume_name(location: Location) -> str:
    """A valid volume name (DNS label) for the root, whatever characters its name has."""
    name = re.sub(r"[^a-z0-9-]", "-", location.root_name.lower()).strip("-")
    digest = hashlib.sha256(location.root_name.encode()).hexdigest()[:8]
    return (
        f"fusecsi-root-{name[:40]}-{digest}"
        if name != location.root_name
        else (f"fusecsi-root-{name}"[:63])
    )
