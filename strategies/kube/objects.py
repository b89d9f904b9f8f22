"""The API objects the sidecar webhook reads and writes, over `KubeCluster`'s raw JSON calls.

Reads: PVCs, PVs and StorageClasses (the injector's `Lookup`), the webhook's own pod (its image).
Writes, all in the webhook's namespace or on its own configuration: the Secret that holds its
TLS certificate and the `caBundle` of its MutatingWebhookConfiguration.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from strategies.kube.cluster import ApiError, KubeCluster, Obj

WEBHOOK_CONFIGURATIONS = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations"


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


def first_container_image(pod: Any) -> str:
    """The image of a pod's first container ("" when the pod has none)."""
    containers = (pod.get("spec") or {}).get("containers") or [] if isinstance(pod, dict) else []
    return str(containers[0].get("image") or "") if containers else ""
