"""What the admission webhook injects and the node plugin relies on: names, paths, keys.

The webhook and the node plugin never talk to each other; they agree through these names.
For each pod volume served by the sidecar strategy the webhook adds one native sidecar (an init
container with `restartPolicy: Always`) that waits on a unix socket in a shared emptyDir; at
NodePublishVolume the node plugin finds that emptyDir on the host from the target path
(`<kubelet>/pods/<uid>/volumes/...`), mounts the target with a /dev/fuse fd and passes the fd
(SCM_RIGHTS) to whoever connects to the socket of that volume.

Clients that cannot take an fd (juicefs, command) run in the privileged mode instead: the
sidecar mounts the pod's volume itself with `mountPropagation: Bidirectional` and its client
mounts FUSE there; the node plugin makes the target a shared mount (so the FUSE mount reaches
the host and the app containers) and leaves the client's environment in the emptyDir.
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
VOLUME_MOUNT_ROOT = PurePosixPath("/fusecsi-volumes")
"""Privileged mode: where a sidecar mounts the pod's volume itself (Bidirectional), per key."""


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


def mountpoint_in_pod(key: str) -> PurePosixPath:
    """Privileged mode: the sidecar's mount of the volume, where its client mounts FUSE."""
    return VOLUME_MOUNT_ROOT / key


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
