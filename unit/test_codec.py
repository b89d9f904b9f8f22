"""csi.codec against betterproto itself: the same bytes out, the same messages in.

Every message type of the CSI bindings, filled at random (seeded) many times: unset fields,
oneofs, maps, repeated fields, wrappers, enums out of range, negative numbers, unknown
fields, empty nested messages; then truncated and garbled inputs, which must fail (or not)
exactly as betterproto does.
"""

from __future__ import annotations

import inspect
import random
import string
from datetime import UTC, datetime, timedelta
from typing import Any

import betterproto
import pytest

from csi import codec
from protos.csi import v1 as csi

MESSAGES = sorted(
    (
        cls
        for _, cls in inspect.getmembers(csi, inspect.isclass)
        if issubclass(cls, betterproto.Message) and cls is not betterproto.Message
    ),
    key=lambda cls: cls.__name__,
)

INT_RANGES = {
    betterproto.TYPE_INT32: (-(2**31), 2**31 - 1),
    betterproto.TYPE_INT64: (-(2**63), 2**63 - 1),
    betterproto.TYPE_SINT32: (-(2**31), 2**31 - 1),
    betterproto.TYPE_SINT64: (-(2**63), 2**63 - 1),
    betterproto.TYPE_UINT32: (0, 2**32 - 1),
    betterproto.TYPE_UINT64: (0, 2**64 - 1),
    betterproto.TYPE_FIXED32: (0, 2**32 - 1),
    betterproto.TYPE_FIXED64: (0, 2**64 - 1),
    betterproto.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    betterproto.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
}


def state(value: Any) -> Any:
    """A message's raw state (unset fields, oneof and wire flags included), recursively."""
    if isinstance(value, betterproto.Message):
        return (type(value).__name__, {k: state(v) for k, v in vars(value).items()})
    if isinstance(value, list):
        return [state(v) for v in value]
    if isinstance(value, dict):
        return {k: state(v) for k, v in value.items()}
    return (type(value).__name__, value)


def scalar(rng: random.Random, proto_type: str, cls: Any = None) -> Any:
    if proto_type == betterproto.TYPE_STRING:
        return rng.choice(["", "x", "vol-1", "/var/lib/kubelet/pods/ü/t", string.printable])
    if proto_type == betterproto.TYPE_BYTES:
        return rng.choice([b"", b"\x00", bytes(range(40))])
    if proto_type == betterproto.TYPE_BOOL:
        return rng.choice([False, True])
    if proto_type == betterproto.TYPE_ENUM:
        members = list(cls)
        return rng.choice(members) if rng.random() < 0.8 else cls.try_value(rng.randint(0, 99))
    if proto_type in (betterproto.TYPE_DOUBLE, betterproto.TYPE_FLOAT):
        return rng.choice([0.0, 1.5, -2.0])
    low, high = INT_RANGES[proto_type]
    return rng.choice([0, low, high, 1, rng.randint(low, high)])


def fill(rng: random.Random, cls: type[betterproto.Message], depth: int = 0) -> Any:
    meta = cls._betterproto  # type: ignore[attr-defined]
    kwargs: dict[str, Any] = {}
    chosen_groups: dict[str, str] = {}
    for name, fm in meta.meta_by_field_name.items():
        if fm.group:
            chosen_groups.setdefault(
                fm.group,
                rng.choice([f for f, m in meta.meta_by_field_name.items() if m.group == fm.group]),
            )
            if chosen_groups[fm.group] != name or rng.random() < 0.2:
                continue
        elif rng.random() < 0.3:
            continue
        kwargs[name] = value_for(rng, cls, meta, name, fm, depth)
    message = cls(**kwargs)
    if rng.random() < 0.1:  # set after construction, as handlers do
        for name, fm in meta.meta_by_field_name.items():
            repeated = meta.default_gen[name] is list
            if not fm.group and not repeated and fm.proto_type == betterproto.TYPE_STRING:
                setattr(message, name, "late")
                break
    return message


def value_for(rng: random.Random, cls: Any, meta: Any, name: str, fm: Any, depth: int) -> Any:
    gen = meta.default_gen[name]
    field_cls = meta.cls_by_field.get(name)
    if fm.proto_type == betterproto.TYPE_MAP:
        entry_meta = field_cls._betterproto
        key_fm, value_fm = (
            entry_meta.meta_by_field_name["key"],
            entry_meta.meta_by_field_name["value"],
        )
        return {
            scalar(rng, key_fm.proto_type): single(
                rng, field_cls, entry_meta, "value", value_fm, depth
            )
            for _ in range(rng.randint(0, 3))
        }
    if gen is list:
        return [single(rng, cls, meta, name, fm, depth) for _ in range(rng.randint(0, 3))]
    return single(rng, cls, meta, name, fm, depth)


def single(rng: random.Random, cls: Any, meta: Any, name: str, fm: Any, depth: int) -> Any:
    field_cls = meta.cls_by_field.get(name)
    if fm.wraps:
        return rng.choice([None, scalar(rng, fm.wraps, field_cls)])
    if fm.proto_type == betterproto.TYPE_MESSAGE:
        if field_cls is datetime:
            return datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
        if field_cls is timedelta:
            return timedelta(seconds=5)
        if depth > 3 or rng.random() < 0.2:
            return field_cls()  # an empty message, set: it is still sent
        return fill(rng, field_cls, depth + 1)
    return scalar(rng, fm.proto_type, field_cls)


@pytest.mark.parametrize("cls", MESSAGES, ids=lambda cls: cls.__name__)
def test_same_bytes_and_same_messages(cls: type[betterproto.Message]) -> None:
    rng = random.Random(cls.__name__)
    for _ in range(30):
        message = fill(rng, cls)
        wire = bytes(message)
        assert codec.encode(message) == wire
        decoded = codec.decode(cls, wire)
        assert state(decoded) == state(cls.FromString(wire))
        assert codec.encode(decoded) == wire
        unknown = wire + b"\xf8\x3e\x07" + b"\x82\x3f\x02hi"  # fields 999 (varint), 1008 (bytes)
        decoded = codec.decode(cls, unknown)
        assert state(decoded) == state(cls.FromString(unknown))
        assert codec.encode(decoded) == bytes(cls.FromString(unknown))


def test_empty_input_and_empty_message() -> None:
    for cls in MESSAGES:
        assert state(codec.decode(cls, b"")) == state(cls.FromString(b""))
        assert codec.encode(cls()) == bytes(cls())


def test_probe_response_wrapper() -> None:
    for ready in (None, False, True):
        message = csi.ProbeResponse(ready=ready)
        assert codec.encode(message) == bytes(message)
        assert state(codec.decode(csi.ProbeResponse, bytes(message))) == state(
            csi.ProbeResponse.FromString(bytes(message))
        )


def outcome(call: Any) -> Any:
    try:
        return ("ok", state(call()))
    except Exception as exc:  # the same exception type as betterproto's, whatever it is
        return ("error", type(exc))


@pytest.mark.parametrize("cls", [csi.NodePublishVolumeRequest, csi.CreateVolumeRequest])
def test_malformed_input_as_betterproto(cls: type[betterproto.Message]) -> None:
    rng = random.Random(7)
    for _ in range(40):
        wire = bytes(fill(rng, cls))
        variants = [wire[:cut] for cut in range(len(wire))]
        variants += [bytes(b ^ 0xFF if rng.random() < 0.05 else b for b in wire) for _ in range(5)]
        variants += [wire + b"\x0b", b"\x0a\x05ab", b"\x08\x80", b"\x0f"]
        for data in variants:
            assert outcome(lambda d=data: codec.decode(cls, d)) == outcome(
                lambda d=data: cls.FromString(d)
            )


def test_grpclib_codec_checks_the_type() -> None:
    fast = codec.FastProtoCodec()
    assert fast.__content_subtype__ == "proto"
    with pytest.raises(TypeError):
        fast.encode(csi.ProbeRequest(), csi.ProbeResponse)
    assert fast.encode(csi.ProbeResponse(ready=True), csi.ProbeResponse) == b"\n\x02\x08\x01"
    assert fast.decode(b"\n\x02\x08\x01", csi.ProbeResponse).ready is True
