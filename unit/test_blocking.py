"""run_blocking: a hung call becomes UNAVAILABLE naming the operation; the loop never waits."""

from __future__ import annotations

import threading
import time

import anyio
import pytest
from loguru import logger

from strategies.errors import Unavailable
from strategies.system.blocking import run_blocking, run_blocking_for

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_a_hung_call_times_out_with_the_operation_named() -> None:
    release = threading.Event()
    started = time.monotonic()
    with pytest.raises(Unavailable, match=r"statfs of /mnt/x did not finish within 0\.2s"):
        await run_blocking_for(0.2, "statfs of /mnt/x", release.wait)
    assert time.monotonic() - started < 2
    release.set()  # the abandoned thread finishes on its own


async def test_the_event_loop_keeps_running_while_a_call_blocks() -> None:
    ticks = 0
    release = threading.Event()

    async def tick() -> None:
        nonlocal ticks
        while not release.is_set():
            ticks += 1
            await anyio.sleep(0.01)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(tick)
        await run_blocking("sleeping", time.sleep, 0.3)
        release.set()
    assert ticks >= 10


async def test_cancellation_abandons_the_call() -> None:
    release = threading.Event()
    with anyio.move_on_after(0.1) as scope:
        await run_blocking("waiting", release.wait)
    assert scope.cancelled_caught
    release.set()


async def test_results_errors_and_log_context_cross_the_thread() -> None:
    assert await run_blocking("adding", sum, [1, 2, 3]) == 6
    with pytest.raises(ZeroDivisionError):
        await run_blocking("dividing", lambda: 1 / 0)
    seen: list[object] = []
    sink = logger.add(lambda message: seen.append(message.record["extra"].get("volume_id")))
    try:
        with logger.contextualize(volume_id="default/v1"):
            await run_blocking("logging", logger.info, "from a worker thread")
    finally:
        logger.remove(sink)
    assert seen == ["default/v1"]
