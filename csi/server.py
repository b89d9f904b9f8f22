"""The gRPC server on a unix socket or TCP port, with a graceful stop.

Every CSI service is registered, also the ones fusecsi does not implement: grpclib answers a
call to an unregistered service without a content-type, which grpc-go clients (kubelet,
csi-sanity) report as `Unknown` instead of UNIMPLEMENTED.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from pathlib import Path

import anyio
from anyio.abc import TaskStatus
from betterproto.grpc.grpclib_server import ServiceBase
from grpclib.server import Server
from loguru import logger

from csi.calls import CallGate


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
    server = Server(list(services))  # type: ignore[arg-type]  # betterproto bases are IServable
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
