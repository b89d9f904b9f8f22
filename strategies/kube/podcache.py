"""A cache of the pods bound to this node, kept current by one watch (never by polling).

The node plugin needs two views of its node: its own Mount Pods, and which app pods still
exist (to collect references left by pods that are gone). Both come from a single
list+watch of `spec.nodeName=<node>`, so an idle plugin holds one open watch and makes no
other requests (see `WatchedCollection`).
"""

from __future__ import annotations

from typing import Any

from strategies.kube.cluster import Cluster, Obj
from strategies.kube.watch import Listener, WatchedCollection


class NodePodCache(WatchedCollection):
    def __init__(self, cluster: Cluster, node: str, listener: Listener | None = None) -> None:
        super().__init__(
            f"pods of node {node}",
            lambda: cluster.list_node_pods(node),
            lambda version: cluster.watch_node_pods(node, version),
            listener=listener,
        )
        self.cluster = cluster
        self.node = node

    @property
    def pods(self) -> dict[Any, Obj]:
        return self.objects

    def uids(self) -> set[str]:
        return {str(pod["metadata"].get("uid", "")) for pod in self.objects.values()}
