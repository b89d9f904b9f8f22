"""What every RPC goes through: logging, error mapping, and the drain gate for graceful shutdown.

Handlers raise fusecsi's domain errors; this wrapper turns them into gRPC status codes (via
`csi.errors`), logs each call once with its duration and outcome, and counts in-flight calls
so that SIGTERM can wait for them before the server closes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine
from functools import wraps
from typing import Any, Concatenate, ParamSpec, TypeVar

import anyio
import betterproto
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from loguru import logger

from csi.errors import to_grpc
from csi.logging import loggable
from strategies.errors import FusecsiError

P = ParamSpec("P")
R = TypeVar("R")
S = TypeVar("S", bound="HasGate")

QUIET_METHODS = frozenset(
    {"probe", "node_get_capabilities", "controller_get_capabilities", "get_plugin_info"}
)


class CallGate:
    """Counts calls in flight; once closed, new calls are refused with UNAVAILABLE."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.closed = False
        # Made by `drain` only: creating an anyio.Event on every call that finds the server
        # idle (most of them) cost more than the rest of the gate.
        self._idle: anyio.Event | None = None

    def enter(self) -> None:
        if self.closed:
            raise GRPCError(Status.UNAVAILABLE, "the driver is shutting down")
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0 and self._idle is not None:
            self._idle.set()

    async def drain(self, grace: float) -> bool:
        """Refuse new calls and wait up to `grace` seconds for running ones; True if all ended."""
        self.closed = True
        if self.in_flight == 0:
            return True
        self._idle = anyio.Event()
        with anyio.move_on_after(grace):
            await self._idle.wait()
            return True
        return False


class HasGate:
    gate: CallGate


def rpc(
    handler: Callable[Concatenate[S, Any, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[S, Any, P], Coroutine[Any, Any, R]]:
    """Decorate a servicer method: gate, bind log context, map errors, log the outcome."""
    method = handler.__name__

    @wraps(handler)
    async def wrapper(self: S, request: Any, /, *args: P.args, **kwargs: P.kwargs) -> R:
        self.gate.enter()
        started = time.perf_counter()
        volume_id = getattr(request, "volume_id", "") or ""
        target = getattr(request, "target_path", "") or getattr(request, "volume_path", "") or ""
        log = logger.bind(rpc=method, volume_id=volume_id, target=target)
        if isinstance(request, betterproto.Message):
            log.opt(lazy=True).trace("request {}", lambda: loggable(request))
        code = Status.OK
        try:
            with logger.contextualize(volume_id=volume_id, target=target):
                return await handler(self, request, *args, **kwargs)
        except FusecsiError as exc:
            error = to_grpc(exc)
            code = error.status
            raise error from exc
        except GRPCError as exc:
            code = exc.status
            raise
        except Exception as exc:
            code = Status.INTERNAL
            log.exception("unexpected error in {}", method)
            raise GRPCError(
                Status.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            self.gate.leave()
            elapsed_ms = (time.perf_counter() - started) * 1000
            level = "DEBUG" if method in QUIET_METHODS and code == Status.OK else "INFO"
            if code not in (
                Status.OK,
                Status.NOT_FOUND,
                Status.ALREADY_EXISTS,
                Status.INVALID_ARGUMENT,
            ):
                level = "WARNING"
            log.log(level, "{} -> {} in {:.2f} ms", method, code.name, elapsed_ms)

    return wrapper
