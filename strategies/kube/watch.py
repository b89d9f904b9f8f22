"""One collection of API objects kept current by list+watch (an informer), never by polling.

After the initial list, `synced` is set; every change wakes `changed()` waiters and calls the
listener with the object before and after. The watch resumes from the last resourceVersion
seen (bookmarks included); a 410 Gone relists, reporting what changed meanwhile; other errors
reconnect with a jittered backoff. `slim` keeps only what readers need, so that a cluster's
worth of objects costs little memory.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from typing import Any

import anyio
from loguru import logger

from strategies.kube.cluster import ApiError, Obj

Listener = Callable[[Obj | None, Obj | None], None]
"""Called with (old, new) for every change; new is None for a deletion. Must not block."""
Lister = Callable[[], Awaitable[tuple[list[Obj], str]]]
"""Lists the collection: (items, resourceVersion)."""
Watcher = Callable[[str], AsyncIterator[Obj]]
"""Watches the collection from a resourceVersion: the watch events, as JSON objects."""

BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 30.0


def namespaced_key(obj: Obj) -> tuple[str, str]:
    meta = obj["metadata"]
    return str(meta.get("namespace", "")), str(meta["name"])


class WatchedCollection:
    def __init__(
        self,
        what: str,
        list_: Lister,
        watch: Watcher,
        *,
        key: Callable[[Obj], Hashable] = namespaced_key,
        slim: Callable[[Obj], Obj] | None = None,
        listener: Listener | None = None,
    ) -> None:
        self.what = what
        self._list = list_
        self._watch = watch
        self._key = key
        self._slim = slim
        self.listener = listener
        self.objects: dict[Hashable, Obj] = {}
        self.synced = anyio.Event()
        self._changed = anyio.Event()
        self.resource_version = ""

    def get(self, *key: str) -> Obj | None:
        return self.objects.get(key if len(key) != 1 else key[0])

    async def changed(self) -> None:
        """Wait for the next change to any object of the collection."""
        await self._changed.wait()

    def _apply(self, kind: str, obj: Obj) -> None:
        key = self._key(obj)
        old = self.objects.get(key)
        if kind == "DELETED":
            self.objects.pop(key, None)
            new = None
        else:
            new = self._slim(obj) if self._slim is not None else obj
            self.objects[key] = new
        self._notify(old, new)

    def _notify(self, old: Obj | None, new: Obj | None) -> None:
        event, self._changed = self._changed, anyio.Event()
        event.set()
        if self.listener is not None:
            try:
                self.listener(old, new)
            except Exception:  # a listener bug must not stop the watch
                logger.exception("{} listener failed", self.what)

    def _replace(self, items: list[Obj]) -> None:
        """A fresh list: report what changed since the last view (restart, or 410 Gone)."""
        slim = self._slim or (lambda obj: obj)
        fresh = {self._key(obj): slim(obj) for obj in items}
        previous, self.objects = self.objects, fresh
        for key, gone in previous.items():
            if key not in fresh:
                self._notify(gone, None)
        for key, obj in fresh.items():
            before = previous.get(key)
            if before is None or before["metadata"].get("resourceVersion") != obj["metadata"].get(
                "resourceVersion"
            ):
                self._notify(before, obj)

    async def run(self) -> None:
        """List, then watch; relist on 410 Gone; reconnect with jittered backoff on errors."""
        delay = BACKOFF_INITIAL
        need_list = True
        while True:
            try:
                if need_list:
                    items, self.resource_version = await self._list()
                    self._replace(items)
                    need_list = False
                    if not self.synced.is_set():
                        logger.info("{}: {} listed, watching", self.what, len(items))
                        self.synced.set()
                async for event in self._watch(self.resource_version):
                    delay = BACKOFF_INITIAL
                    self._handle(event)
                # The server ended the watch (its timeout): continue from where we are.
            except ApiError as exc:
                if exc.gone:
                    need_list = True
                    continue
                delay = await self._back_off(delay, exc)
            except Exception as exc:  # connection errors, timeouts, a malformed event
                delay = await self._back_off(delay, exc)

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

    async def _back_off(self, delay: float, exc: Exception) -> float:
        logger.warning("{} watch failed, retrying in {:.1f}s: {!r}", self.what, delay, exc)
        await anyio.sleep(delay * random.uniform(0.8, 1.2))
        return min(delay * 2, BACKOFF_MAX)
