"""What the admission webhook injects and the node plugin relies on: names, paths, keys.

The webhook and the node plugin never talk to each other; they agree through these names.
For each pod volume served by the sidecar strategy the webhook adds one native sidecar (an init
container with `restartPolicy: Always`) that waits on a unix socket in a shared emptyDir; at
NodePublishVolume the node plugin finds that emptyDir on the host from the target path
(`<kubelet>/pods/<uid>/volumes/...`), mounts the target with a /dev/fuse fd and passes the fd
(SCM_RIGHTS) to whoever connects to the socket of that volume.

Clients that cannot take an fd (juicefs, command) run in the privileged mode instead: the node
plugin binds the emptyDir's `vol-<key>` directory onto the target and leaves the client's
environment in `<key>.env` there; the privileged sidecar mounts the emptyDir with
`mountPropagation: Bidirectional`, its client mounts FUSE at `/fusecsi-stage/<key>`, and the
sidecar stacks a bind of that on `vol-<key>`, which propagates to the target and the apps.
"""

from __future__ import annotations

import hashlib
from pathlib import Path, PurePosixPath

EMPTYDIR_VOLUME = "fusecsi-sidecar"
"""The emptyDir shared by the node plugin (through the host) and the sidecars."""
EMPTYDIR_MOUNT = PurePosixPath("/fusecsi-sidecar")
"""Where sidecars see it."""
CONTAINER_PREFIX = "fusecsi-sidecar-"
OPT_OUT_LABEL = "fusecsi.io/sidecar-injection"
"""Namespace label (webhook namespaceSelector) and pod annotation; `disabled` opts out."""
INJECTED_ANNOTATION = "fusecsi.io/sidecar-injected"
"""Set on a mutated pod: the volume keys it got sidecars for (comma-separated)."""
STAGE_ROOT = PurePosixPath("/fusecsi-stage")
"""Privileged mode: where a sidecar's client mounts, in the sidecar's own filesystem, per key."""


def pvc_key(namespace: str, claim: str) -> str:
    """The key of a PVC volume: PVC, not PV, because a PVC may be unbound at admission."""
    return hashlib.sha256(f"pvc/{namespace}/{claim}".encode()).hexdigest()[:12]


def inline_key(volume_name: str) -> str:
    """The key of an inline (ephemeral) CSI volume: its name in the pod."""
    return hashlib.sha256(f"inline/{volume_name}".encode()).hexdigest()[:12]


def container_name(key: str) -> str:
    return CONTAINER_PREFIX + key


def socket_in_pod(key: str) -> PurePosixPath:
    return EMPTYDIR_MOUNT / f"{key}.sock"


def stage_in_pod(key: str) -> PurePosixPath:
    """Privileged mode: the client's mount point inside the sidecar."""
    return STAGE_ROOT / key


def volume_dir_name(key: str) -> str:
    """Privileged mode: the directory of the emptyDir the node plugin binds onto the target,
    and on which the sidecar stacks a bind of each client's mount (Bidirectional)."""
    return f"vol-{key}"


def env_file_name(key: str) -> str:
    """Privileged mode: the file in the emptyDir where the node plugin leaves the client's
    environment (secret values included), read by the sidecar before it runs the client."""
    return f"{key}.env"


def emptydir_on_host(target: Path) -> Path | None:
    """The pod's sidecar emptyDir on the host, from kubelet's target path; None if not a pod's."""
    parts = target.parts
    try:
        index = parts.index("pods")
    except ValueError:
        return None
    if len(parts) < index + 3 or parts[index + 2] != "volumes":
        return None
    pod_dir = Path(*parts[: index + 2])
    return pod_dir / "volumes" / "kubernetes.io~empty-dir" / EMPTYDIR_VOLUME
