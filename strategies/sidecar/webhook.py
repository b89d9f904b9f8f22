"""The sidecar injector: one AdmissionReview in, one AdmissionReview response out.

`admit` is pure apart from the `Lookup` it is given (PVC, PV and StorageClass by name, as plain
JSON dicts), so that tests replay recorded requests. It never raises and never waits longer than
its lookup budget: whatever it cannot understand or look up is admitted unchanged, with a
warning that says why (the webhook runs with `failurePolicy: Ignore`, and a webhook that fails
or hangs would only make the apiserver do the same, later and without a reason). The one
refusal is a volume that asks for the sidecar strategy with parameters that cannot work: that
pod could never start, and the message names the object and the field to fix.

The patch (RFC 6902, against the pod as submitted) adds, for each sidecar volume not injected
yet, a native sidecar (`initContainers`, `restartPolicy: Always`, before any other init
container), the shared emptyDir once, each allowed root the sidecars read once, and the
`fusecsi.io/sidecar-injected` annotation listing every volume key.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from strategies.errors import InvalidArgument
from strategies.params import Parameters, without_reserved
from strategies.sidecar import contract
from strategies.sidecar.spec import (
    PARAMETERS,
    SidecarSpec,
    parse_sidecar_spec,
    sidecar_container,
    sidecar_image,
    sidecar_volumes,
)
from strategies.volumes import Roots

Obj = dict[str, Any]

STRATEGY = "sidecar"
LOOKUP_TIMEOUT = 2.0
"""Seconds all the lookups of one review may take together (the webhook's timeout is 5 s)."""
CONTROLLER_ONLY = ("pathPattern", "onDelete")
"""StorageClass parameters the controller consumes; they never reach a volume context."""
DEFAULT_API_VERSION = "admission.k8s.io/v1"


class Lookup(Protocol):
    """The objects a review reads, as the apiserver returns them; None when there is none."""

    async def get_pvc(self, namespace: str, name: str) -> Obj | None: ...

    async def get_pv(self, name: str) -> Obj | None: ...

    async def get_storage_class(self, name: str) -> Obj | None: ...


class ReviewSettings(Protocol):
    """The driver settings a review needs (`csi.settings.Settings` has them all)."""

    @property
    def driver_name(self) -> str: ...

    @property
    def default_strategy(self) -> str: ...

    @property
    def roots(self) -> Mapping[str, Path]: ...

    @property
    def sidecar_image(self) -> str: ...

    @property
    def client_images(self) -> Mapping[str, str]: ...


@dataclass(frozen=True, slots=True)
class SidecarVolume:
    """A pod volume the sidecar strategy serves, with its parsed parameters."""

    volume: str
    key: str
    spec: SidecarSpec


@dataclass
class Admission:
    """The answer to one review and what the server logs about it."""

    response: Obj
    pod: str = ""
    injected: tuple[str, ...] = ()
    """Keys of the volumes that got a sidecar in this review."""
    outcome: str = "unchanged"
    """`injected`, `unchanged`, `denied` or `skipped` (not a pod CREATE, or not understood)."""
    warnings: list[str] = field(default_factory=list)


class _Skip(Exception):
    """Admit unchanged, with this warning."""


async def review(admission_review: Any, lookup: Lookup, settings: ReviewSettings) -> Obj:
    """The AdmissionReview response for `admission_review` (see `admit`)."""
    return (await admit(admission_review, lookup, settings)).response


async def admit(
    admission_review: Any,
    lookup: Lookup,
    settings: ReviewSettings,
    *,
    timeout: float = LOOKUP_TIMEOUT,
) -> Admission:
    """Review one AdmissionReview (any JSON value); never raises, waits at most `timeout`
    seconds for lookups."""
    review_dict = admission_review if isinstance(admission_review, dict) else {}
    api_version = review_dict.get("apiVersion")
    if not isinstance(api_version, str) or not api_version.startswith("admission.k8s.io/"):
        api_version = DEFAULT_API_VERSION
    request = review_dict.get("request")
    uid = request.get("uid") if isinstance(request, dict) else None
    admission = Admission(response={})
    try:
        if not isinstance(admission_review, dict):
            raise _Skip(
                f"the body is a JSON {_json_type(admission_review)}, not an AdmissionReview"
            )
        if not isinstance(request, dict):
            raise _Skip("the AdmissionReview has no request")
        if not isinstance(uid, str) or not uid:
            raise _Skip("the AdmissionReview request has no uid")
        await _review_request(request, lookup, settings, timeout, admission)
    except _Skip as skip:
        admission.outcome = "skipped"
        admission.warnings.append(f"fusecsi sidecar injector: {skip}; pod left unchanged")
        admission.response = {"allowed": True}
    except Exception as exc:  # a bug must not block pod creation: admit and say so
        admission.outcome = "skipped"
        admission.warnings.append(
            f"fusecsi sidecar injector: internal error ({type(exc).__name__}: {exc}); "
            "pod left unchanged"
        )
        admission.response = {"allowed": True}
    response: Obj = {"uid": uid if isinstance(uid, str) else "", **admission.response}
    if admission.warnings:
        response["warnings"] = admission.warnings
    admission.response = {
        "apiVersion": api_version,
        "kind": "AdmissionReview",
        "response": response,
    }
    return admission


async def _review_request(
    request: Obj, lookup: Lookup, settings: ReviewSettings, timeout: float, admission: Admission
) -> None:
    kind = request.get("kind")
    resource = request.get("resource")
    kind_name = kind.get("kind") if isinstance(kind, dict) else None
    resource_name = resource.get("resource") if isinstance(resource, dict) else None
    if kind_name != "Pod" or resource_name != "pods" or request.get("subResource"):
        described = _describe_kind(kind, request.get("subResource"))
        raise _Skip(f"mutates pods only, got {described}")
    operation = request.get("operation")
    if operation != "CREATE":
        raise _Skip(f"mutates pods at CREATE only, got {operation!r}")
    pod = request.get("object")
    if not isinstance(pod, dict):
        raise _Skip("request.object is missing or not an object")
    metadata = pod.get("metadata", {})
    spec = pod.get("spec")
    if not isinstance(metadata, dict):
        raise _Skip("request.object.metadata is not an object")
    if not isinstance(spec, dict):
        raise _Skip("request.object.spec is missing or not an object")
    namespace = request.get("namespace") or metadata.get("namespace")
    if not isinstance(namespace, str) or not namespace:
        raise _Skip("the request names no namespace")
    name = metadata.get("name") or request.get("name") or f"{metadata.get('generateName', '')}*"
    admission.pod = f"{namespace}/{name}"
    annotations = metadata.get("annotations", {})
    if not isinstance(annotations, dict):
        raise _Skip("request.object.metadata.annotations is not an object")
    if annotations.get(contract.OPT_OUT_LABEL) == "disabled":
        admission.response = {"allowed": True}
        return
    volumes = _list(spec, "volumes")
    init_containers = _list(spec, "initContainers")
    existing_containers = {
        str(item.get("name")) for item in init_containers if isinstance(item, dict)
    }
    try:
        found = await _sidecar_volumes(
            volumes, namespace, existing_containers, lookup, settings, timeout, admission
        )
    except InvalidArgument as exc:
        admission.outcome = "denied"
        admission.response = {"allowed": False, "status": {"code": 400, "message": str(exc)}}
        return
    if not found:
        admission.response = {"allowed": True}
        return
    for volume in found:
        if not sidecar_image(volume.spec, settings.sidecar_image):
            raise _Skip(
                f"volume {volume.volume}: no image for the sidecar of client: "
                f"{volume.spec.client} (clientImage, or the webhook's client_images)"
            )
    patch = _patch(pod, spec, metadata, annotations, volumes, found, settings)
    admission.outcome = "injected"
    admission.injected = tuple(volume.key for volume in found)
    admission.response = {
        "allowed": True,
        "patchType": "JSONPatch",
        "patch": base64.b64encode(json.dumps(patch).encode()).decode(),
    }


async def _sidecar_volumes(
    volumes: list[Any],
    namespace: str,
    existing_containers: set[str],
    lookup: Lookup,
    settings: ReviewSettings,
    timeout: float,
    admission: Admission,
) -> list[SidecarVolume]:
    """The pod's sidecar volumes that have no sidecar yet, one per key, in pod order."""
    roots = Roots(settings.roots)
    found: list[SidecarVolume] = []
    seen: set[str] = set()
    try:
        async with asyncio.timeout(timeout):  # a tenth of anyio.fail_after's cost, per review
            for volume in volumes:
                if not isinstance(volume, dict) or not isinstance(volume.get("name"), str):
                    admission.warnings.append(
                        "fusecsi sidecar injector: a volume without a name was ignored"
                    )
                    continue
                key, values, where = await _volume_parameters(
                    volume, namespace, existing_containers, seen, lookup, settings, admission
                )
                if values is None:
                    continue
                seen.add(key)
                params = Parameters(values, known=PARAMETERS, where=where)
                spec = parse_sidecar_spec(params, roots, settings.client_images)
                found.append(SidecarVolume(volume["name"], key, spec))
    except TimeoutError:
        raise _Skip(f"the API lookups took longer than {timeout:g}s") from None
    except InvalidArgument:
        raise
    except Exception as exc:
        raise _Skip(f"an API lookup failed ({type(exc).__name__}: {exc})") from None
    return found


async def _volume_parameters(
    volume: Obj,
    namespace: str,
    existing_containers: set[str],
    seen: set[str],
    lookup: Lookup,
    settings: ReviewSettings,
    admission: Admission,
) -> tuple[str, dict[str, str] | None, str]:
    """(key, parameters without `strategy`, where they come from), or None parameters when the
    volume is not a sidecar volume, or already has its sidecar."""
    name: str = volume["name"]
    inline = volume.get("csi")
    if isinstance(inline, dict):
        key = contract.inline_key(name)
        if inline.get("driver") != settings.driver_name or _skip_key(
            key, existing_containers, seen
        ):
            return key, None, ""
        attributes = _strings(inline.get("volumeAttributes"))
        return key, _selected(attributes, settings), f"volume {name} csi.volumeAttributes"
    source = volume.get("persistentVolumeClaim")
    if not isinstance(source, dict):
        return "", None, ""
    claim = source.get("claimName")
    if not isinstance(claim, str) or not claim:
        admission.warnings.append(
            f"fusecsi sidecar injector: volume {name} has no persistentVolumeClaim.claimName"
        )
        return "", None, ""
    key = contract.pvc_key(namespace, claim)
    if _skip_key(key, existing_containers, seen):
        return key, None, ""
    pvc = await lookup.get_pvc(namespace, claim)
    if pvc is None:
        admission.warnings.append(
            f"fusecsi sidecar injector: PersistentVolumeClaim {namespace}/{claim} does not exist "
            "yet; if it is a sidecar volume, recreate the pod once the claim exists"
        )
        return key, None, ""
    pvc_spec = _dict(pvc.get("spec"))
    volume_name = pvc_spec.get("volumeName")
    if isinstance(volume_name, str) and volume_name:
        pv = await lookup.get_pv(volume_name)
        if pv is not None:
            pv_spec = _dict(pv.get("spec"))
            csi_source = pv_spec.get("csi")
            if not isinstance(csi_source, dict) or csi_source.get("driver") != settings.driver_name:
                return key, None, ""
            attributes = _strings(csi_source.get("volumeAttributes"))
            where = f"PersistentVolume {volume_name} volumeAttributes"
            return key, _selected(attributes, settings), where
    class_name = pvc_spec.get("storageClassName")
    if not isinstance(class_name, str) or not class_name:
        return key, None, ""
    storage_class = await lookup.get_storage_class(class_name)
    if storage_class is None or storage_class.get("provisioner") != settings.driver_name:
        return key, None, ""
    parameters = {
        item: value
        for item, value in _strings(storage_class.get("parameters")).items()
        if item not in CONTROLLER_ONLY
    }
    return key, _selected(parameters, settings), f"StorageClass {class_name} parameters"


def _skip_key(key: str, existing_containers: set[str], seen: set[str]) -> bool:
    """Already injected (a reinvocation, or a pod re-submitted from an injected one), or a
    second pod volume of the same claim."""
    return contract.container_name(key) in existing_containers or key in seen


def _selected(values: Mapping[str, str], settings: ReviewSettings) -> dict[str, str] | None:
    """The sidecar parameters (no `strategy`, no keys Kubernetes adds) if the volume selects
    the sidecar strategy, else None."""
    if values.get("strategy", settings.default_strategy) != STRATEGY:
        return None
    return {key: value for key, value in without_reserved(values).items() if key != "strategy"}


def _patch(
    pod: Obj,
    spec: Obj,
    metadata: Obj,
    annotations: Obj,
    volumes: list[Any],
    found: list[SidecarVolume],
    settings: ReviewSettings,
) -> list[Obj]:
    names = {volume.get("name") for volume in volumes if isinstance(volume, dict)}
    new_volumes: list[Obj] = []
    if contract.EMPTYDIR_VOLUME not in names:
        # In memory: the privileged mode's env files hold credentials, never written to disk.
        new_volumes.append({"name": contract.EMPTYDIR_VOLUME, "emptyDir": {"medium": "Memory"}})
        names.add(contract.EMPTYDIR_VOLUME)
    for volume in found:
        for needed in sidecar_volumes(volume.spec, volume.key):
            if needed["name"] not in names:
                new_volumes.append(needed)
                names.add(needed["name"])
    ops: list[Obj] = []
    if new_volumes:
        if isinstance(spec.get("volumes"), list):
            ops += [_add("/spec/volumes/-", item) for item in new_volumes]
        else:  # absent or null: "add" creates (or replaces) the member
            ops.append(_add("/spec/volumes", new_volumes))
    sidecars = [sidecar_container(v.spec, v.key, settings.sidecar_image) for v in found]
    if isinstance(spec.get("initContainers"), list):
        # First, in order: they start before any init container that might read the volume.
        ops += [_add(f"/spec/initContainers/{i}", item) for i, item in enumerate(sidecars)]
    else:
        ops.append(_add("/spec/initContainers", sidecars))
    previous = str(annotations.get(contract.INJECTED_ANNOTATION, ""))
    keys = [key for key in previous.split(",") if key]
    keys += [volume.key for volume in found if volume.key not in keys]
    value = ",".join(keys)
    if "metadata" not in pod:
        ops.append(_add("/metadata", {"annotations": {contract.INJECTED_ANNOTATION: value}}))
    elif "annotations" not in metadata:
        ops.append(_add("/metadata/annotations", {contract.INJECTED_ANNOTATION: value}))
    else:
        ops.append(_add(pointer("metadata", "annotations", contract.INJECTED_ANNOTATION), value))
    return ops


def pointer(*parts: str) -> str:
    """An RFC 6901 JSON pointer to `parts` (`~` and `/` escaped)."""
    return "".join("/" + part.replace("~", "~0").replace("/", "~1") for part in parts)


def _add(path: str, value: Any) -> Obj:
    return {"op": "add", "path": path, "value": value}


def _list(spec: Obj, key: str) -> list[Any]:
    value = spec.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise _Skip(f"request.object.spec.{key} is not a list")
    return value


def _dict(value: Any) -> Obj:
    return value if isinstance(value, dict) else {}


def _strings(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        return {}
    return {str(key): str(item) for key, item in value.items()}


def _json_type(value: Any) -> str:
    names = {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _describe_kind(kind: Any, sub_resource: Any) -> str:
    if not isinstance(kind, dict):
        return "a request without a kind"
    group, version = kind.get("group") or "", kind.get("version") or ""
    text = f"{group + '/' if group else ''}{version} {kind.get('kind')}"
    return f"{text} ({sub_resource} subresource)" if sub_resource else text
