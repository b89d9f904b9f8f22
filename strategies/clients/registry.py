"""Every built-in client, by the name the `client` parameter uses."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from strategies.clients.base import Client
from strategies.clients.builtin import BuiltinClient
from strategies.clients.command import CommandClient
from strategies.clients.juicefs import JuiceFSClient
from strategies.volumes import VolumeStore

# Every parameter a built-in client reads (a strategy that runs clients accepts them all).
CLIENT_PARAMETERS = {
    **BuiltinClient.parameters,
    **CommandClient.parameters,
    **JuiceFSClient.parameters,
}


def build_clients(volumes: VolumeStore) -> Mapping[str, Client[Any]]:
    clients: list[Client[Any]] = [
        BuiltinClient(volumes),
        CommandClient(volumes.roots),
        JuiceFSClient(volumes.roots),
    ]
    return {client.name: client for client in clients}
