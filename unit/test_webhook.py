"""The sidecar injector on recorded AdmissionReviews, its HTTPS server, and its certificate.

The reviews in `fixtures/admission/` are written as the apiserver sends them (admission.k8s.io/v1,
after the ServiceAccount admission plugin added the token volume); `objects.json` holds the PVCs,
PVs and StorageClasses a lookup answers with. Patches are applied to the submitted pod with a
small RFC 6902 `add` and the resulting pod is checked, not the patch text.
"""

from __future__ import annotations

import base64
import copy
import datetime
import json
import ssl
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest

from csi.settings import Settings
from csi.webhook import (
    CertificateNames,
    ServingTls,
    TlsMaterial,
    ensure_certificate,
    generate_material,
    read_material,
    refresh_certificate,
    secret_manifest,
    serve_webhook,
    sync_ca_bundle,
)
from strategies.kube.cluster import ApiError
from strategies.sidecar import contract
from strategies.sidecar.webhook import admit, pointer, review

pytestmark = pytest.mark.anyio

FIXTURES = Path(__file__).parent / "fixtures" / "admission"
IMAGE = "registry.local/fusecsi:0.1.0"
SETTINGS = Settings(
    driver_name="csi.fusecsi.io",
    default_strategy="hostPath",
    roots={"default": Path("/mnt/jfs"), "archive": Path("/mnt/archive")},
    sidecar_image=IMAGE,
    namespace="fusecsi",
    webhook_address="127.0.0.1:0",
    shutdown_grace=2.0,
)


def fixture(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    return loaded


class RecordedLookup:
    """Answers from `objects.json`; counts calls; can stall or fail."""

    def __init__(self, *, delay: float = 0.0, error: Exception | None = None) -> None:
        objects = fixture("objects.json")
        self.pvcs = {
            (o["metadata"]["namespace"], o["metadata"]["name"]): o
            for o in objects["persistentvolumeclaims"]
        }
        self.pvs = {o["metadata"]["name"]: o for o in objects["persistentvolumes"]}
        self.classes = {o["metadata"]["name"]: o for o in objects["storageclasses"]}
        self.delay = delay
        self.error = error
        self.calls: list[str] = []

    async def _answer(self, what: str, found: dict[str, Any] | None) -> dict[str, Any] | None:
        self.calls.append(what)
        if self.delay:
            await anyio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return copy.deepcopy(found)

    async def get_pvc(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._answer(f"pvc {namespace}/{name}", self.pvcs.get((namespace, name)))

    async def get_pv(self, name: str) -> dict[str, Any] | None:
        return await self._answer(f"pv {name}", self.pvs.get(name))

    async def get_storage_class(self, name: str) -> dict[str, Any] | None:
        return await self._answer(f"storageclass {name}", self.classes.get(name))


# --- a tiny RFC 6902 (add only) ---------------------------------------------------------------


def apply_patch(document: Any, operations: list[dict[str, Any]]) -> Any:
    document = copy.deepcopy(document)
    for operation in operations:
        assert operation["op"] == "add", operation
        parts = [
            part.replace("~1", "/").replace("~0", "~") for part in operation["path"].split("/")[1:]
        ]
        parent = document
        for part in parts[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent[part]
        last, value = parts[-1], copy.deepcopy(operation["value"])
        if isinstance(parent, list):
            index = len(parent) if last == "-" else int(last)
            assert 0 <= index <= len(parent), operation
            parent.insert(index, value)
        else:
            parent[last] = value
    return document


def patch_of(response: dict[str, Any]) -> list[dict[str, Any]]:
    assert response["patchType"] == "JSONPatch"
    operations: list[dict[str, Any]] = json.loads(base64.b64decode(response["patch"]))
    return operations


def patched_pod(admission_review: dict[str, Any], answer: dict[str, Any]) -> dict[str, Any]:
    pod: dict[str, Any] = apply_patch(
        admission_review["request"]["object"], patch_of(answer["response"])
    )
    return pod


def check_envelope(admission_review: Any, answer: dict[str, Any]) -> dict[str, Any]:
    assert answer["apiVersion"] == "admission.k8s.io/v1"
    assert answer["kind"] == "AdmissionReview"
    response: dict[str, Any] = answer["response"]
    request = admission_review.get("request") if isinstance(admission_review, dict) else None
    uid = request.get("uid", "") if isinstance(request, dict) else ""
    assert response["uid"] == uid
    return response


def check_sidecar(container: dict[str, Any], key: str, *, source: str, image: str = IMAGE) -> None:
    assert container["name"] == contract.container_name(key)
    assert container["image"] == image
    assert container["restartPolicy"] == "Always"  # a native sidecar
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] != 0
    assert security["allowPrivilegeEscalation"] is False
    assert security["privileged"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert container["command"] == [
        "fusecsi",
        "sidecar",
        "--socket",
        f"/fusecsi-sidecar/{key}.sock",
        "--source",
        source,
    ]


def volume_names(pod: dict[str, Any]) -> list[str]:
    return [volume["name"] for volume in pod["spec"]["volumes"]]


def no_patch(response: dict[str, Any]) -> None:
    assert response["allowed"] is True
    assert "patch" not in response
    assert "patchType" not in response


# --- injection ---------------------------------------------------------------------------------


async def test_bound_pvcs_get_sidecars_before_existing_init_containers() -> None:
    request = fixture("pod-bound-pvc.json")
    lookup = RecordedLookup()
    answer = await review(request, lookup, SETTINGS)
    response = check_envelope(request, answer)
    assert response["allowed"] is True
    assert "warnings" not in response
    pod = patched_pod(request, answer)

    orders, cache = contract.pvc_key("shop", "orders"), contract.pvc_key("shop", "orders-cache")
    init = pod["spec"]["initContainers"]
    assert [c["name"] for c in init] == [
        contract.container_name(orders),
        contract.container_name(cache),
        "migrate",
    ]
    check_sidecar(init[0], orders, source="/mnt/jfs/shop/orders")
    check_sidecar(init[1], cache, source="/mnt/jfs/shop/orders-cache")
    assert init[1]["securityContext"]["runAsUser"] == 1000
    assert init[1]["securityContext"]["runAsGroup"] == 3000
    names = volume_names(pod)
    assert names.count(contract.EMPTYDIR_VOLUME) == 1
    assert names.count("fusecsi-root-default") == 1  # two volumes, one root
    volumes = {volume["name"]: volume for volume in pod["spec"]["volumes"]}
    assert volumes[contract.EMPTYDIR_VOLUME] == {
        "name": contract.EMPTYDIR_VOLUME,
        "emptyDir": {"medium": "Memory"},  # the privileged mode leaves credentials there
    }
    assert volumes["fusecsi-root-default"]["hostPath"] == {"path": "/mnt/jfs", "type": "Directory"}
    annotations = pod["metadata"]["annotations"]
    assert annotations[contract.INJECTED_ANNOTATION] == f"{orders},{cache}"
    assert annotations["kubectl.kubernetes.io/restartedAt"] == "2025-06-02T09:14:51Z"
    # The app container is untouched; the existing volumes keep their places.
    assert pod["spec"]["containers"] == request["request"]["object"]["spec"]["containers"]
    assert names[:3] == ["orders", "cache", "config"]
    # The annotation key has a `/`: escaped in the JSON pointer.
    paths = [operation["path"] for operation in patch_of(response)]
    assert "/metadata/annotations/fusecsi.io~1sidecar-injected" in paths
    assert sorted(lookup.calls) == [
        "pv pvc-0b7e5c1a-4d2f-4b8e-9f61-3c2a1d0e9f11",
        "pv pvc-1c8f6d2b-5e3a-4c9f-8a72-4d3b2e1f0a22",
        "pvc shop/orders",
        "pvc shop/orders-cache",
    ]


async def test_unbound_pvc_reads_its_storage_class() -> None:
    request = fixture("pod-unbound-pvc.json")
    answer = await review(request, RecordedLookup(), SETTINGS)
    response = check_envelope(request, answer)
    pod = patched_pod(request, answer)
    key = contract.pvc_key("media", "uploads")
    (sidecar,) = pod["spec"]["initContainers"]  # the list did not exist: created
    # The volume's path is not known before binding: the node plugin names it at hand-over.
    check_sidecar(sidecar, key, source="/mnt/jfs")
    assert sidecar["resources"] == {"limits": {"memory": "512Mi"}}
    assert pod["metadata"]["annotations"] == {contract.INJECTED_ANNOTATION: key}
    assert volume_names(pod).count(contract.EMPTYDIR_VOLUME) == 1
    assert "warnings" not in response


async def test_inline_csi_volume() -> None:
    request = fixture("pod-inline-csi.json")
    lookup = RecordedLookup()
    answer = await review(request, lookup, SETTINGS)
    pod = patched_pod(request, answer)
    key = contract.inline_key("scratch")
    (sidecar,) = pod["spec"]["initContainers"]
    check_sidecar(sidecar, key, source="/mnt/archive/analytics/scratch")
    assert sidecar["securityContext"]["runAsUser"] == 1000
    assert sidecar["resources"] == {"limits": {"memory": "256Mi"}, "requests": {"cpu": "50m"}}
    assert {"name": "fusecsi-root-archive", "mountPath": "/mnt/archive"} in sidecar["volumeMounts"]
    assert {"name": f"fusecsi-{key}-scratch", "mountPath": "/tmp"} in sidecar["volumeMounts"]
    assert "fusecsi-root-archive" in volume_names(pod)
    assert pod["metadata"]["annotations"][contract.INJECTED_ANNOTATION] == key
    assert lookup.calls == []  # inline volumes need no lookup


JUICEFS_IMAGE = "registry.local/juicefs:1.4.1"


def juicefs_review(**attributes: str) -> dict[str, Any]:
    request = fixture("pod-inline-csi.json")
    volume = request["request"]["object"]["spec"]["volumes"][0]
    volume["csi"]["volumeAttributes"] = {"strategy": "sidecar", "client": "juicefs", **attributes}
    return request


async def test_a_client_that_cannot_take_an_fd_gets_a_privileged_sidecar() -> None:
    request = juicefs_review(path="team/a", root="archive", mountOptions="cache-size=512")
    settings = replace(SETTINGS, client_images={"juicefs": JUICEFS_IMAGE})
    answer = await review(request, RecordedLookup(), settings)
    response = check_envelope(request, answer)
    assert "warnings" not in response
    pod = patched_pod(request, answer)
    key = contract.inline_key("scratch")
    (sidecar,) = pod["spec"]["initContainers"]
    assert sidecar["name"] == contract.container_name(key)
    assert sidecar["image"] == JUICEFS_IMAGE  # the admin's image for the client
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["securityContext"] == {"privileged": True, "runAsUser": 0, "runAsGroup": 0}
    stage, volume = f"/fusecsi-stage/{key}", f"/fusecsi-sidecar/vol-{key}"
    mounts = {m["mountPath"]: m for m in sidecar["volumeMounts"]}
    # The emptyDir, Bidirectional: the sidecar stacks a bind of its client's mount on
    # vol-<key>, which the node plugin binds onto the target. Not the pod's volume itself: a
    # dead mount there would keep kubelet from restarting the sidecar.
    assert mounts["/fusecsi-sidecar"] == {
        "name": contract.EMPTYDIR_VOLUME,
        "mountPath": "/fusecsi-sidecar",
        "mountPropagation": "Bidirectional",
    }
    volume_name = request["request"]["object"]["spec"]["volumes"][0]["name"]
    assert volume_name not in {m["name"] for m in sidecar["volumeMounts"]}
    assert mounts["/mnt/archive"]["name"] == f"fusecsi-{key}-root"
    # Scratch and JuiceFS's cache in emptyDirs of the pod (billed to it, gone with it).
    assert mounts["/tmp"]["name"] == f"fusecsi-{key}-scratch"
    assert mounts["/var/jfsCache"]["name"] == f"fusecsi-{key}-cache"
    command = sidecar["command"]
    assert command[:2] == ["sh", "-c"]
    assert command[3:7] == ["fusecsi-sidecar", f"/fusecsi-sidecar/{key}.env", stage, volume]
    assert "juicefs mount" in command[9]  # the client layer's script, as in a Mount Pod
    assert command[10:] == ["fusecsi-juicefs", stage, "/team/a", "0", "--cache-size=512"]
    probe = sidecar["startupProbe"]["exec"]["command"]
    assert probe[-1] == volume and "/proc/self/mounts" in probe[2]
    # No credentials and no reference to them: the node plugin hands the environment over.
    assert "env" not in sidecar and "envFrom" not in sidecar
    volumes = {volume["name"]: volume for volume in pod["spec"]["volumes"]}
    assert volumes[f"fusecsi-{key}-root"]["hostPath"]["path"] == "/mnt/archive"
    assert volumes[f"fusecsi-{key}-scratch"]["emptyDir"] == {}
    assert volumes[f"fusecsi-{key}-cache"]["emptyDir"] == {}
    assert volumes[contract.EMPTYDIR_VOLUME]["emptyDir"] == {"medium": "Memory"}
    assert pod["spec"]["containers"] == request["request"]["object"]["spec"]["containers"]


async def test_a_privileged_client_without_an_image_is_left_alone_with_a_warning() -> None:
    request = juicefs_review()
    response = check_envelope(request, await review(request, RecordedLookup(), SETTINGS))
    no_patch(response)
    (warning,) = response["warnings"]
    assert "no image for the sidecar of client: juicefs" in warning
    assert "client_images" in warning


async def test_patched_pod_is_not_patched_again() -> None:
    request = fixture("pod-bound-pvc.json")
    first = await review(request, RecordedLookup(), SETTINGS)
    again = copy.deepcopy(request)
    again["request"]["object"] = patched_pod(request, first)
    lookup = RecordedLookup()
    response = check_envelope(again, await review(again, lookup, SETTINGS))
    no_patch(response)
    assert lookup.calls == []  # the keys are known before any lookup


async def test_recorded_injected_pod_gets_no_patch() -> None:
    request = fixture("pod-injected.json")
    lookup = RecordedLookup()
    response = check_envelope(request, await review(request, lookup, SETTINGS))
    no_patch(response)
    assert "warnings" not in response
    assert lookup.calls == []


async def test_opt_out_annotation() -> None:
    request = fixture("pod-opt-out.json")
    lookup = RecordedLookup()
    response = check_envelope(request, await review(request, lookup, SETTINGS))
    no_patch(response)
    assert lookup.calls == []


async def test_volumes_of_other_drivers_and_strategies_are_untouched() -> None:
    request = fixture("pod-other-volumes.json")
    admission = await admit(request, RecordedLookup(), SETTINGS)
    response = check_envelope(request, admission.response)
    no_patch(response)
    assert "warnings" not in response
    assert admission.outcome == "unchanged"


async def test_default_strategy_applies_to_volumes_without_one() -> None:
    # legacy-archive's PV names no strategy: with default_strategy sidecar it is a sidecar volume.
    request = fixture("pod-other-volumes.json")
    answer = await review(request, RecordedLookup(), replace(SETTINGS, default_strategy="sidecar"))
    pod = patched_pod(request, answer)
    key = contract.pvc_key("finance", "legacy-archive")
    assert [c["name"] for c in pod["spec"]["initContainers"]] == [contract.container_name(key)]
    check_sidecar(pod["spec"]["initContainers"][0], key, source="/mnt/archive/legacy")


async def test_two_pod_volumes_of_one_claim_get_one_sidecar() -> None:
    request = fixture("pod-unbound-pvc.json")
    volumes = request["request"]["object"]["spec"]["volumes"]
    volumes.append({"name": "uploads-again", "persistentVolumeClaim": {"claimName": "uploads"}})
    pod = patched_pod(request, await review(request, RecordedLookup(), SETTINGS))
    assert len(pod["spec"]["initContainers"]) == 1


# --- left alone, with a reason -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "change", "words"),
    [
        ("deployment-create.json", None, "apps/v1 Deployment"),
        ("pod-update.json", None, "'UPDATE'"),
        ("pod-unbound-pvc.json", lambda r: r["request"].pop("object"), "request.object"),
        ("pod-unbound-pvc.json", lambda r: r["request"]["object"].pop("spec"), "spec"),
        (
            "pod-unbound-pvc.json",
            lambda r: r["request"]["object"]["spec"].update(volumes={"uploads": {}}),
            "spec.volumes is not a list",
        ),
        ("pod-unbound-pvc.json", lambda r: r.pop("request"), "no request"),
        ("pod-unbound-pvc.json", lambda r: r["request"].pop("uid"), "no uid"),
        (
            "pod-unbound-pvc.json",
            lambda r: r["request"].update(subResource="ephemeralcontainers"),
            "subresource",
        ),
    ],
)
async def test_not_a_pod_create_is_allowed_unchanged_with_a_warning(
    name: str, change: Any, words: str
) -> None:
    request = fixture(name)
    if change is not None:
        change(request)
    admission = await admit(request, RecordedLookup(), SETTINGS)
    response = check_envelope(request, admission.response)
    no_patch(response)
    (warning,) = response["warnings"]
    assert words in warning
    assert admission.outcome == "skipped"


@pytest.mark.parametrize(
    ("body", "words"), [([], "JSON array"), ("review", "JSON string"), (None, "JSON null")]
)
async def test_a_body_that_is_not_an_object(body: Any, words: str) -> None:
    answer = await review(body, RecordedLookup(), SETTINGS)
    response = check_envelope(body, answer)
    no_patch(response)
    assert words in response["warnings"][0]


async def test_unknown_claim_is_a_warning() -> None:
    request = fixture("pod-unbound-pvc.json")
    request["request"]["object"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] = "x"
    response = check_envelope(request, await review(request, RecordedLookup(), SETTINGS))
    no_patch(response)
    assert "PersistentVolumeClaim media/x does not exist" in response["warnings"][0]


# --- denied: a sidecar volume that cannot work --------------------------------------------------


async def test_bad_storage_class_parameters_deny_the_pod() -> None:
    request = fixture("pod-bad-parameters.json")
    admission = await admit(request, RecordedLookup(), SETTINGS)
    response = check_envelope(request, admission.response)
    assert response["allowed"] is False
    assert "patch" not in response
    assert response["status"]["code"] == 400
    assert response["status"]["message"] == (
        "StorageClass fusecsi-sidecar-as-root parameters.clientUser: the sidecar never runs as root"
    )
    assert admission.outcome == "denied"


@pytest.mark.parametrize(
    ("attributes", "message"),
    [
        ({"clientUser": "nobody"}, "volume scratch csi.volumeAttributes.clientUser: 'nobody'"),
        ({"root": "elsewhere"}, "csi.volumeAttributes.root: unknown root 'elsewhere'"),
        ({"client": "nfs"}, "csi.volumeAttributes.client: 'nfs' is not one of"),
        ({"mountOptions": "ro"}, "csi.volumeAttributes.mountOptions: is a parameter of client"),
        ({"client": "juicefs", "clientUser": "1:1"}, "clientUser: is a parameter of client"),
        ({"client": "command"}, "csi.volumeAttributes.command: is required for client: command"),
        ({"share": "volume"}, "csi.volumeAttributes.share: unknown parameter"),
    ],
)
async def test_bad_inline_attributes_deny_with_the_field(
    attributes: dict[str, str], message: str
) -> None:
    request = fixture("pod-inline-csi.json")
    volume = request["request"]["object"]["spec"]["volumes"][0]
    volume["csi"]["volumeAttributes"] = {"strategy": "sidecar", **attributes}
    response = check_envelope(request, await review(request, RecordedLookup(), SETTINGS))
    assert response["allowed"] is False
    assert response["status"]["code"] == 400
    assert message in response["status"]["message"]


# --- lookups that stall or fail ---------------------------------------------------------------


async def test_lookup_timeout_allows_with_a_warning() -> None:
    request = fixture("pod-bound-pvc.json")
    with anyio.fail_after(5):
        admission = await admit(request, RecordedLookup(delay=30), SETTINGS, timeout=0.2)
    response = check_envelope(request, admission.response)
    no_patch(response)
    assert "longer than 0.2s" in response["warnings"][0]


async def test_api_error_allows_with_a_warning() -> None:
    request = fixture("pod-unbound-pvc.json")
    error = ApiError(403, "Forbidden", "persistentvolumeclaims is forbidden")
    response = check_envelope(request, await review(request, RecordedLookup(error=error), SETTINGS))
    no_patch(response)
    assert "403 Forbidden" in response["warnings"][0]


def test_pointer_escapes() -> None:
    assert pointer("metadata", "annotations", "a/b~c") == "/metadata/annotations/a~1b~0c"


# --- the certificate ---------------------------------------------------------------------------

NAMES = CertificateNames(
    "fusecsi",
    "fusecsi-sidecar-injector",
    "fusecsi-sidecar-injector-tls",
    "fusecsi-sidecar-injector",
)
NOW = datetime.datetime(2025, 6, 1, tzinfo=datetime.UTC)


class FakeSecretStore:
    """The apiserver as far as the certificate goes: Secrets with resourceVersions, create
    that answers AlreadyExists, update that answers Conflict, one webhook configuration."""

    def __init__(self) -> None:
        self.secrets: dict[str, dict[str, Any]] = {}
        self.version = 100
        self.writes: list[str] = []
        self.before_create: Any = None
        self.configuration: dict[str, Any] = {
            "metadata": {"name": NAMES.webhook_configuration, "resourceVersion": "7"},
            "webhooks": [
                {"name": "sidecar.fusecsi.io", "clientConfig": {"service": {"name": "x"}}},
                {"name": "sidecar-b.fusecsi.io", "clientConfig": {"caBundle": "b2xk"}},
            ],
        }

    def _stamp(self, manifest: dict[str, Any]) -> dict[str, Any]:
        self.version += 1
        stored = copy.deepcopy(manifest)
        stored["metadata"]["resourceVersion"] = str(self.version)
        return stored

    async def get_secret(self, name: str) -> dict[str, Any] | None:
        return copy.deepcopy(self.secrets.get(name))

    async def create_secret(self, manifest: dict[str, Any]) -> dict[str, Any]:
        if self.before_create is not None:
            self.before_create()
        name = manifest["metadata"]["name"]
        if name in self.secrets:
            raise ApiError(409, "AlreadyExists", f'secrets "{name}" already exists')
        self.writes.append("create")
        self.secrets[name] = self._stamp(manifest)
        return copy.deepcopy(self.secrets[name])

    async def replace_secret(self, name: str, manifest: dict[str, Any]) -> dict[str, Any]:
        current = self.secrets[name]
        wanted = manifest["metadata"].get("resourceVersion")
        if wanted and wanted != current["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", "the object has been modified")
        self.writes.append("replace")
        self.secrets[name] = self._stamp(manifest)
        return copy.deepcopy(self.secrets[name])

    async def get_webhook_configuration(self, name: str) -> dict[str, Any] | None:
        return copy.deepcopy(self.configuration)

    async def patch_webhook_configuration(self, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        if (
            patch["metadata"]["resourceVersion"]
            != self.configuration["metadata"]["resourceVersion"]
        ):
            raise ApiError(409, "Conflict", "the object has been modified")
        self.writes.append("patch")
        self.configuration.update(webhooks=patch["webhooks"])
        self.configuration["metadata"]["resourceVersion"] += "1"
        return copy.deepcopy(self.configuration)

    def bundles(self) -> list[str]:
        return [hook["clientConfig"].get("caBundle", "") for hook in self.configuration["webhooks"]]


def ca_subjects(material: TlsMaterial) -> list[str]:
    from cryptography import x509

    return [ca.subject.rfc4514_string() for ca in x509.load_pem_x509_certificates(material.ca_pem)]


async def test_missing_secret_is_created_and_ca_bundle_set(tmp_path: Path) -> None:
    store = FakeSecretStore()
    tls = ServingTls(tmp_path / "tls")
    await refresh_certificate(store, tls, NAMES, NOW)
    assert store.writes == ["create", "patch"]
    material = read_material(store.secrets[NAMES.secret])
    assert material is not None
    assert material.problem(NAMES, NOW) == ""
    assert material.not_after == NOW + datetime.timedelta(days=365)
    assert store.bundles() == [base64.b64encode(material.ca_pem).decode()] * 2
    assert store.configuration["webhooks"][0]["clientConfig"]["service"] == {"name": "x"}
    assert tls.loaded == material.cert_pem
    assert (tmp_path / "tls" / "tls.key").stat().st_mode & 0o777 == 0o600
    # A second check changes nothing.
    await refresh_certificate(store, tls, NAMES, NOW + datetime.timedelta(days=300))
    assert store.writes == ["create", "patch"]


async def test_expiring_certificate_is_rotated_and_reloaded(tmp_path: Path) -> None:
    store = FakeSecretStore()
    tls = ServingTls(tmp_path)
    await refresh_certificate(store, tls, NAMES, NOW)
    old = read_material(store.secrets[NAMES.secret])
    assert old is not None
    later = NOW + datetime.timedelta(days=340)  # 25 days left
    assert old.problem(NAMES, later).startswith("expires")
    await refresh_certificate(store, tls, NAMES, later)
    assert store.writes == ["create", "patch", "replace", "patch"]
    new = read_material(store.secrets[NAMES.secret])
    assert new is not None
    assert new.cert_pem != old.cert_pem
    assert new.not_after == later + datetime.timedelta(days=365)
    assert tls.loaded == new.cert_pem
    # The previous CA stays trusted beside the new one (replicas reload within 12 hours).
    assert ca_subjects(new) == [ca_subjects(new)[0], ca_subjects(old)[0]]
    assert store.bundles() == [base64.b64encode(new.ca_pem).decode()] * 2
    # A year on, the expired previous CA is dropped from the bundle.
    await refresh_certificate(store, tls, NAMES, later + datetime.timedelta(days=340))
    newest = read_material(store.secrets[NAMES.secret])
    assert newest is not None
    assert len(ca_subjects(newest)) == 2
    assert ca_subjects(old)[0] not in ca_subjects(newest)


async def test_unusable_secret_is_replaced() -> None:
    store = FakeSecretStore()
    material = generate_material(NAMES, now=NOW)
    other = generate_material(NAMES, now=NOW)
    mixed = TlsMaterial(material.cert_pem, other.key_pem, material.ca_pem)
    store.secrets[NAMES.secret] = store._stamp(secret_manifest(NAMES, mixed))
    result = await ensure_certificate(store, NAMES, now=NOW)
    assert store.writes == ["replace"]
    assert result.problem(NAMES, NOW) == ""
    wrong_service = replace(NAMES, service="other")
    assert "not issued for" in result.problem(wrong_service, NOW)


async def test_replicas_racing_to_create_use_the_winner() -> None:
    store = FakeSecretStore()
    winner = generate_material(NAMES, now=NOW)

    def other_replica_first() -> None:
        store.before_create = None
        store.secrets[NAMES.secret] = store._stamp(secret_manifest(NAMES, winner))

    store.before_create = other_replica_first
    result = await ensure_certificate(store, NAMES, now=NOW)
    assert result.cert_pem == winner.cert_pem
    assert store.writes == []


async def test_replicas_racing_to_rotate_use_the_winner() -> None:
    store = FakeSecretStore()
    old = generate_material(NAMES, now=NOW - datetime.timedelta(days=350))
    store.secrets[NAMES.secret] = store._stamp(secret_manifest(NAMES, old))
    winner = generate_material(NAMES, now=NOW)
    real_replace = store.replace_secret

    async def other_replica_first(name: str, manifest: dict[str, Any]) -> dict[str, Any]:
        store.secrets[name] = store._stamp(secret_manifest(NAMES, winner))
        return await real_replace(name, manifest)

    store.replace_secret = other_replica_first  # type: ignore[method-assign]
    result = await ensure_certificate(store, NAMES, now=NOW)
    assert result.cert_pem == winner.cert_pem


async def test_ca_bundle_patch_retries_on_conflict() -> None:
    store = FakeSecretStore()
    await ensure_certificate(store, NAMES, now=NOW)
    real_patch = store.patch_webhook_configuration
    conflicts = [1]

    async def someone_else_first(name: str, patch: dict[str, Any]) -> dict[str, Any]:
        if conflicts:
            conflicts.pop()
            store.configuration["metadata"]["resourceVersion"] = "8"
        return await real_patch(name, patch)

    store.patch_webhook_configuration = someone_else_first  # type: ignore[method-assign]
    assert await sync_ca_bundle(store, NAMES) is True
    assert store.writes == ["create", "patch"]
    assert await sync_ca_bundle(store, NAMES) is False


# --- the HTTPS server --------------------------------------------------------------------------


def client_context(material: TlsMaterial) -> ssl.SSLContext:
    return ssl.create_default_context(cadata=material.ca_pem.decode())


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[tuple[str, ServingTls, TlsMaterial]]:
    material = generate_material(NAMES, now=datetime.datetime.now(datetime.UTC))
    tls = ServingTls(tmp_path / "tls")
    tls.load(material)
    async with anyio.create_task_group() as tasks:
        host, port = await tasks.start(serve_webhook, SETTINGS, RecordedLookup(), tls.context)
        yield f"https://{host}:{port}", tls, material
        tasks.cancel_scope.cancel()


async def test_https_server_answers_a_review(
    server: tuple[str, ServingTls, TlsMaterial],
) -> None:
    url, _, material = server
    request = fixture("pod-inline-csi.json")
    with anyio.fail_after(10):
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"{url}/mutate",
                json=request,
                ssl=client_context(material),
                server_hostname=NAMES.dns_names[2],
            ) as answer:
                assert answer.status == 200
                body = await answer.json()
            async with session.get(
                f"{url}/healthz", ssl=client_context(material), server_hostname=NAMES.dns_names[2]
            ) as health:
                assert health.status == 200
                assert await health.text() == "ok"
            async with session.post(
                f"{url}/mutate",
                data=b"{not json",
                ssl=client_context(material),
                server_hostname=NAMES.dns_names[2],
            ) as broken:
                assert broken.status == 400
    pod = patched_pod(request, body)
    check_sidecar(
        pod["spec"]["initContainers"][0],
        contract.inline_key("scratch"),
        source="/mnt/archive/analytics/scratch",
    )


async def test_rotated_certificate_is_served_without_restart(
    server: tuple[str, ServingTls, TlsMaterial],
) -> None:
    url, tls, old = server
    new = generate_material(NAMES, now=datetime.datetime.now(datetime.UTC))
    assert tls.load(new) is True
    assert tls.load(new) is False
    with anyio.fail_after(10):
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
            async with s.get(
                f"{url}/healthz", ssl=client_context(new), server_hostname=NAMES.dns_names[2]
            ) as health:
                assert health.status == 200
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await s.get(
                    f"{url}/healthz", ssl=client_context(old), server_hostname=NAMES.dns_names[2]
                )
