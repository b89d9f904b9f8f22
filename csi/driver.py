"""Assemble the driver from settings and run it: one task group owns the server and every task."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Awaitable, Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import anyio
from anyio.abc import TaskStatus
from betterproto.grpc.grpclib_server import ServiceBase
from loguru import logger

from csi.calls import CallGate
from csi.controller import ControllerService
from csi.identity import IdentityService
from csi.node import NodeService
from csi.requests import StrategySet
from csi.server import serve
from csi.settings import Settings
from protos.csi import v1 as csi
from strategies.kube.cluster import Cluster, KubeCluster
from strategies.publications import PublicationRecords
from strategies.registry import NodeEnvironment, build_strategies
from strategies.volumes import Roots, VolumeStore


def driver_version() -> str:
    try:
        return version("fusecsi")
    except PackageNotFoundError:
        return "0.0.0+unknown"


def build_strategy_set(settings: Settings, volumes: VolumeStore) -> StrategySet:
    env = NodeEnvironment(
        roots=volumes.roots,
        volumes=volumes,
        state_dir=settings.state_dir,
        require_mounted_roots=settings.require_mounted_roots,
        fuse_command=settings.fuse_command or (sys.executable, "-m", "csi", "fuse"),
        fuse_start_timeout=settings.fuse_start_timeout,
        node_id=settings.node_id,
        connect=kubernetes_connector(settings),
        own_pod=settings.pod_name,
        mountpod_dir=settings.mountpod_dir,
        mountpod_ready_timeout=settings.mountpod_ready_timeout,
        client_images=settings.client_images,
        mountpod_defaults=settings.mountpod_defaults,
    )
    return StrategySet(build_strategies(env), settings.default_strategy)


def kubernetes_connector(settings: Settings) -> Callable[[], Awaitable[Cluster]] | None:
    """How to reach the API: a kubeconfig, the in-cluster service account, or not at all."""
    kubeconfig = Path(settings.kubeconfig) if settings.kubeconfig else None
    if kubeconfig is None and not os.environ.get("KUBERNETES_SERVICE_HOST"):
        return None

    async def connect() -> Cluster:
        return await KubeCluster.connect(namespace=settings.namespace, kubeconfig=kubeconfig)

    return connect


async def run_driver(
    settings: Settings,
    *,
    node: bool,
    controller: bool,
    task_status: TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run until SIGTERM/SIGINT (or cancellation). `task_status` gets the served address."""
    volumes = VolumeStore(Roots(settings.roots))
    strategies = build_strategy_set(settings, volumes)
    gate = CallGate()
    node_service = (
        NodeService(
            node_id=settings.node_id,
            strategies=strategies,
            records=PublicationRecords(settings.state_dir),
            allowed_targets=settings.allowed_target_dirs,
            gate=gate,
        )
        if node
        else None
    )
    started = anyio.Event()
    identity = IdentityService(
        name=settings.driver_name,
        version=driver_version(),
        controller=controller,
        ready=lambda: started.is_set() and (node_service is None or node_service.ready()),
        gate=gate,
    )
    services: list[ServiceBase] = [
        identity,
        node_service or csi.NodeBase(),
        ControllerService(strategies=strategies, volumes=volumes, gate=gate)
        if controller
        else csi.ControllerBase(),
        csi.GroupControllerBase(),
        csi.SnapshotMetadataBase(),
    ]
    logger.info("fusecsi {} starting: {}", driver_version(), settings.summary())
    try:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(_stop_on_signal, tasks.cancel_scope, name="signals")
            address = await tasks.start(
                lambda task_status: serve(
                    settings.endpoint,
                    services,
                    gate,
                    grace=settings.shutdown_grace,
                    task_status=task_status,
                ),
                name="grpc-server",
            )
            if node_service is not None:
                await node_service.start(tasks)
            started.set()
            logger.info("ready")
            task_status.started(address)
    finally:
        with anyio.move_on_after(settings.shutdown_grace, shield=True):
            for strategy in strategies:
                await strategy.aclose()


async def _stop_on_signal(scope: anyio.CancelScope) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for received in signals:
            logger.info("received {}, shutting down", signal.Signals(received).name)
            scope.cancel()
            return
