"""juicefs: the JuiceFS community client, configured from the volume's Secret.

Secret keys (JuiceFS's own names): `name`, `metaurl` (required); `storage`, `bucket`,
`access-key`, `secret-key` (format on first use when `storage` is given); `format-options`
(extra `juicefs format` flags); `envs` (a JSON object of extra environment variables).
Every value reaches the container through `secretKeyRef` env vars; the command line only holds
`$NAME` references that the container's shell expands.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from strategies.base import Secrets
from strategies.clients.base import (
    Client,
    ClientContainer,
    ClientMount,
    env_name_for,
    host_directory,
    secret_env,
)
from strategies.clients.builtin import mount_options
from strategies.errors import InvalidArgument
from strategies.params import Parameters
from strategies.volumes import Roots

REQUIRED_SECRETS = ("name", "metaurl")
KNOWN_SECRETS = (
    "name",
    "metaurl",
    "storage",
    "bucket",
    "access-key",
    "secret-key",
    "format-options",
    "envs",
)
GIB = 1 << 30

# Format on first use (`--no-update`: an existing volume's settings are never changed), set the
# quota of the subdirectory when a capacity is known, then become the client. Arguments: mountpoint,
# subdir, quota in GiB (0: none), then `juicefs mount` flags. Secrets come only from env.
SCRIPT = r"""set -euf
mountpoint=$1 subdir=$2 quota=$3
shift 3
if [ -n "${JFS_STORAGE:-}" ]; then
  juicefs format --no-update --storage "$JFS_STORAGE" ${JFS_BUCKET:+--bucket "$JFS_BUCKET"} \
    ${JFS_FORMAT_OPTIONS:-} "$JFS_METAURL" "$JFS_NAME"
fi
if [ "$quota" != 0 ] && [ "$subdir" != / ]; then
  # The mount creates a missing subdir (mode 0777, unlike `quota set --create`'s 0755), so the
  # quota is set once it exists, from the background, while the client starts.
  (
    for _ in $(seq 60); do
      juicefs quota set "$JFS_METAURL" --path "$subdir" --capacity "$quota" >/dev/null 2>&1 \
        && exit 0
      sleep 1
    done
    echo "fusecsi: could not set the quota of $subdir" >&2
  ) &
fi
# A dead mount left here by a killed client is detached by juicefs itself before mounting.
exec juicefs mount "$JFS_METAURL" "$mountpoint" --subdir "$subdir" \
  ${FUSECSI_READ_ONLY:+--read-only} "$@"
"""


@dataclass(frozen=True, slots=True)
class JuiceFSConfig:
    image: str
    flags: tuple[str, ...]
    root_path: str


class JuiceFSClient(Client[JuiceFSConfig]):
    name = "juicefs"
    read_only_env = "FUSECSI_READ_ONLY"
    cache_dir = "/var/jfsCache"  # `juicefs mount`'s default --cache-dir for root
    parameters = {
        "root": "name of an allowed root to mount into the client's pod at its own path",
    }

    def __init__(self, roots: Roots) -> None:
        self.roots = roots

    def parse(self, params: Parameters, image: str) -> JuiceFSConfig:
        image = params.text("clientImage", image)
        flags = []
        for option in mount_options(params):
            if option.startswith("-") or option.split("=")[0] in ("subdir", "d", "background"):
                raise InvalidArgument(
                    params.field("mountOptions"),
                    f"{option!r}: give juicefs mount flags without dashes (cache-size=1024); "
                    "subdir and background are fusecsi's",
                )
            flags.append(f"--{option}")
        root_path = ""
        if "root" in params:
            root_path = str(self.roots.path(params["root"], field=params.field("root")))
        return JuiceFSConfig(image, tuple(flags), root_path)

    def check_secrets(self, config: JuiceFSConfig, secrets: Secrets) -> None:
        for key in REQUIRED_SECRETS:
            if not secrets.get(key):
                raise InvalidArgument(
                    f"secrets.{key}", "is required by client: juicefs (nodePublishSecretRef)"
                )
        unknown = sorted(set(secrets) - set(KNOWN_SECRETS))
        if unknown:
            raise InvalidArgument(
                f"secrets.{unknown[0]}",
                f"unknown key for client: juicefs; known: {', '.join(KNOWN_SECRETS)}",
            )
        if secrets.get("storage") and not secrets.get("bucket"):
            raise InvalidArgument("secrets.bucket", "is required when `storage` is given")
        _extra_env(secrets)

    def filesystem_identity(self, config: JuiceFSConfig, secrets: Secrets) -> str:
        return "juicefs:" + hashlib.sha256(secrets.get("metaurl", "").encode()).hexdigest()

    def container(
        self, config: JuiceFSConfig, mount: ClientMount, secrets: Secrets
    ) -> ClientContainer:
        data: dict[str, str] = {}
        env = []
        for key in KNOWN_SECRETS:
            if key != "envs" and secrets.get(key):
                data[key] = secrets[key]
                env.append(secret_env("JFS_" + env_name_for(key, field="secrets"), key))
        for name, value in _extra_env(secrets).items():
            data[f"env.{name}"] = value
            env.append(secret_env(name, f"env.{name}"))
        for key, name in (("access-key", "ACCESS_KEY"), ("secret-key", "SECRET_KEY")):
            if key in data:  # `juicefs format` reads the object storage keys from these
                env.append(secret_env(name, key))
        subdir = "/" + str(mount.subdir).lstrip("./") if str(mount.subdir) != "." else "/"
        quota = -(-mount.capacity_bytes // GIB) if mount.capacity_bytes else 0
        command = [
            "sh",
            "-c",
            SCRIPT,
            "fusecsi-juicefs",
            mount.mountpoint,
            subdir,
            str(quota),
            *config.flags,
        ]
        volumes, mounts = [], []
        if config.root_path:
            volume, volume_mount = host_directory("root", config.root_path)
            volumes.append(volume)
            mounts.append(volume_mount)
        return ClientContainer(
            image=config.image,
            command=command,
            env=env,
            secret_data=data,
            volumes=volumes,
            volume_mounts=mounts,
        )


def _extra_env(secrets: Secrets) -> dict[str, str]:
    raw = secrets.get("envs")
    if not raw:
        return {}
    try:
        values = json.loads(raw)
    except ValueError:
        raise InvalidArgument("secrets.envs", "is not a JSON object") from None
    if not isinstance(values, dict) or not all(isinstance(v, str) for v in values.values()):
        raise InvalidArgument("secrets.envs", "must be a JSON object of strings")
    for name in values:
        env_name_for(name, field="secrets.envs")
        if name != env_name_for(name, field="secrets.envs"):
            raise InvalidArgument("secrets.envs", f"{name!r} is not an upper-case env name")
    return values
