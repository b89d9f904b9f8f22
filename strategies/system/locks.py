"""Locks by key (a target path, a volume ID) that disappear when nobody holds or waits for them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager

import anyio


class KeyedLocks:
    """One anyio.Lock per key, created on demand and dropped when idle (no unbounded growth)."""

    def __init__(self) -> None:
        self._locks: dict[Hashable, tuple[anyio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, key: Hashable) -> AsyncIterator[None]:
        entry = self._locks.get(key)
        # fast_acquire: an uncontended lock is taken without a trip through the event loop
        # (each costs a loop iteration; callers checkpoint anyway when they do work).
        lock, users = entry if entry is not None else (anyio.Lock(fast_acquire=True), 0)
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)
