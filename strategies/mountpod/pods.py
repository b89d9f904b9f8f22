"""Mount Pod manifests, names, labels and the reference annotations, as pure functions.

A Mount Pod's name is a digest of (node, share key) and of its settings, so every publish
on a node that needs the same client with the same settings computes the same name: two
concurrent publishes can never create two pods (the second create answers AlreadyExists),
and a change of settings gives a new pod while the old one keeps serving its app pods.

References are annotations `fusecsi.io/ref-<digest of target>: <target>` on the pod itself:
one per published target, added and removed with conditional (resourceVersion) patches.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from strategies.base import Secrets
from strategies.clients.base import ClientContainer

Obj = dict[str, Any]

MANAGED_BY = "app.kubernetes.io/managed-by"
COMPONENT = "app.kubernetes.io/component"
NODE_LABEL = "fusecsi.io/node"
REF_PREFIX = "fusecsi.io/ref-"
VOLUME_ANNOTATION = "fusecsi.io/volume-id"
SHARE_ANNOTATION = "fusecsi.io/share"
CONTAINER = "client"
MOUNT_DIR_IN_POD = "/fusecsi"
MOUNTPOINT_IN_POD = "/fusecsi/mnt"

SELECTOR = f"{MANAGED_BY}=fusecsi,{COMPONENT}=mount-pod"
_POD_UID_IN_TARGET = re.compile(r"/pods/([^/]+)/volumes/")


def digest(*parts: str, length: int = 10) -> str:
    hasher = hashlib.sha256()
    for part in parts:
        hasher.update(part.encode())
        hasher.update(b"\0")
    return hasher.hexdigest()[:length]


def label_value(text: str) -> str:
    """A label value (<= 63 characters) for a node name, hashed when too long."""
    return text if len(text) <= 63 else f"h-{digest(text, length=40)}"


def ref_key(target: Path) -> str:
    return REF_PREFIX + digest(str(target), length=32)


def refs(pod: Obj | None) -> dict[str, str]:
    """The pod's references: annotation key -> target path."""
    if pod is None:
        return {}
    annotations = pod.get("metadata", {}).get("annotations") or {}
    return {key: value for key, value in annotations.items() if key.startswith(REF_PREFIX)}


def pod_uid_of_target(target: str) -> str | None:
    """The app pod's UID in kubelet's target path (`.../pods/<uid>/volumes/...`)."""
    match = _POD_UID_IN_TARGET.search(target)
    return match.group(1) if match else None


def is_mount_pod(pod: Obj, namespace: str) -> bool:
    meta = pod.get("metadata", {})
    labels = meta.get("labels") or {}
    return (
        meta.get("namespace") == namespace
        and labels.get(MANAGED_BY) == "fusecsi"
        and labels.get(COMPONENT) == "mount-pod"
    )


def client_status(pod: Obj | None) -> Obj:
    """The client container's status (empty when the pod has none yet)."""
    for status in ((pod or {}).get("status") or {}).get("containerStatuses") or []:
        if status.get("name") == CONTAINER:
            return dict(status)
    return {}


def restarts(pod: Obj | None) -> int:
    return int(client_status(pod).get("restartCount", 0))


def is_running(pod: Obj | None) -> bool:
    return "running" in (client_status(pod).get("state") or {})


# Waiting reasons after which a Mount Pod will not come up without someone's help.
STUCK_REASONS = frozenset(
    {
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
        "CrashLoopBackOff",
        "RunContainerError",
    }
)


def stuck_reason(pod: Obj | None) -> str | None:
    """Why the client cannot start (a waiting reason kubelet will not fix alone), if it can't."""
    if pod is None:
        return None
    if (pod.get("status") or {}).get("phase") == "Failed":
        return "the Mount Pod failed"
    waiting = (client_status(pod).get("state") or {}).get("waiting") or {}
    reason = waiting.get("reason")
    if reason in STUCK_REASONS:
        return f"{reason}: {waiting.get('message', '').strip()}".rstrip(": ")
    return None


@dataclass(frozen=True, slots=True)
class MountPodPlan:
    """Everything needed to create (or find) the Mount Pod of one publication."""

    name: str
    manifest: Obj
    secret: Obj | None


def plan_mount_pod(
    *,
    node: str,
    namespace: str,
    share_key: str,
    share_label: str,
    volume_id: str,
    container: ClientContainer,
    pod_settings: Any,
    client_name: str,
    host_dir: Path,
    secrets_digest: str,
) -> MountPodPlan:
    """The Mount Pod (and its Secret) for a client container on `node`; refs are added later."""
    settings = json.dumps(
        {
            "image": container.image,
            "command": container.command,
            "env": container.env,
            "volumes": container.volumes,
            "mounts": container.volume_mounts,
            "secrets": secrets_digest,
            "resources": dict(pod_settings.resources),
            "tolerations": [dict(t) for t in pod_settings.tolerations],
            "nodeSelector": dict(pod_settings.node_selector),
            "priority": pod_settings.priority_class,
        },
        sort_keys=True,
    )
    name = f"fusecsi-{client_name}-{digest(node, share_key)}-{digest(settings, length=8)}"
    env = [_with_secret_name(item, name) for item in container.env]
    labels = {
        MANAGED_BY: "fusecsi",
        COMPONENT: "mount-pod",
        NODE_LABEL: label_value(node),
        "app.kubernetes.io/name": "fusecsi",
    }
    manifest: Obj = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": labels,
            "annotations": {SHARE_ANNOTATION: share_label, VOLUME_ANNOTATION: volume_id},
        },
        "spec": {
            "nodeName": node,
            "restartPolicy": "Always",
            "priorityClassName": pod_settings.priority_class,
            "tolerations": [dict(t) for t in pod_settings.tolerations],
            "nodeSelector": dict(pod_settings.node_selector),
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "terminationGracePeriodSeconds": 30,
            "containers": [
                {
                    "name": CONTAINER,
                    "image": container.image,
                    "imagePullPolicy": "IfNotPresent",
                    "command": container.command,
                    "env": env,
                    "resources": dict(pod_settings.resources),
                    "securityContext": {"privileged": True},
                    "volumeMounts": [
                        {
                            "name": "fusecsi-mount",
                            "mountPath": MOUNT_DIR_IN_POD,
                            "mountPropagation": "Bidirectional",
                        },
                        *container.volume_mounts,
                    ],
                }
            ],
            "volumes": [
                {
                    "name": "fusecsi-mount",
                    "hostPath": {"path": str(host_dir / name), "type": "DirectoryOrCreate"},
                },
                *container.volumes,
            ],
        },
    }
    secret = None
    if container.secret_data:
        secret = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "stringData": dict(container.secret_data),
        }
    return MountPodPlan(name, manifest, secret)


def _with_secret_name(item: Obj, secret_name: str) -> Obj:
    ref = (item.get("valueFrom") or {}).get("secretKeyRef")
    if ref is None:
        return item
    return {**item, "valueFrom": {"secretKeyRef": {**ref, "name": secret_name}}}


def secrets_digest(secrets: Secrets) -> str:
    """A digest of the secret values: new credentials make a new Mount Pod."""
    return digest(*(f"{key}={secrets[key]}" for key in sorted(secrets)), length=16)


def recreatable(pod: Obj) -> Obj:
    """A deleted pod's object made into a manifest again (same name, spec and references)."""
    meta = pod["metadata"]
    keep = {key: meta[key] for key in ("name", "namespace", "labels", "annotations") if key in meta}
    spec = dict(pod["spec"])
    return {"apiVersion": "v1", "kind": "Pod", "metadata": keep, "spec": spec}


def with_refs(manifest: Obj, targets: Mapping[str, str]) -> Obj:
    meta = dict(manifest["metadata"])
    meta["annotations"] = {**(meta.get("annotations") or {}), **targets}
    return {**manifest, "metadata": meta}
