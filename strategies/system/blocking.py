"""Run a system call that may hang (anything touching a FUSE path) in a thread, with a deadline.

A dead or stuck FUSE server makes stat/statfs/umount block in the kernel; the event loop must
never wait on that. The thread is abandoned on timeout (it finishes or stays stuck on its own);
the caller gets `Unavailable` with the operation named.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import ParamSpec, TypeVar

import anyio
import anyio.to_thread

from strategies.errors import Unavailable

P = ParamSpec("P")
T = TypeVar("T")

DEFAULT_TIMEOUT = 10.0


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
    try:
        with anyio.fail_after(timeout):
            return await anyio.to_thread.run_sync(call, abandon_on_cancel=True)
    except TimeoutError as exc:
        raise Unavailable(f"{what} did not finish within {timeout:g}s (hung filesystem?)") from exc
