"""The gRPC server on a unix socket or TCP port, with a graceful stop.

Every CSI service is registered, also the ones fusecsi does not implement: grpclib answers a
call to an unregistered service without a content-type, which grpc-go clients (kubelet,
csi-sanity) report as `Unknown` instead of UNIMPLEMENTED.

Two changes to how grpclib runs, both for the latency of a call (docs/benchmarks.md):

* `FastProtoCodec` (csi/codec.py) encodes and decodes the same betterproto messages without
  betterproto's slow reflective paths;
* the writes of one event-loop step go to the socket as one `send`: grpclib writes a unary
  response as three (headers, message, trailers) plus the acknowledgement of any PING the
  client sent, and each `send` on a unix socket wakes the client up, which on a 2-vCPU VM
  costs tens of microseconds on each side.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskStatus
from betterproto.grpc.grpclib_server import ServiceBase
from grpclib.protocol import H2Protocol
from grpclib.server import Handler, Server
from loguru import logger

from csi.calls import CallGate
from csi.codec import FastProtoCodec


class CoalescingTransport:
    """A transport proxy that sends what is written during one loop step as one write.

    The first write of a step schedules the flush with `call_soon`, which runs right after the
    current callback (grpclib writes a whole unary response without yielding); closing the
    transport flushes first. Everything else is the real transport's.
    """

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not data:
            return
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(data)

    def flush(self) -> None:
        if not self._pending:
            return
        data = b"".join(self._pending) if len(self._pending) > 1 else self._pending[0]
        self._pending.clear()
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _CoalescingH2Protocol(H2Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        proxy = CoalescingTransport(transport, asyncio.get_running_loop())  # type: ignore[arg-type]
        super().connection_made(proxy)  # type: ignore[arg-type]  # a transport by delegation


class _Server(Server):
    """grpclib's Server whose connections write through `CoalescingTransport`."""

    def _protocol_factory(self) -> H2Protocol:
        # grpclib 0.4.9's own factory, with our protocol class.
        self.__gc_step__()
        handler = Handler(self._mapping, self._codec, self._status_details_codec, self.__dispatch__)
        self._handlers.add(handler)
        return _CoalescingH2Protocol(handler, self._config, self._h2_config)


def _listen(endpoint: str) -> tuple[socket.socket, Path | None]:
    """Bind the endpoint ourselves: a stale unix socket file is removed first."""
    if endpoint.startswith("unix://"):
        path = Path(endpoint.removeprefix("unix://"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(os.fspath(path))
        return sock, path
    host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, int(port)))
    return sock, None


async def serve(
    endpoint: str,
    services: Sequence[ServiceBase],
    gate: CallGate,
    *,
    grace: float,
    task_status: TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; then refuse new calls, let running ones finish, close the socket."""
    sock, path = _listen(endpoint)
    server = _Server(list(services), codec=FastProtoCodec())  # type: ignore[arg-type]  # betterproto bases are IServable
    await server.start(sock=sock)
    address = f"unix://{path}" if path else "tcp://{}:{}".format(*sock.getsockname()[:2])
    logger.info("serving CSI on {}", address)
    task_status.started(address)
    try:
        await anyio.sleep_forever()
    finally:
        with anyio.CancelScope(shield=True):
            drained = await gate.drain(grace)
            if not drained:
                logger.warning(
                    "{} call(s) still running after {}s; closing anyway", gate.in_flight, grace
                )
            server.close()
            await server.wait_closed()
            if path is not None:
                path.unlink(missing_ok=True)
            logger.info("CSI server stopped")
