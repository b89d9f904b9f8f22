"""A cache of the pods bound to this node, kept current by one watch (never by polling).

The node plugin needs two views of its node: its own Mount Pods, and which app pods still
exist (to collect references left by pods that are gone). Both come from a single
list+watch of `spec.nodeName=<node>`, so an idle plugin holds one open watch and makes no
other requests. After the initial list, `synced` is set; every change wakes `changed()`
waiters and calls the listener with the object before and after.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import anyio
from loguru import logger

from strategies.kube.cluster import ApiError, Cluster, Obj

Listener = Callable[[Obj | None, Obj | None], None]
"""Called with (old, new) for every change; new is None for a deletion. Must not block."""

BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 30.0


def pod_key(pod: Obj) -> tuple[str, str]:
    meta = pod["metadata"]
    return str(meta.get("namespace", "")), str(meta["name"])


class NodePodCache:
    def __init__(self, cluster: Cluster, node: str, listener: Listener | None = None) -> None:
        self.cluster = cluster
        self.node = node
        self.listener = listener
        self.pods: dict[tuple[str, str], Obj] = {}
        self.synced = anyio.Event()
        self._changed = anyio.Event()
        self.resource_version = ""

    def get(self, namespace: str, name: str) -> Obj | None:
        return self.pods.get((namespace, name))

    def uids(self) -> set[str]:
        return {str(pod["metadata"].get("uid", "")) for pod in self.pods.values()}

    async def changed(self) -> None:
        """Wait for the next change to any cached pod."""
        await self._changed.wait()

    def _apply(self, kind: str, pod: Obj) -> None:
        key = pod_key(pod)
        old = self.pods.get(key)
        if kind == "DELETED":
            self.pods.pop(key, None)
            new = None
        else:
            self.pods[key] = pod
            new = pod
        self._notify(old, new)

    def _notify(self, old: Obj | None, new: Obj | None) -> None:
        event, self._changed = self._changed, anyio.Event()
        event.set()
        if self.listener is not None:
            try:
                self.listener(old, new)
            except Exception:  # a listener bug must not stop the watch
                logger.exception("pod cache listener failed")

    def _replace(self, items: list[Obj]) -> None:
        """A fresh list: report what changed since the last view (restart, or 410 Gone)."""
        fresh = {pod_key(pod): pod for pod in items}
        previous, self.pods = self.pods, fresh
        for key, gone in previous.items():
            if key not in fresh:
                self._notify(gone, None)
        for key, pod in fresh.items():
            before = previous.get(key)
            if before is None or before["metadata"].get("resourceVersion") != pod["metadata"].get(
                "resourceVersion"
            ):
                self._notify(before, pod)

    async def run(self) -> None:
        """List, then watch; relist on 410 Gone; reconnect with jittered backoff on errors."""
        delay = BACKOFF_INITIAL
        need_list = True
        while True:
            try:
                if need_list:
                    items, self.resource_version = await self.cluster.list_node_pods(self.node)
                    self._replace(items)
                    need_list = False
                    if not self.synced.is_set():
                        logger.info("pod cache: {} pod(s) on node {}", len(items), self.node)
                        self.synced.set()
                async for event in self.cluster.watch_node_pods(self.node, self.resource_version):
                    delay = BACKOFF_INITIAL
                    self._handle(event)
                # The server ended the watch (its timeout): continue from where we are.
            except ApiError as exc:
                if exc.gone:
                    need_list = True
                    continue
                delay = await _back_off(delay, exc)
            except Exception as exc:  # connection errors, timeouts, a malformed event
                delay = await _back_off(delay, exc)

    def _handle(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        obj = event.get("object") or {}
        if kind == "ERROR":
            code = int(obj.get("code", 0))
            raise ApiError(code, str(obj.get("reason", "")), str(obj.get("message", "")))
        version = obj.get("metadata", {}).get("resourceVersion")
        if version:
            self.resource_version = str(version)
        if kind in ("ADDED", "MODIFIED", "DELETED"):
            self._apply(kind, obj)


async def _back_off(delay: float, exc: Exception) -> float:
    logger.warning("pod watch failed, retrying in {:.1f}s: {!r}", delay, exc)
    await anyio.sleep(delay * random.uniform(0.8, 1.2))
    return min(delay * 2, BACKOFF_MAX)
