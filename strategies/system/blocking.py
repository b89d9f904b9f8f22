"""Run a system call that may hang (anything touching a FUSE path) in a thread, with a deadline.

A dead or stuck FUSE server makes stat/statfs/umount block in the kernel; the event loop must
never wait on that. On timeout or cancellation the call is abandoned (its thread finishes or
stays stuck on its own, see `strategies.system.threads`); a timeout becomes `Unavailable` with
the operation named. This is `anyio.to_thread.run_sync(..., abandon_on_cancel=True)` inside
`fail_after`, with a leaner thread hop and the deadline as a timer on the awaited future (no
task per call): every publish and unpublish makes a few of these calls.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import ParamSpec, TypeVar

from anyio.lowlevel import checkpoint_if_cancelled

from strategies.errors import Unavailable
from strategies.system.threads import WorkerThreads

P = ParamSpec("P")
T = TypeVar("T")

DEFAULT_TIMEOUT = 10.0

# One pool for the process, like anyio's default thread limiter (40 threads).
_SYSCALL_THREADS = WorkerThreads(max_threads=40, name="fusecsi-blocking")


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
    try:
        return await _SYSCALL_THREADS.run_within(timeout, call)
    except TimeoutError as exc:
        raise Unavailable(f"{what} did not finish within {timeout:g}s (hung filesystem?)") from exc
