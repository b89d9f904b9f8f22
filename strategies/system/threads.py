"""Worker threads for blocking system calls, with as little work per call as possible.

`anyio.to_thread.run_sync` spends a loop iteration on a checkpoint, enters a cancel scope and
a capacity limiter on every call: on our 2-vCPU machines a round trip costs about 240 us with
it, 140 us with `asyncio.to_thread` and 30 us here. The node plugin makes a few such calls per
publish and the FUSE server several per small-file request, so the difference is most of
their latency. One queue, daemon threads grown on demand up to `max_threads`, and
`call_soon_threadsafe` for the result.

A caller that stops waiting (cancelled, or a deadline in `strategies.system.blocking`) leaves
its call running: a thread stuck in a dead FUSE mount stays stuck, but it is a daemon (it never
keeps the process from exiting) and it counts against `max_threads`, so hung mounts cannot
grow the process without bound: once every thread is stuck, new calls wait in the queue and
their deadlines turn into errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar, TypeVarTuple

_R = TypeVar("_R")
_Ts = TypeVarTuple("_Ts")

_Job = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]]


class WorkerThreads:
    """A small thread pool whose `run` is awaitable from any event loop."""

    def __init__(self, *, max_threads: int, name: str) -> None:
        self._max_threads = max_threads
        self._name = name
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._idle = 0

    async def run(self, func: Callable[[*_Ts], _R], *args: *_Ts) -> _R:
        """Run `func(*args)` in a worker, in the caller's context (log context included)."""
        return await self._submit(asyncio.get_running_loop(), func, args)

    async def run_within(self, timeout: float, func: Callable[[*_Ts], _R], *args: *_Ts) -> _R:
        """Like `run`, but raise TimeoutError after `timeout` seconds (the call is abandoned).

        The deadline is a timer on the awaited future itself: no task and no cancel scope
        around it (`asyncio.wait_for` would wrap the wait in a new task, a few loop iterations
        more per call).
        """
        loop = asyncio.get_running_loop()
        future = self._submit(loop, func, args)
        timer = loop.call_later(timeout, _expire, future)
        try:
            return await future
        finally:
            timer.cancel()

    def _submit(
        self, loop: asyncio.AbstractEventLoop, func: Callable[..., _R], args: tuple[Any, ...]
    ) -> asyncio.Future[_R]:
        future: asyncio.Future[_R] = loop.create_future()
        with self._lock:
            # _idle is idle threads minus queued jobs: it goes below 0 only at max_threads.
            if self._idle > 0 or len(self._threads) >= self._max_threads:
                self._idle -= 1
            else:
                thread = threading.Thread(
                    target=self._work, name=f"{self._name}-{len(self._threads)}", daemon=True
                )
                self._threads.append(thread)
                thread.start()
        context = contextvars.copy_context()
        self._queue.put((loop, future, context.run, (func, *args)))
        return future

    def _work(self) -> None:
        while (job := self._queue.get()) is not None:
            loop, future, func, args = job
            outcome: tuple[Any, BaseException | None]
            try:
                outcome = (func(*args), None)
            except BaseException as error:  # delivered to the awaiting caller
                outcome = (None, error)
            with self._lock:
                self._idle += 1
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                loop.call_soon_threadsafe(_settle_future, future, *outcome)
            del job, func, args, outcome

    def close(self) -> None:
        """Let the threads finish what they have and exit (they are daemons: nobody waits)."""
        for _ in self._threads:
            self._queue.put(None)


def _expire(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())


def _settle_future(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the caller stopped waiting
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
