"""The webhook's watched lookups: answers from list+watch, live GETs only for what the watch
cannot vouch for; the watch relists after 410 Gone and reconnects after errors."""

from __future__ import annotations

import copy
import math
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from strategies.kube.cluster import ApiError
from strategies.kube.objects import CLAIMS, STORAGE_CLASSES, VOLUMES, WatchedLookup

pytestmark = pytest.mark.anyio

Obj = dict[str, Any]


def claim(name: str, volume: str = "", version: str = "1") -> Obj:
    spec: Obj = {"storageClassName": "fusecsi-sidecar", "accessModes": ["ReadWriteMany"]}
    if volume:
        spec["volumeName"] = volume
    return {
        "metadata": {"name": name, "namespace": "shop", "resourceVersion": version, "uid": "u"},
        "spec": spec,
        "status": {"phase": "Bound" if volume else "Pending"},
    }


def volume(name: str) -> Obj:
    return {
        "metadata": {"name": name, "resourceVersion": "2", "annotations": {"a": "b"}},
        "spec": {
            "capacity": {"storage": "1Gi"},
            "csi": {
                "driver": "csi.fusecsi.io",
                "volumeHandle": name,
                "volumeAttributes": {"strategy": "sidecar", "path": "shop/orders"},
            },
        },
    }


def storage_class(name: str) -> Obj:
    return {
        "metadata": {"name": name, "resourceVersion": "3"},
        "provisioner": "csi.fusecsi.io",
        "parameters": {"strategy": "sidecar"},
        "reclaimPolicy": "Delete",
    }


class FakeApi:
    """LIST answers and WATCH streams per collection path; records the live GETs."""

    def __init__(self) -> None:
        self.items: dict[str, list[Obj]] = {CLAIMS: [], VOLUMES: [], STORAGE_CLASSES: []}
        self.lists: dict[str, int] = {path: 0 for path in self.items}
        self.streams: dict[str, tuple[Any, Any]] = {}
        self.failures: dict[str, list[Exception]] = {path: [] for path in self.items}
        self.gets: list[str] = []
        self.opened: list[Any] = []

    async def list_collection(self, path: str, query: Any = None) -> tuple[list[Obj], str]:
        self.lists[path] += 1
        return copy.deepcopy(self.items[path]), str(self.lists[path])

    async def watch_collection(
        self, path: str, resource_version: str, query: Any = None
    ) -> AsyncIterator[Obj]:
        if self.failures[path]:
            raise self.failures[path].pop(0)
        send, receive = anyio.create_memory_object_stream[Obj](math.inf)
        self.streams[path] = (send, receive)
        self.opened.append(send)
        async with receive:
            async for event in receive:
                yield event

    def close(self) -> None:
        for send in self.opened:
            send.close()

    async def event(self, path: str, kind: str, obj: Obj) -> None:
        with anyio.fail_after(5):
            while path not in self.streams:
                await anyio.sleep(0.01)
        await self.streams[path][0].send({"type": kind, "object": obj})
        await anyio.sleep(0.05)  # let the watch apply it

    # the live lookup
    async def get_pvc(self, namespace: str, name: str) -> Obj | None:
        self.gets.append(f"pvc {namespace}/{name}")
        return claim(name, "pv-live")

    async def get_pv(self, name: str) -> Obj | None:
        self.gets.append(f"pv {name}")
        return volume(name)

    async def get_storage_class(self, name: str) -> Obj | None:
        self.gets.append(f"storageclass {name}")
        return storage_class(name)


async def synced(lookup: WatchedLookup) -> None:
    with anyio.fail_after(5):
        for collection in (lookup.claims, lookup.volumes, lookup.classes):
            await collection.synced.wait()


async def test_reviews_read_the_watched_objects_and_send_no_request() -> None:
    api = FakeApi()
    api.items[CLAIMS] = [claim("orders", "pv-1")]
    api.items[VOLUMES] = [volume("pv-1")]
    api.items[STORAGE_CLASSES] = [storage_class("fusecsi-sidecar")]
    lookup = WatchedLookup(api, api)  # type: ignore[arg-type]
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(lookup.run)
        await synced(lookup)
        found = await lookup.get_pvc("shop", "orders")
        assert found == {
            "metadata": {"name": "orders", "namespace": "shop", "resourceVersion": "1"},
            "spec": {"volumeName": "pv-1", "storageClassName": "fusecsi-sidecar"},
        }  # only what a review reads
        pv = await lookup.get_pv("pv-1")
        assert pv is not None and pv["spec"]["csi"] == {
            "driver": "csi.fusecsi.io",
            "volumeAttributes": {"strategy": "sidecar", "path": "shop/orders"},
        }
        sc = await lookup.get_storage_class("fusecsi-sidecar")
        assert sc is not None and sc["parameters"] == {"strategy": "sidecar"}
        assert sc["provisioner"] == "csi.fusecsi.io"
        assert api.gets == []
        tasks.cancel_scope.cancel()
    api.close()


async def test_what_the_watch_cannot_vouch_for_is_read_live() -> None:
    api = FakeApi()
    api.items[CLAIMS] = [claim("pending")]
    lookup = WatchedLookup(api, api)  # type: ignore[arg-type]
    # Before the first list: live.
    await lookup.get_pvc("shop", "orders")
    assert api.gets == ["pvc shop/orders"]
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(lookup.run)
        await synced(lookup)
        api.gets.clear()
        # Unseen (created an instant ago), or seen unbound (it may just have been bound): live.
        await lookup.get_pvc("shop", "new")
        await lookup.get_pvc("shop", "pending")
        await lookup.get_pv("pv-unseen")
        await lookup.get_storage_class("unseen")
        assert api.gets == [
            "pvc shop/new",
            "pvc shop/pending",
            "pv pv-unseen",
            "storageclass unseen",
        ]
        # The watch says it is bound now: from memory from then on.
        api.gets.clear()
        await api.event(CLAIMS, "MODIFIED", claim("pending", "pv-9", version="5"))
        found = await lookup.get_pvc("shop", "pending")
        assert found is not None and found["spec"]["volumeName"] == "pv-9"
        await api.event(VOLUMES, "ADDED", volume("pv-9"))
        assert await lookup.get_pv("pv-9") is not None
        assert api.gets == []
        # Deleted: gone from memory, so read live again.
        await api.event(VOLUMES, "DELETED", volume("pv-9"))
        await lookup.get_pv("pv-9")
        assert api.gets == ["pv pv-9"]
        tasks.cancel_scope.cancel()
    api.close()


async def test_the_watch_relists_after_gone_and_reconnects_after_errors() -> None:
    api = FakeApi()
    api.items[STORAGE_CLASSES] = [storage_class("old")]
    api.failures[STORAGE_CLASSES] = [ConnectionResetError("apiserver restarted")]
    lookup = WatchedLookup(api, api)  # type: ignore[arg-type]
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(lookup.run)
        await synced(lookup)
        assert await lookup.get_storage_class("old") is not None
        # The watch reconnected after the error (without listing again) ...
        with anyio.fail_after(5):
            while STORAGE_CLASSES not in api.streams:
                await anyio.sleep(0.05)
        assert api.lists[STORAGE_CLASSES] == 1
        # ... and a 410 Gone relists: what changed meanwhile is seen.
        api.items[STORAGE_CLASSES] = [storage_class("new")]
        stream = api.streams.pop(STORAGE_CLASSES)[0]
        await stream.send({"type": "ERROR", "object": {"code": 410, "reason": "Expired"}})
        with anyio.fail_after(5):
            while api.lists[STORAGE_CLASSES] < 2:
                await anyio.sleep(0.05)
        await anyio.sleep(0.05)
        assert lookup.classes.get("old") is None
        assert lookup.classes.get("new") is not None
        tasks.cancel_scope.cancel()
    api.close()


def test_an_api_error_is_what_410_raises() -> None:
    assert ApiError(410, "Expired", "too old").gone
