"""Run a system call that may hang (anything touching a FUSE path) in a thread, with a deadline.

A dead or stuck FUSE server makes stat/statfs/umount block in the kernel; the event loop must
never wait on that. The thread is abandoned on timeout or cancellation (it finishes or stays
stuck on its own, and a new thread serves the next call); the caller gets `Unavailable` with
the operation named.

This is anyio's `to_thread.run_sync(..., abandon_on_cancel=True)` inside `fail_after`, pared
down to what a node plugin needs: every publish and unpublish makes two of these calls, and
anyio's general version (cancel scope, limiter, four loop iterations a call) cost more CPU
than the system calls it guards. The semantics are the same: a call in an already cancelled
scope does not start, the call sees the caller's context variables (log context), at most
`MAX_THREADS` calls run at once, an abandoned call releases its slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import queue
import threading
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any, ParamSpec, TypeVar

from anyio.lowlevel import checkpoint_if_cancelled

from strategies.errors import Unavailable

P = ParamSpec("P")
T = TypeVar("T")

DEFAULT_TIMEOUT = 10.0
MAX_THREADS = 40  # anyio's default thread limit
IDLE_THREAD_LIFETIME = 10.0  # seconds an idle worker waits for work before it exits

_Job = tuple[asyncio.AbstractEventLoop, asyncio.Future[Any], Callable[[], Any]]


class _Worker(threading.Thread):
    """One thread that runs jobs one after another; a job that hangs takes the thread with it."""

    def __init__(self, idle: deque[_Worker]) -> None:
        super().__init__(name="fusecsi-blocking", daemon=True)
        self.jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self.idle = idle

    def run(self) -> None:
        while True:
            try:
                loop, waiter, call = self.jobs.get(timeout=IDLE_THREAD_LIFETIME)
            except queue.Empty:
                try:
                    self.idle.remove(self)
                except ValueError:
                    continue  # a caller took this worker just now: its job is on the way
                return
            try:
                outcome: tuple[bool, Any] = (True, call())
            except BaseException as exc:  # delivered to the caller, who re-raises it
                outcome = (False, exc)
            del call
            self.idle.append(self)
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
                loop.call_soon_threadsafe(_deliver, waiter, outcome)


def _deliver(waiter: asyncio.Future[Any], outcome: tuple[bool, Any]) -> None:
    if waiter.done():  # the caller gave up (timeout or cancellation)
        return
    ok, value = outcome
    if ok:
        waiter.set_result(value)
    else:
        waiter.set_exception(value)


def _expire(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class _Pool:
    """Idle workers of one event loop and the limit on calls in flight."""

    def __init__(self) -> None:
        self.idle: deque[_Worker] = deque()
        self.slots = asyncio.Semaphore(MAX_THREADS)

    def submit(self, job: _Job) -> None:
        try:
            worker = self.idle.pop()
        except IndexError:
            worker = _Worker(self.idle)
            worker.start()
        worker.jobs.put(job)


_pools: dict[asyncio.AbstractEventLoop, _Pool] = {}


def _pool(loop: asyncio.AbstractEventLoop) -> _Pool:
    pool = _pools.get(loop)
    if pool is None:
        for closed in [other for other in _pools if other.is_closed()]:
            del _pools[closed]
        pool = _pools[loop] = _Pool()
    return pool


async def run_blocking(
    what: str,
    func: Callable[P, T],
    /,
    *args: P.args,
    **kwargs: P.kwargs,
) -> T:
    """Call `func(*args, **kwargs)` in a worker thread; give up after DEFAULT_TIMEOUT seconds."""
    return await run_blocking_for(DEFAULT_TIMEOUT, what, partial(func, *args, **kwargs))


async def run_blocking_for(timeout: float, what: str, call: Callable[[], T]) -> T:
    """Like `run_blocking` with an explicit deadline in seconds."""
    await checkpoint_if_cancelled()
    loop = asyncio.get_running_loop()
    pool = _pool(loop)
    async with pool.slots:
        waiter: asyncio.Future[T] = loop.create_future()
        timer = loop.call_later(timeout, _expire, waiter)
        try:
            pool.submit((loop, waiter, partial(contextvars.copy_context().run, call)))
            return await waiter
        except TimeoutError as exc:
            raise Unavailable(
                f"{what} did not finish within {timeout:g}s (hung filesystem?)"
            ) from exc
        finally:
            timer.cancel()
