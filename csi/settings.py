"""One typed, frozen settings object, built once from defaults, a config file, env and flags.

Precedence, lowest first: the defaults below, the TOML config file (`--config`, keys as the
field names), `FUSECSI_<FIELD>` environment variables, command-line flags (`--field-name`).
Every field documents itself; `fusecsi <command> --help` prints these docs.
"""

from __future__ import annotations

import os
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, get_args

LogFormat = Literal["text", "json"]
LogLevel = Literal["TRACE", "DEBUG", "INFO", "WARNING", "ERROR"]


def _doc(text: str, **extra: Any) -> dict[str, Any]:
    return {"doc": text, **extra}


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything the driver can be told; passed down explicitly, never read from globals."""

    endpoint: str = field(
        default="unix:///csi/csi.sock",
        metadata=_doc("CSI endpoint: unix:///path/to.sock or tcp://host:port"),
    )
    node_id: str = field(
        default_factory=socket.gethostname,
        metadata=_doc("this node's ID as Kubernetes knows it (NodeGetInfo); default: hostname"),
    )
    driver_name: str = field(
        default="csi.fusecsi.io", metadata=_doc("CSI plugin name (GetPluginInfo)")
    )
    default_strategy: str = field(
        default="hostPath",
        metadata=_doc("strategy for volumes whose parameters do not name one"),
    )
    roots: Mapping[str, Path] = field(
        default_factory=dict,
        metadata=_doc(
            "allowed root NAME=PATH (repeatable): volumes live only below these",
            multi=True,
            flag="root",
        ),
    )
    allowed_target_dirs: tuple[Path, ...] = field(
        default=(Path("/var/lib/kubelet"),),
        metadata=_doc(
            "publish targets must lie below one of these (repeatable)",
            multi=True,
            flag="allowed-target-dir",
        ),
    )
    state_dir: Path = field(
        default=Path("/run/fusecsi"),
        metadata=_doc(
            "node state: per-target records, FUSE staging mounts (tmpfs: as long-lived as mounts)"
        ),
    )
    require_mounted_roots: bool = field(
        default=False,
        metadata=_doc("hostPath: refuse to publish from a root that is not a mount point"),
    )
    fuse_command: tuple[str, ...] = field(
        default=(),
        metadata=_doc(
            "command (argv, repeatable) that runs `fusecsi fuse`; default: this interpreter",
            multi=True,
        ),
    )
    fuse_start_timeout: float = field(
        default=15.0, metadata=_doc("seconds a FUSE session may take to come up")
    )
    namespace: str = field(
        default="fusecsi",
        metadata=_doc("namespace of the driver's pods; Mount Pods and their Secrets live here"),
    )
    pod_name: str = field(
        default="",
        metadata=_doc("this node plugin's pod (its image is the builtin client's default image)"),
    )
    kubeconfig: str = field(
        default="",
        metadata=_doc(
            "kubeconfig for the Kubernetes API; default: in-cluster, or none outside a cluster"
        ),
    )
    mountpod_dir: Path = field(
        default=Path("/var/lib/fusecsi/mountpods"),
        metadata=_doc(
            "host directory where Mount Pods mount (same path in the node plugin, Bidirectional)"
        ),
    )
    mountpod_ready_timeout: float = field(
        default=90.0,
        metadata=_doc("seconds NodePublish waits for a new Mount Pod's client to mount"),
    )
    client_images: Mapping[str, str] = field(
        default_factory=dict,
        metadata=_doc(
            "default image per client, CLIENT=IMAGE (repeatable); builtin: the plugin's own",
            multi=True,
            flag="client-image",
        ),
    )
    mountpod_defaults: Mapping[str, str] = field(
        default_factory=dict,
        metadata=_doc(
            "defaults for mountpod parameters, KEY=VALUE (repeatable); volume parameters win",
            multi=True,
            flag="mountpod-default",
        ),
    )
    webhook_address: str = field(
        default="0.0.0.0:9443",
        metadata=_doc("sidecar webhook: HOST:PORT its HTTPS server (/mutate, /healthz) listens on"),
    )
    webhook_cert_dir: Path = field(
        default=Path("/run/fusecsi/webhook-tls"),
        metadata=_doc("sidecar webhook: where it writes its serving certificate and key (tmpfs)"),
    )
    sidecar_image: str = field(
        default="",
        metadata=_doc("sidecar webhook: image of the injected sidecars; default: its own image"),
    )
    webhook_lookup_cache: float = field(
        default=5.0,
        metadata=_doc(
            "sidecar webhook: seconds a PV, StorageClass or bound PVC it read serves other "
            "reviews (one API request per object for a burst of pods); 0: read every time"
        ),
    )
    webhook_config_name: str = field(
        default="fusecsi-sidecar-injector",
        metadata=_doc(
            "sidecar webhook: its MutatingWebhookConfiguration and Service; Secret <name>-tls"
        ),
    )
    shutdown_grace: float = field(
        default=20.0, metadata=_doc("seconds in-flight calls get to finish after SIGTERM")
    )
    log_format: LogFormat = field(default="text", metadata=_doc("text or json"))
    log_level: LogLevel = field(default="INFO", metadata=_doc("TRACE, DEBUG, INFO, WARNING, ERROR"))

    def summary(self) -> dict[str, str]:
        """The settings as strings, for the start-up log line (no secrets live in settings)."""
        return {f.name: str(getattr(self, f.name)) for f in fields(self)}


class SettingsError(ValueError):
    """A setting has a value of the wrong form; the message names the setting and its source."""


def _convert(name: str, raw: Any, source: str) -> Any:
    default = getattr(Settings(), name)
    try:
        if name in ("roots", "client_images", "mountpod_defaults"):
            items = (
                raw
                if isinstance(raw, Mapping)
                else dict(_split_pair(item) for item in _as_list(raw))
            )
            if name == "roots":
                return {str(key): Path(value) for key, value in items.items()}
            return {str(key): str(value) for key, value in items.items()}
        if isinstance(default, bool):
            if isinstance(raw, bool):
                return raw
            if str(raw).lower() in ("1", "true", "yes"):
                return True
            if str(raw).lower() in ("0", "false", "no"):
                return False
            raise ValueError("expected true or false")
        if isinstance(default, float):
            return float(raw)
        if isinstance(default, Path):
            return Path(raw)
        if name == "allowed_target_dirs":
            return tuple(Path(item) for item in _as_list(raw))
        if name == "fuse_command":
            return tuple(_as_list(raw))
        if name in ("log_format", "log_level"):
            allowed = get_args(LogFormat if name == "log_format" else LogLevel)
            value = str(raw).upper() if name == "log_level" else str(raw)
            if value not in allowed:
                raise ValueError(f"expected one of {', '.join(allowed)}")
            return value
        return str(raw)
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"setting {name} (from {source}): {exc}") from exc


def _as_list(raw: Any) -> list[str]:
    if isinstance(raw, (list, tuple)):
        return [str(item) for item in raw]
    return [item for item in str(raw).split(",") if item]


def _split_pair(item: str) -> tuple[str, str]:
    name, sep, value = item.partition("=")
    if not sep or not name or not value:
        raise ValueError(f"{item!r} is not NAME=VALUE")
    return name, value


def load_settings(
    *,
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Settings:
    """Build Settings from the config file, environment and flags (in that order of precedence)."""
    values: dict[str, Any] = {}
    names = [f.name for f in fields(Settings)]
    if config_file is not None:
        try:
            document = tomllib.loads(config_file.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SettingsError(f"config file {config_file}: {exc}") from exc
        for key, raw in document.items():
            if key not in names:
                raise SettingsError(f"config file {config_file}: unknown setting {key!r}")
            values[key] = _convert(key, raw, f"config file {config_file}")
    env = os.environ if environ is None else environ
    for name in names:
        raw = env.get(f"FUSECSI_{name.upper()}")
        if raw is not None:
            values[name] = _convert(name, raw, f"FUSECSI_{name.upper()}")
    for name, raw in (flags or {}).items():
        if raw is not None and raw != [] and name in names:
            values[name] = _convert(name, raw, f"--{name.replace('_', '-')}")
    settings = replace(Settings(), **values)
    _validate(settings)
    return settings


def _validate(settings: Settings) -> None:
    if not settings.endpoint.startswith(("unix://", "tcp://")):
        raise SettingsError(
            f"setting endpoint: {settings.endpoint!r} must start with unix:// or tcp://"
        )
    if not settings.node_id:
        raise SettingsError("setting node_id: must not be empty")
    for name, path in settings.roots.items():
        if not path.is_absolute():
            raise SettingsError(f"setting roots: root {name!r} path {path} must be absolute")
    if not settings.mountpod_dir.is_absolute():
        raise SettingsError(f"setting mountpod_dir: {settings.mountpod_dir} must be absolute")
    for path in settings.allowed_target_dirs:
        if not path.is_absolute():
            raise SettingsError(f"setting allowed_target_dirs: {path} must be absolute")
    if not settings.webhook_lookup_cache >= 0:  # NaN too
        raise SettingsError(
            f"setting webhook_lookup_cache: {settings.webhook_lookup_cache} must be 0 or more"
        )
