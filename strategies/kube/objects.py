"""The API objects the sidecar webhook reads and writes, over `KubeCluster`'s raw JSON calls.

Reads: PVCs, PVs and StorageClasses (the injector's `Lookup`: watched, see `WatchedLookup`), the
webhook's own pod (its image).
Writes, all in the webhook's namespace or on its own configuration: the Secret that holds its
TLS certificate and the `caBundle` of its MutatingWebhookConfiguration.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import anyio

from strategies.kube.cluster import ApiError, KubeCluster, Obj
from strategies.kube.watch import WatchedCollection

WEBHOOK_CONFIGURATIONS = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations"
CLAIMS = "/api/v1/persistentvolumeclaims"
VOLUMES = "/api/v1/persistentvolumes"
STORAGE_CLASSES = "/apis/storage.k8s.io/v1/storageclasses"


class KubeObjects:
    """GET helpers and the webhook's few writes; `get_*` answer None for 404."""

    def __init__(self, cluster: KubeCluster) -> None:
        self.cluster = cluster
        self.namespace = cluster.namespace

    async def get(self, path: str) -> Obj | None:
        try:
            answer: Obj = await self.cluster._call("GET", path)
        except ApiError as exc:
            if exc.not_found:
                return None
            raise
        return answer

    async def get_pvc(self, namespace: str, name: str) -> Obj | None:
        return await self.get(
            f"/api/v1/namespaces/{quote(namespace)}/persistentvolumeclaims/{quote(name)}"
        )

    async def get_pv(self, name: str) -> Obj | None:
        return await self.get(f"/api/v1/persistentvolumes/{quote(name)}")

    async def get_storage_class(self, name: str) -> Obj | None:
        return await self.get(f"/apis/storage.k8s.io/v1/storageclasses/{quote(name)}")

    async def get_own_pod(self, name: str) -> Obj | None:
        return await self.get(self._namespaced("pods", name))

    async def get_secret(self, name: str) -> Obj | None:
        return await self.get(self._namespaced("secrets", name))

    async def create_secret(self, manifest: Obj) -> Obj:
        """Create; `ApiError.already_exists` when another replica was first."""
        answer: Obj = await self.cluster._call("POST", self._namespaced("secrets"), body=manifest)
        return answer

    async def replace_secret(self, name: str, manifest: Obj) -> Obj:
        """Update (PUT); with `metadata.resourceVersion` set, `ApiError.conflict` when stale."""
        answer: Obj = await self.cluster._call(
            "PUT", self._namespaced("secrets", name), body=manifest
        )
        return answer

    async def get_webhook_configuration(self, name: str) -> Obj | None:
        return await self.get(f"{WEBHOOK_CONFIGURATIONS}/{quote(name)}")

    async def patch_webhook_configuration(self, name: str, patch: Obj) -> Obj:
        """JSON merge patch; a `metadata.resourceVersion` in it makes it conditional (409)."""
        answer: Obj = await self.cluster._call(
            "PATCH",
            f"{WEBHOOK_CONFIGURATIONS}/{quote(name)}",
            body=patch,
            content_type="application/merge-patch+json",
        )
        return answer

    def _namespaced(self, resource: str, name: str = "") -> str:
        path = f"/api/v1/namespaces/{quote(self.namespace)}/{resource}"
        return f"{path}/{quote(name)}" if name else path


class WatchedLookup:
    """The injector's lookups answered from memory: PVCs, PVs and StorageClasses, each kept
    current by one list+watch, so that a review sends no API request, however many pods are
    created at once (a request to an apiserver busy with that very burst is what made reviews
    slow). Only what a review reads is kept (`_slim_*`).

    A live GET (`live`) answers what the watch cannot vouch for yet: anything before the first
    list, an object it has not seen (created an instant ago), and a claim it saw unbound (it may
    just have been bound)."""

    def __init__(self, cluster: KubeCluster, live: KubeObjects) -> None:
        self.live = live
        self.claims = _watched(cluster, "persistentvolumeclaims", CLAIMS, _slim_claim)
        self.volumes = _watched(cluster, "persistentvolumes", VOLUMES, _slim_volume)
        self.classes = _watched(cluster, "storageclasses", STORAGE_CLASSES, _slim_class)

    async def run(self) -> None:
        async with anyio.create_task_group() as tasks:
            for collection in (self.claims, self.volumes, self.classes):
                tasks.start_soon(collection.run, name=f"watch {collection.what}")

    async def get_pvc(self, namespace: str, name: str) -> Obj | None:
        if self.claims.synced.is_set():
            claim = self.claims.get(namespace, name)
            if claim is not None and claim["spec"].get("volumeName"):
                return claim
        return await self.live.get_pvc(namespace, name)

    async def get_pv(self, name: str) -> Obj | None:
        volume = self.volumes.get(name) if self.volumes.synced.is_set() else None
        return volume if volume is not None else await self.live.get_pv(name)

    async def get_storage_class(self, name: str) -> Obj | None:
        found = self.classes.get(name) if self.classes.synced.is_set() else None
        return found if found is not None else await self.live.get_storage_class(name)


def _watched(
    cluster: KubeCluster, what: str, path: str, slim: Callable[[Obj], Obj]
) -> WatchedCollection:
    namespaced = path == CLAIMS
    return WatchedCollection(
        what,
        lambda: cluster.list_collection(path),
        lambda version: cluster.watch_collection(path, version),
        key=(lambda obj: (obj["metadata"].get("namespace", ""), obj["metadata"]["name"]))
        if namespaced
        else (lambda obj: obj["metadata"]["name"]),
        slim=slim,
    )


def _metadata(obj: Obj) -> Obj:
    meta = obj.get("metadata") or {}
    kept = {key: meta[key] for key in ("name", "namespace", "resourceVersion") if key in meta}
    return kept


def _slim_claim(claim: Obj) -> Obj:
    spec = claim.get("spec") or {}
    kept = {key: spec[key] for key in ("volumeName", "storageClassName") if spec.get(key)}
    return {"metadata": _metadata(claim), "spec": kept}


def _slim_volume(volume: Obj) -> Obj:
    csi = (volume.get("spec") or {}).get("csi")
    spec = {}
    if isinstance(csi, dict):
        spec["csi"] = {
            "driver": csi.get("driver"),
            "volumeAttributes": csi.get("volumeAttributes") or {},
        }
    return {"metadata": _metadata(volume), "spec": spec}


def _slim_class(storage_class: Obj) -> Obj:
    return {
        "metadata": _metadata(storage_class),
        "provisioner": storage_class.get("provisioner"),
        "parameters": storage_class.get("parameters") or {},
    }


def first_container_image(pod: Any) -> str:
    """The image of a pod's first container ("" when the pod has none)."""
    containers = (pod.get("spec") or {}).get("containers") or [] if isinstance(pod, dict) else []
    return str(containers[0].get("image") or "") if containers else ""
