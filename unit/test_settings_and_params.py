"""Settings precedence and errors; parameter parsing; mountinfo parsing. No root needed."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import pytest

from csi.settings import SettingsError, load_settings
from strategies.errors import InvalidArgument
from strategies.params import Parameters, parse_duration, parse_size, without_reserved
from strategies.system.mounts import parse_mount_flags, parse_mountinfo
from strategies.system.paths import check_target, relative_path
from strategies.volumes import split_volume_id, volume_id_for, volume_path_from_pattern


def test_flags_beat_environment_beat_config_file(tmp_path: Path) -> None:
    config = tmp_path / "fusecsi.toml"
    lines = ['driver_name = "from.file"', 'node_id = "file-node"', 'log_level = "DEBUG"']
    config.write_text("\n".join([*lines, "[roots]", 'data = "/srv/data"', ""]))
    settings = load_settings(
        config_file=config,
        environ={"FUSECSI_NODE_ID": "env-node", "FUSECSI_LOG_LEVEL": "warning"},
        flags={"node_id": "flag-node", "roots": ["a=/mnt/a", "b=/mnt/b"]},
    )
    assert settings.driver_name == "from.file"
    assert settings.node_id == "flag-node"
    assert settings.log_level == "WARNING"
    assert settings.roots == {"a": Path("/mnt/a"), "b": Path("/mnt/b")}


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        ({"endpoint": "http://x"}, ("endpoint", "unix://")),
        ({"roots": ["nopath"]}, ("roots", "NAME=VALUE")),
        ({"roots": ["a=relative"]}, ("roots", "absolute")),
        ({"log_format": "xml"}, ("log_format", "text, json")),
        ({"require_mounted_roots": "maybe"}, ("require_mounted_roots", "true or false")),
        ({"shutdown_grace": "soon"}, ("shutdown_grace",)),
    ],
)
def test_bad_settings_name_the_setting(flags: dict[str, object], words: tuple[str, ...]) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(environ={}, flags=flags)
    for word in words:
        assert word in str(caught.value)


def test_unknown_config_keys_are_errors(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('endpiont = "unix:///x"\n')
    with pytest.raises(SettingsError, match="unknown setting 'endpiont'"):
        load_settings(config_file=config, environ={})


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1024", 1024),
        ("10Gi", 10 << 30),
        ("500M", 500_000_000),
        ("1.5Ki", 1536),
        ("2G", 2_000_000_000),
    ],
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text, field="f") == size


@pytest.mark.parametrize("text", ["", "ten", "10Q", "-1", "1 0"])
def test_bad_sizes_name_the_field(text: str) -> None:
    with pytest.raises(InvalidArgument, match=r"volume_context\.capacity: .* is not a size"):
        parse_size(text, field="volume_context.capacity")


def test_durations() -> None:
    assert parse_duration("250ms", field="f") == 0.25
    assert parse_duration("5m", field="f") == 300
    with pytest.raises(InvalidArgument, match="deleteDelay"):
        parse_duration("5 minutes", field="deleteDelay")


def test_parameters_reject_unknown_keys_and_list_known_ones() -> None:
    with pytest.raises(InvalidArgument) as caught:
        Parameters({"rooot": "x"}, known={"root": "", "path": ""}, where="parameters")
    assert caught.value.field == "parameters.rooot"
    assert "path, root" in str(caught.value)


def test_parameters_typed_getters() -> None:
    params = Parameters({"flag": "yes", "mode": "b"}, known={"flag": "", "mode": ""}, where="p")
    assert params.boolean("flag", False) is True
    assert params.choice("mode", ("a", "b"), "a") == "b"
    with pytest.raises(InvalidArgument, match=r"p.mode: 'b' is not one of: a, c"):
        params.choice("mode", ("a", "c"), "a")


def test_reserved_keys_are_dropped() -> None:
    assert without_reserved(
        {
            "csi.storage.k8s.io/pod.name": "p",
            "storage.kubernetes.io/csiProvisionerIdentity": "x",
            "path": "v",
        }
    ) == {"path": "v"}


@pytest.mark.parametrize(
    ("value", "problem"), [("/abs", "absolute"), ("a/../../b", "'..'"), ("a\x00b", "NUL")]
)
def test_relative_paths_stay_below_their_root(value: str, problem: str) -> None:
    with pytest.raises(InvalidArgument, match=problem):
        relative_path(value, field="volume_context.path")
    assert relative_path("a/b", field="f") == PurePosixPath("a/b")


def test_targets_must_be_below_the_allowed_directories() -> None:
    allowed = (Path("/var/lib/kubelet"),)
    assert check_target(Path("/var/lib/kubelet/pods/x/mount"), allowed, field="t") == Path(
        "/var/lib/kubelet/pods/x/mount"
    )
    for bad in ("/etc/x", "/var/lib/kubelet", "/var/lib/kubelet/../x", "relative"):
        with pytest.raises(InvalidArgument, match=r"^t: "):
            check_target(Path(bad), allowed, field="t")


def test_mount_flags() -> None:
    assert parse_mount_flags(("ro", "noexec"), field="f") == 0x1 | 0x8
    with pytest.raises(InvalidArgument, match=r"unsupported mount flag 'vers=4'"):
        parse_mount_flags(("vers=4",), field="volume_capability.mount.mount_flags")


def test_mountinfo_parsing_handles_escapes_and_optional_fields() -> None:
    fields = [
        "36 35 98:0 /vol /mnt/with\\040space rw,noatime master:1 shared:2",
        "-",
        "fuse.fusecsi",
    ]
    line = " ".join([*fields, "fusecsi:default/v rw,user_id=0\n"])
    (entry,) = parse_mountinfo(line)
    assert entry.mount_point == "/mnt/with space"
    assert entry.root == "/vol"
    assert entry.fstype == "fuse.fusecsi" and entry.is_fuse
    assert entry.source == "fusecsi:default/v"
    assert not entry.readonly


def test_volume_ids() -> None:
    assert volume_id_for("default", "pvc-1") == "default/pvc-1"
    long_id = volume_id_for("default", "x" * 200)
    assert len(long_id) <= 128 and long_id.startswith("default/h-")
    assert split_volume_id("default/pvc-1") == ("default", "pvc-1")
    assert split_volume_id("static-handle") is None
    assert split_volume_id("a/b/c") is None


def test_path_patterns() -> None:
    metadata = {"csi.storage.k8s.io/pvc/name": "data", "csi.storage.k8s.io/pvc/namespace": "ns"}
    assert volume_path_from_pattern(
        "${pvc.namespace}-${pvc.name}", metadata, field="f"
    ) == PurePosixPath("ns-data")
    with pytest.raises(InvalidArgument, match="unclosed"):
        volume_path_from_pattern("${pvc.name", metadata, field="f")
