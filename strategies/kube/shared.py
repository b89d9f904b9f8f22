"""One API connection for every strategy of the node plugin, opened when first needed."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio

from strategies.kube.cluster import Cluster


class SharedCluster:
    def __init__(self, connect: Callable[[], Awaitable[Cluster]]) -> None:
        self._connect = connect
        self._cluster: Cluster | None = None
        self._lock = anyio.Lock()

    async def get(self) -> Cluster:
        async with self._lock:
            if self._cluster is None:
                self._cluster = await self._connect()
            return self._cluster

    async def claim_of(self, pv_name: str) -> tuple[str, str] | None:
        return await (await self.get()).claim_of_volume(pv_name)

    async def sidecar_expected(self, namespace: str, pod: str, container: str) -> bool | None:
        containers = await (await self.get()).pod_containers(namespace, pod)
        return None if containers is None else container in containers
