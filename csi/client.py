"""`fusecsi client`: call a CSI endpoint by hand (walkthroughs, debugging a node)."""

from __future__ import annotations

import argparse
import json
from typing import Any

import anyio
import betterproto
from grpclib.client import Channel
from grpclib.exceptions import GRPCError

from protos.csi import v1 as csi
from strategies.params import parse_size

MOUNT = csi.VolumeCapability(
    mount=csi.VolumeCapabilityMountVolume(),
    access_mode=csi.VolumeCapabilityAccessMode(
        mode=csi.VolumeCapabilityAccessModeMode.MULTI_NODE_MULTI_WRITER  # type: ignore[arg-type]
    ),
)


def add_client_parser(commands: Any) -> None:
    client = commands.add_parser(
        "client",
        help="call a CSI endpoint by hand (create, publish, stats...)",
        description="A small CSI client for walkthroughs and debugging. Prints responses as JSON.",
    )
    client.add_argument(
        "--endpoint", default="unix:///csi/csi.sock", help="unix:///path or tcp://host:port"
    )
    ops = client.add_subparsers(dest="op", required=True, metavar="OP")
    ops.add_parser("probe", help="Identity.Probe")
    ops.add_parser("info", help="GetPluginInfo, capabilities and NodeGetInfo")
    create = ops.add_parser("create", help="Controller.CreateVolume")
    create.add_argument("name")
    create.add_argument("--size", default="0", help="capacity, e.g. 1Gi")
    create.add_argument(
        "--param", action="append", default=[], metavar="KEY=VALUE", help="StorageClass parameter"
    )
    delete = ops.add_parser("delete", help="Controller.DeleteVolume")
    delete.add_argument("volume_id")
    expand = ops.add_parser("expand", help="Controller.ControllerExpandVolume")
    expand.add_argument("volume_id")
    expand.add_argument("size")
    publish = ops.add_parser("publish", help="Node.NodePublishVolume")
    publish.add_argument("volume_id")
    publish.add_argument("target")
    publish.add_argument(
        "--context", default="{}", help="volume context as JSON (the output of create)"
    )
    publish.add_argument("--readonly", action="store_true")
    unpublish = ops.add_parser("unpublish", help="Node.NodeUnpublishVolume")
    unpublish.add_argument("volume_id")
    unpublish.add_argument("target")
    stats = ops.add_parser("stats", help="Node.NodeGetVolumeStats")
    stats.add_argument("volume_id")
    stats.add_argument("target")


def _channel(endpoint: str) -> Channel:
    if endpoint.startswith("unix://"):
        return Channel(path=endpoint.removeprefix("unix://"))
    host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
    return Channel(host or "127.0.0.1", int(port))


async def _call(args: argparse.Namespace) -> betterproto.Message | list[betterproto.Message]:
    channel = _channel(args.endpoint)
    identity, node, controller = (
        csi.IdentityStub(channel),
        csi.NodeStub(channel),
        csi.ControllerStub(channel),
    )
    try:
        if args.op == "probe":
            return await identity.probe(csi.ProbeRequest())
        if args.op == "info":
            return [
                await identity.get_plugin_info(csi.GetPluginInfoRequest()),
                await identity.get_plugin_capabilities(csi.GetPluginCapabilitiesRequest()),
                await node.node_get_info(csi.NodeGetInfoRequest()),
            ]
        if args.op == "create":
            params = dict(item.split("=", 1) for item in args.param)
            size = parse_size(args.size, field="--size")
            return await controller.create_volume(
                csi.CreateVolumeRequest(
                    name=args.name,
                    capacity_range=csi.CapacityRange(required_bytes=size),
                    volume_capabilities=[MOUNT],
                    parameters=params,
                )
            )
        if args.op == "delete":
            return await controller.delete_volume(csi.DeleteVolumeRequest(volume_id=args.volume_id))
        if args.op == "expand":
            size = parse_size(args.size, field="size")
            return await controller.controller_expand_volume(
                csi.ControllerExpandVolumeRequest(
                    volume_id=args.volume_id, capacity_range=csi.CapacityRange(required_bytes=size)
                )
            )
        if args.op == "publish":
            return await node.node_publish_volume(
                csi.NodePublishVolumeRequest(
                    volume_id=args.volume_id,
                    target_path=args.target,
                    volume_capability=MOUNT,
                    volume_context=json.loads(args.context),
                    readonly=args.readonly,
                )
            )
        if args.op == "unpublish":
            return await node.node_unpublish_volume(
                csi.NodeUnpublishVolumeRequest(volume_id=args.volume_id, target_path=args.target)
            )
        return await node.node_get_volume_stats(
            csi.NodeGetVolumeStatsRequest(volume_id=args.volume_id, volume_path=args.target)
        )
    finally:
        channel.close()


def run_client(args: argparse.Namespace) -> int:
    try:
        result = anyio.run(_call, args, backend="asyncio")
    except GRPCError as exc:
        print(f"error: {exc.status.name}: {exc.message}")
        return 1
    except (OSError, ValueError) as exc:
        print(f"error: {exc}")
        return 1
    messages = result if isinstance(result, list) else [result]
    for message in messages:
        print(json.dumps(message.to_dict(include_default_values=False), indent=2))
    return 0
