"""The few Kubernetes API calls the node plugin makes, as one protocol with one real implementation.

Objects travel as plain JSON dicts, exactly as the API documents them, so that manifests and
patches read like the YAML an admin knows and a fake in `unit/` can stand in for the apiserver
without a model layer. `KubeCluster` speaks to the apiserver through kubernetes-asyncio's
ApiClient (its configuration, TLS and token refresh) with raw JSON requests.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

from strategies.errors import FusecsiError

Obj = dict[str, Any]


class ApiError(FusecsiError):
    """An apiserver answer other than success; `status` is the HTTP status."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason

    @property
    def conflict(self) -> bool:
        """409 for a stale resourceVersion (optimistic concurrency lost)."""
        return self.status == 409 and self.reason != "AlreadyExists"

    @property
    def already_exists(self) -> bool:
        return self.status == 409 and self.reason == "AlreadyExists"

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def gone(self) -> bool:
        """410: the resourceVersion a watch asked for is too old; list again."""
        return self.status == 410


class Cluster(Protocol):
    """What the mountpod strategy asks of the apiserver: pods and secrets in one namespace,
    and a list+watch of the pods bound to one node."""

    namespace: str

    async def list_node_pods(self, node: str) -> tuple[list[Obj], str]:
        """Every pod bound to `node` (all namespaces) and the list's resourceVersion."""

    def watch_node_pods(self, node: str, resource_version: str) -> AsyncIterator[Obj]:
        """Watch events (`{"type", "object"}`) after `resource_version` until the server ends."""

    async def get_pod(self, name: str) -> Obj | None: ...

    async def create_pod(self, manifest: Obj) -> Obj: ...

    async def patch_pod(self, name: str, patch: Obj) -> Obj:
        """JSON merge patch; a `metadata.resourceVersion` in it makes it conditional (409)."""

    async def delete_pod(self, name: str, *, resource_version: str | None = None) -> None:
        """Delete (gone already is success); with `resource_version`, only that version (409)."""

    async def create_secret(self, manifest: Obj) -> None: ...

    async def delete_secret(self, name: str) -> None:
        """Delete (gone already is success)."""

    async def list_secrets(self, label_selector: str) -> list[Obj]: ...

    async def describe_failure(self, pod_name: str, container: str) -> str:
        """The pod's recent Events and the container's last log lines, for an error message."""

    async def claim_of_volume(self, pv_name: str) -> tuple[str, str] | None:
        """(namespace, name) of the PVC bound to a PV; None when no such PV or no claim."""

    async def pod_containers(self, namespace: str, name: str) -> set[str] | None:
        """Names of a pod's containers and init containers; None when there is no such pod."""


class KubeCluster:
    """`Cluster` over HTTPS to the apiserver (in-cluster service account, or a kubeconfig)."""

    def __init__(self, api_client: Any, namespace: str) -> None:
        self.api = api_client
        self.namespace = namespace

    @classmethod
    async def connect(cls, *, namespace: str, kubeconfig: Path | None) -> KubeCluster:
        from kubernetes_asyncio import client, config

        configuration = client.Configuration()
        if kubeconfig is not None:
            await config.load_kube_config(
                config_file=str(kubeconfig), client_configuration=configuration
            )
        else:
            config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        return cls(client.ApiClient(configuration), namespace)

    async def aclose(self) -> None:
        await self.api.close()

    async def _call(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        raw: bool = False,
    ) -> Any:
        response = await self.api.call_api(
            path,
            method,
            query_params=list((query or {}).items()),
            header_params={"Accept": "application/json", "Content-Type": content_type},
            body=body,
            auth_settings=["BearerToken"],
            _preload_content=False,
            _return_http_data_only=True,
        )
        async with response:
            data = await response.read()
            if not 200 <= response.status <= 299:
                raise _api_error(response.status, data)
            if raw:
                return data.decode(errors="replace")
            return json.loads(data) if data else {}

    def _pods(self, name: str = "") -> str:
        path = f"/api/v1/namespaces/{self.namespace}/pods"
        return f"{path}/{quote(name)}" if name else path

    def _secrets(self, name: str = "") -> str:
        path = f"/api/v1/namespaces/{self.namespace}/secrets"
        return f"{path}/{quote(name)}" if name else path

    async def list_collection(
        self, path: str, query: Mapping[str, str] | None = None
    ) -> tuple[list[Obj], str]:
        """LIST: (items, the list's resourceVersion, to watch from)."""
        answer = await self._call("GET", path, query=query)
        return list(answer.get("items") or []), str(answer["metadata"]["resourceVersion"])

    async def watch_collection(
        self, path: str, resource_version: str, query: Mapping[str, str] | None = None
    ) -> AsyncIterator[Obj]:
        """WATCH from `resource_version`, with bookmarks, until the server ends it (1 hour)."""
        response = await self.api.call_api(
            path,
            "GET",
            query_params=[
                *(query or {}).items(),
                ("watch", "true"),
                ("allowWatchBookmarks", "true"),
                ("resourceVersion", resource_version),
                ("timeoutSeconds", "3600"),
            ],
            header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"],
            _preload_content=False,
            _return_http_data_only=True,
            _request_timeout=None,
        )
        async with response:
            if response.status != 200:
                raise _api_error(response.status, await response.read())
            async for line in response.content:
                if line.strip():
                    yield json.loads(line)

    async def list_node_pods(self, node: str) -> tuple[list[Obj], str]:
        return await self.list_collection(
            "/api/v1/pods", {"fieldSelector": f"spec.nodeName={node}"}
        )

    def watch_node_pods(self, node: str, resource_version: str) -> AsyncIterator[Obj]:
        return self.watch_collection(
            "/api/v1/pods", resource_version, {"fieldSelector": f"spec.nodeName={node}"}
        )

    async def get_pod(self, name: str) -> Obj | None:
        try:
            pod: Obj = await self._call("GET", self._pods(name))
        except ApiError as exc:
            if exc.not_found:
                return None
            raise
        return pod

    async def create_pod(self, manifest: Obj) -> Obj:
        pod: Obj = await self._call("POST", self._pods(), body=manifest)
        return pod

    async def patch_pod(self, name: str, patch: Obj) -> Obj:
        pod: Obj = await self._call(
            "PATCH", self._pods(name), body=patch, content_type="application/merge-patch+json"
        )
        return pod

    async def delete_pod(self, name: str, *, resource_version: str | None = None) -> None:
        body: Obj = {"kind": "DeleteOptions", "apiVersion": "v1"}
        if resource_version is not None:
            body["preconditions"] = {"resourceVersion": resource_version}
        try:
            await self._call("DELETE", self._pods(name), body=body)
        except ApiError as exc:
            if not exc.not_found:
                raise

    async def create_secret(self, manifest: Obj) -> None:
        await self._call("POST", self._secrets(), body=manifest)

    async def delete_secret(self, name: str) -> None:
        try:
            await self._call("DELETE", self._secrets(name))
        except ApiError as exc:
            if not exc.not_found:
                raise

    async def list_secrets(self, label_selector: str) -> list[Obj]:
        answer = await self._call("GET", self._secrets(), query={"labelSelector": label_selector})
        return list(answer.get("items") or [])

    async def describe_failure(self, pod_name: str, container: str) -> str:
        parts: list[str] = []
        try:
            events = await self._call(
                "GET",
                f"/api/v1/namespaces/{self.namespace}/events",
                query={"fieldSelector": f"involvedObject.name={pod_name}"},
            )
            for event in (events.get("items") or [])[-5:]:
                parts.append(f"{event.get('reason')}: {event.get('message', '').strip()}")
        except ApiError as exc:
            parts.append(f"(events unavailable: {exc})")
        try:
            log = await self._call(
                "GET",
                f"{self._pods(pod_name)}/log",
                query={"container": container, "tailLines": "5"},
                raw=True,
            )
            lines = [line for line in log.splitlines() if line.strip()]
            if lines:
                parts.append("client log: " + " | ".join(lines[-5:]))
        except ApiError as exc:
            if exc.status != 400:  # 400: the container has not started, so no log yet
                parts.append(f"(log unavailable: {exc})")
        return "; ".join(parts) or "no events and no log"

    async def claim_of_volume(self, pv_name: str) -> tuple[str, str] | None:
        return await _claim_of(self, pv_name)

    async def pod_containers(self, namespace: str, name: str) -> set[str] | None:
        try:
            pod = await self._call("GET", f"/api/v1/namespaces/{namespace}/pods/{quote(name)}")
        except ApiError as exc:
            if exc.not_found:
                return None
            raise
        spec = pod.get("spec") or {}
        containers = [*(spec.get("containers") or []), *(spec.get("initContainers") or [])]
        return {str(container.get("name")) for container in containers}


async def _claim_of(cluster: KubeCluster, pv_name: str) -> tuple[str, str] | None:
    try:
        pv = await cluster._call("GET", f"/api/v1/persistentvolumes/{quote(pv_name)}")
    except ApiError as exc:
        if exc.not_found:
            return None
        raise
    claim = (pv.get("spec") or {}).get("claimRef") or {}
    if not claim.get("name"):
        return None
    return str(claim.get("namespace", "")), str(claim["name"])


def _api_error(status: int, data: bytes) -> ApiError:
    try:
        answer = json.loads(data)
        return ApiError(status, str(answer.get("reason", "")), str(answer.get("message", "")))
    except ValueError:
        return ApiError(status, "", data.decode(errors="replace")[:200])
