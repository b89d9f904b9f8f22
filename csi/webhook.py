"""`fusecsi webhook`: the sidecar injector's HTTPS server and the certificate it serves with.

POST /mutate answers AdmissionReviews with `strategies.sidecar.webhook.admit`, reading PVCs, PVs
and StorageClasses from watches (`WatchedLookup`: no API request per review), with live GETs
for what the watches have not seen yet, through a `CachedLookup` (one request per object for a
burst of pods, answers reused for `webhook_lookup_cache` seconds), and logs one line per review; GET
/healthz says the server is up. The certificate lives in the Secret `<webhook_config_name>-tls`
of the webhook's namespace: a self-signed CA and a serving certificate for
`<webhook_config_name>.<namespace>.svc`, made here when the Secret is missing, or its certificate
is unusable or expires within 30 days (every replica checks at start and every 12 hours). The CA
bundle goes into the `caBundle` of every webhook of the MutatingWebhookConfiguration
`<webhook_config_name>`; a rotated certificate is loaded into the running SSL context, so new
connections use it without a restart. See docs/strategies/sidecar.md.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import os
import signal
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import anyio
from aiohttp import web
from anyio.abc import TaskStatus
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from loguru import logger

from csi.settings import Settings
from strategies.kube.cluster import ApiError, KubeCluster, Obj
from strategies.kube.objects import KubeObjects, WatchedLookup, first_container_image
from strategies.sidecar.webhook import Admission, Lookup, admit

VALIDITY = datetime.timedelta(days=365)
RENEW_BEFORE = datetime.timedelta(days=30)
CHECK_INTERVAL = 12 * 3600.0
RETRY_INTERVAL = 300.0
"""After a failed check (API unreachable), the next one comes this much sooner."""
MAX_BODY = 8 * 1024 * 1024
"""Bytes of one AdmissionReview; the apiserver's own request limit is 3 MiB."""
PATCH_ATTEMPTS = 5

Clock = Callable[[], datetime.datetime]


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


# --- the certificate -------------------------------------------------------------------------


@dataclass(frozen=True)
class CertificateNames:
    """Where the certificate lives and what it is for."""

    namespace: str
    service: str
    secret: str
    webhook_configuration: str

    @classmethod
    def from_settings(cls, settings: Settings) -> CertificateNames:
        name = settings.webhook_config_name
        return cls(settings.namespace, name, f"{name}-tls", name)

    @property
    def dns_names(self) -> list[str]:
        base = f"{self.service}.{self.namespace}.svc"
        return [self.service, f"{self.service}.{self.namespace}", base, f"{base}.cluster.local"]


@dataclass(frozen=True)
class TlsMaterial:
    """PEM: the serving certificate and key, and the CA bundle the apiserver must trust (the
    current CA first, then the previous one while it is valid, so replicas that still serve
    the previous certificate keep working until they reload)."""

    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)

    @property
    def not_after(self) -> datetime.datetime:
        return self.certificate.not_valid_after_utc

    def problem(self, names: CertificateNames, now: datetime.datetime) -> str:
        """Why this material must be replaced; "" when it is good to serve."""
        try:
            cert = self.certificate
            cas = x509.load_pem_x509_certificates(self.ca_pem)
            key = serialization.load_pem_private_key(self.key_pem, password=None)
            cert.verify_directly_issued_by(cas[0])
        except (ValueError, TypeError, IndexError) as exc:
            return f"unusable ({type(exc).__name__}: {exc})"
        if not _same_public_key(cert, key):
            return "the key does not match the certificate"
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return "no subjectAltName"
        if names.dns_names[2] not in san.get_values_for_type(x509.DNSName):
            return f"not issued for {names.dns_names[2]}"
        if cert.not_valid_after_utc - now < RENEW_BEFORE:
            return f"expires {cert.not_valid_after_utc:%Y-%m-%d}"
        return ""


def _same_public_key(cert: x509.Certificate, key: Any) -> bool:
    def raw(public: Any) -> bytes:
        data: bytes = public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return data

    return raw(cert.public_key()) == raw(key.public_key())


def generate_material(
    names: CertificateNames, *, now: datetime.datetime, previous_ca: bytes = b""
) -> TlsMaterial:
    """A new CA and a serving certificate it signs (ECDSA P-256, valid VALIDITY); the current
    CA of `previous_ca` stays in the bundle while it is valid."""
    start, end = now - datetime.timedelta(minutes=5), now + VALIDITY
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, f"{names.service} CA {now:%Y%m%dT%H%M%S}")]
    )
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names.dns_names[2])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(name) for name in names.dns_names]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    bundle = ca.public_bytes(serialization.Encoding.PEM)
    bundle += _still_valid_current_ca(previous_ca, now)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return TlsMaterial(cert.public_bytes(serialization.Encoding.PEM), key_pem, bundle)


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _still_valid_current_ca(bundle: bytes, now: datetime.datetime) -> bytes:
    try:
        current = x509.load_pem_x509_certificates(bundle)[0]
    except (ValueError, IndexError):
        return b""
    if current.not_valid_after_utc <= now:
        return b""
    return current.public_bytes(serialization.Encoding.PEM)


def read_material(secret: Obj | None) -> TlsMaterial | None:
    """The material in a Secret; None when a key is missing or not base64."""
    data = (secret or {}).get("data") or {}
    try:
        return TlsMaterial(
            base64.b64decode(data["tls.crt"], validate=True),
            base64.b64decode(data["tls.key"], validate=True),
            base64.b64decode(data["ca.crt"], validate=True),
        )
    except (KeyError, TypeError, ValueError):
        return None


def secret_manifest(
    names: CertificateNames, material: TlsMaterial, *, resource_version: str | None = None
) -> Obj:
    metadata: Obj = {
        "name": names.secret,
        "namespace": names.namespace,
        "labels": {"app.kubernetes.io/name": "fusecsi", "app.kubernetes.io/component": "webhook"},
    }
    if resource_version:
        metadata["resourceVersion"] = resource_version

    def encode(data: bytes) -> str:
        return base64.b64encode(data).decode()

    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata,
        "type": "kubernetes.io/tls",
        "data": {
            "tls.crt": encode(material.cert_pem),
            "tls.key": encode(material.key_pem),
            "ca.crt": encode(material.ca_pem),
        },
    }


class CertificateStore(Protocol):
    """The API calls the certificate needs (`strategies.kube.objects.KubeObjects` has them)."""

    async def get_secret(self, name: str) -> Obj | None: ...

    async def create_secret(self, manifest: Obj) -> Obj: ...

    async def replace_secret(self, name: str, manifest: Obj) -> Obj: ...

    async def get_webhook_configuration(self, name: str) -> Obj | None: ...

    async def patch_webhook_configuration(self, name: str, patch: Obj) -> Obj: ...


async def ensure_certificate(
    store: CertificateStore, names: CertificateNames, *, now: datetime.datetime
) -> TlsMaterial:
    """The material to serve with: the Secret's, or new material written to the Secret.

    Replicas may race: the Secret is created with create (AlreadyExists: another replica won,
    read its Secret) and replaced with its resourceVersion (Conflict: another replica rotated
    first, read its Secret)."""
    secret = await store.get_secret(names.secret)
    if secret is None:
        material = generate_material(names, now=now)
        try:
            await store.create_secret(secret_manifest(names, material))
        except ApiError as exc:
            if not exc.already_exists:
                raise
            return await _read_back(store, names, now, "created by another replica")
        logger.info("webhook certificate: created Secret {}/{}", names.namespace, names.secret)
        return material
    current = read_material(secret)
    problem = current.problem(names, now) if current is not None else "incomplete"
    if current is not None and not problem:
        return current
    material = generate_material(names, now=now, previous_ca=current.ca_pem if current else b"")
    version = str((secret.get("metadata") or {}).get("resourceVersion") or "")
    try:
        await store.replace_secret(
            names.secret, secret_manifest(names, material, resource_version=version)
        )
    except ApiError as exc:
        if not exc.conflict:
            raise
        return await _read_back(store, names, now, "rotated by another replica")
    logger.info(
        "webhook certificate: rotated Secret {}/{} (was {}); new one valid until {:%Y-%m-%d}",
        names.namespace,
        names.secret,
        problem,
        material.not_after,
    )
    return material


async def _read_back(
    store: CertificateStore, names: CertificateNames, now: datetime.datetime, what: str
) -> TlsMaterial:
    material = read_material(await store.get_secret(names.secret))
    problem = material.problem(names, now) if material else "missing or incomplete"
    if material is None or problem:
        raise RuntimeError(f"Secret {names.namespace}/{names.secret} {what} is {problem}")
    return material


async def sync_ca_bundle(store: CertificateStore, names: CertificateNames) -> bool:
    """Set the Secret's CA bundle as `caBundle` of every webhook of the configuration; True
    when it patched. The Secret is read after the configuration and the patch carries the
    configuration's resourceVersion, so a replica holding an older Secret can never undo a
    newer bundle."""
    for _ in range(PATCH_ATTEMPTS):
        configuration = await store.get_webhook_configuration(names.webhook_configuration)
        if configuration is None:
            raise RuntimeError(
                f"MutatingWebhookConfiguration {names.webhook_configuration} does not exist"
            )
        material = read_material(await store.get_secret(names.secret))
        if material is None:
            raise RuntimeError(f"Secret {names.namespace}/{names.secret} is incomplete")
        bundle = base64.b64encode(material.ca_pem).decode()
        webhooks = list(configuration.get("webhooks") or [])
        if all((hook.get("clientConfig") or {}).get("caBundle") == bundle for hook in webhooks):
            return False
        for hook in webhooks:
            hook["clientConfig"] = {**(hook.get("clientConfig") or {}), "caBundle": bundle}
        version = (configuration.get("metadata") or {}).get("resourceVersion")
        patch = {"metadata": {"resourceVersion": version}, "webhooks": webhooks}
        try:
            await store.patch_webhook_configuration(names.webhook_configuration, patch)
        except ApiError as exc:
            if exc.conflict:
                continue
            raise
        logger.info(
            "webhook certificate: caBundle of {} webhook(s) in {} updated",
            len(webhooks),
            names.webhook_configuration,
        )
        return True
    raise RuntimeError(
        f"MutatingWebhookConfiguration {names.webhook_configuration} kept changing "
        f"({PATCH_ATTEMPTS} conflicts)"
    )


class ServingTls:
    """The server's SSL context; `load` swaps its certificate in place (new connections use the
    new one). The key is written to `cert_dir` (0600, in a 0700 directory) because OpenSSL
    loads certificates from files; the default directory is on tmpfs."""

    def __init__(self, cert_dir: Path) -> None:
        self.cert_dir = cert_dir
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.loaded: bytes = b""

    def load(self, material: TlsMaterial) -> bool:
        """Serve `material` from now on; False when it is what is served already."""
        if material.cert_pem == self.loaded:
            return False
        self.cert_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        cert, key = self.cert_dir / "tls.crt", self.cert_dir / "tls.key"
        _write_private(cert, material.cert_pem)
        _write_private(key, material.key_pem)
        self.context.load_cert_chain(cert, key)
        self.loaded = material.cert_pem
        return True


def _write_private(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(temporary, path)


async def refresh_certificate(
    store: CertificateStore, tls: ServingTls, names: CertificateNames, now: datetime.datetime
) -> None:
    """One check: ensure the Secret, the caBundle, and the certificate being served."""
    material = await ensure_certificate(store, names, now=now)
    await sync_ca_bundle(store, names)
    if tls.load(material):
        logger.info("webhook certificate: serving one valid until {:%Y-%m-%d}", material.not_after)


async def keep_certificate(
    store: CertificateStore,
    tls: ServingTls,
    names: CertificateNames,
    *,
    clock: Clock = utcnow,
    interval: float = CHECK_INTERVAL,
) -> None:
    """`refresh_certificate` every `interval` seconds (sooner again after a failure)."""
    while True:
        try:
            await refresh_certificate(store, tls, names, clock())
            delay = interval
        except Exception as exc:
            logger.warning("webhook certificate check failed, retrying: {}", exc)
            delay = min(interval, RETRY_INTERVAL)
        await anyio.sleep(delay)


# --- the server ------------------------------------------------------------------------------


def parse_address(address: str) -> tuple[str, int]:
    """HOST:PORT ([v6]:PORT for IPv6) -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"webhook_address {address!r} is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


class CachedLookup:
    """A `Lookup` that reuses what it read for `ttl` seconds, and sends one API request for all
    the reviews that ask for the same object at the same time (a Deployment scaled up creates
    its pods in a burst, all naming the same claims).

    It keeps only answers that cannot change while the object exists: a PersistentVolume (its
    `spec.csi` is immutable), a StorageClass (provisioner and parameters are immutable) and a
    PVC bound to a volume (`volumeName` and `storageClassName` no longer change). "Not found"
    and an unbound PVC are never kept: the claim may appear or bind at any moment. What `ttl`
    bounds is an object deleted and recreated under the same name with other parameters. The
    answers are shared between reviews, which only read them."""

    def __init__(
        self, lookup: Lookup, ttl: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.lookup = lookup
        self.ttl = ttl
        self.clock = clock
        self.kept: dict[tuple[str, ...], tuple[float, Obj]] = {}
        """key -> (expiry, answer)"""
        self.asking: dict[tuple[str, ...], asyncio.Future[Obj | None]] = {}
        self.requests = 0
        """API requests sent, for tests and benchmarks."""
        self._next_prune = 0.0

    async def get_pvc(self, namespace: str, name: str) -> Obj | None:
        return await self._get(
            ("pvc", namespace, name), lambda: self.lookup.get_pvc(namespace, name), _bound
        )

    async def get_pv(self, name: str) -> Obj | None:
        return await self._get(("pv", name), lambda: self.lookup.get_pv(name), _found)

    async def get_storage_class(self, name: str) -> Obj | None:
        return await self._get(
            ("storageclass", name), lambda: self.lookup.get_storage_class(name), _found
        )

    async def _get(
        self,
        key: tuple[str, ...],
        ask: Callable[[], Awaitable[Obj | None]],
        keep: Callable[[Obj | None], bool],
    ) -> Obj | None:
        now = self.clock()
        kept = self.kept.get(key)
        if kept is not None and kept[0] > now:
            return kept[1]
        asking = self.asking.get(key)
        if asking is None:
            self.requests += 1
            asking = asyncio.ensure_future(ask())
            self.asking[key] = asking
            asking.add_done_callback(lambda done: self._answered(key, done, keep, now))
        # Shielded: a review that gives up (its lookup budget) leaves the request to the others.
        return await asyncio.shield(asking)

    def _answered(
        self,
        key: tuple[str, ...],
        done: asyncio.Future[Obj | None],
        keep: Callable[[Obj | None], bool],
        asked: float,
    ) -> None:
        del self.asking[key]
        if done.cancelled() or done.exception() is not None:  # the waiters see the error
            return
        answer = done.result()
        if answer is None or not keep(answer):
            self.kept.pop(key, None)
            return
        now = self.clock()
        if now >= self._next_prune:
            self.kept = {k: v for k, v in self.kept.items() if v[0] > now}
            self._next_prune = now + self.ttl
        self.kept[key] = (asked + self.ttl, answer)  # from when it was asked: never older


def _found(answer: Obj | None) -> bool:
    return answer is not None


def _bound(pvc: Obj | None) -> bool:
    spec = (pvc or {}).get("spec")
    return (
        isinstance(spec, dict)
        and isinstance(spec.get("volumeName"), str)
        and bool(spec["volumeName"])
    )


def log_admission(admission: Admission, took: float) -> None:
    """One line per review: INFO, or WARNING when the review carries warnings (they are in the
    line, as is a denial's reason). Reviews carry no secrets: a pod spec names Secrets, and
    volume parameters are not secret."""
    response = admission.response["response"]
    details = ""
    if admission.outcome == "denied":
        details += f": {(response.get('status') or {}).get('message', '')}"
    if admission.warnings:
        details += f" (warnings: {'; '.join(admission.warnings)})"
    logger.bind(pod=admission.pod, outcome=admission.outcome).log(
        "WARNING" if admission.warnings else "INFO",
        "admission {} {}: {}{} in {:.1f} ms{}",
        response.get("uid") or "-",
        admission.pod or "-",
        admission.outcome,
        f" {','.join(admission.injected)}" if admission.injected else "",
        took * 1000,
        details,
    )


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def build_app(lookup: Lookup, settings: Settings) -> web.Application:
    """The webhook's routes; lookups go through a `CachedLookup` unless
    `settings.webhook_lookup_cache` is 0."""
    app = web.Application(client_max_size=MAX_BODY)
    if settings.webhook_lookup_cache > 0:
        lookup = CachedLookup(lookup, settings.webhook_lookup_cache)

    async def mutate(request: web.Request) -> web.Response:
        started = time.perf_counter()
        try:
            body = json.loads(await request.read())
        except ValueError:  # UnicodeDecodeError too
            return web.json_response({"message": "the body is not JSON"}, status=400)
        admission = await admit(body, lookup, settings)
        log_admission(admission, time.perf_counter() - started)
        return web.Response(body=_dumps(admission.response), content_type="application/json")

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app.router.add_post("/mutate", mutate)
    app.router.add_get("/healthz", healthz)
    return app


async def serve_webhook(
    settings: Settings,
    lookup: Lookup,
    context: ssl.SSLContext,
    *,
    task_status: TaskStatus[tuple[str, int]] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; `task_status` gets the bound (host, port)."""
    host, port = parse_address(settings.webhook_address)
    runner = web.AppRunner(
        build_app(lookup, settings), access_log=None, shutdown_timeout=settings.shutdown_grace
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, ssl_context=context, backlog=1024)
        await site.start()
        bound = runner.addresses[0]
        logger.info("webhook serving https://{}:{}/mutate", bound[0], bound[1])
        task_status.started((str(bound[0]), int(bound[1])))
        await anyio.sleep_forever()
    finally:
        with anyio.move_on_after(settings.shutdown_grace + 1, shield=True):
            await runner.cleanup()


async def resolve_sidecar_image(settings: Settings, objects: KubeObjects) -> Settings:
    """Settings with `sidecar_image` set: as given, or the image of this pod's first container."""
    if settings.sidecar_image:
        return settings
    if not settings.pod_name:
        raise RuntimeError("set sidecar_image, or pod_name so that the webhook can read its image")
    pod = await objects.get_own_pod(settings.pod_name)
    image = first_container_image(pod)
    if not image:
        raise RuntimeError(
            f"pod {settings.namespace}/{settings.pod_name} not found or without an image; "
            "set sidecar_image"
        )
    logger.info("sidecar image: {} (the webhook's own)", image)
    return replace(settings, sidecar_image=image)


async def run_webhook(settings: Settings) -> None:
    """`fusecsi webhook`: certificate, then the server, until SIGTERM/SIGINT."""
    parse_address(settings.webhook_address)
    kubeconfig = Path(settings.kubeconfig) if settings.kubeconfig else None
    cluster = await KubeCluster.connect(namespace=settings.namespace, kubeconfig=kubeconfig)
    try:
        objects = KubeObjects(cluster)
        settings = await resolve_sidecar_image(settings, objects)
        names = CertificateNames.from_settings(settings)
        tls = ServingTls(settings.webhook_cert_dir)
        await refresh_certificate(objects, tls, names, utcnow())
        lookup = WatchedLookup(cluster, objects)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(_stop_on_signal, tasks.cancel_scope, name="signals")
            tasks.start_soon(lookup.run, name="watches")
            await tasks.start(serve_webhook, settings, lookup, tls.context, name="https")
            tasks.start_soon(_keep_later, objects, tls, names, name="certificate")
            logger.info("ready")
    finally:
        with anyio.CancelScope(shield=True):
            await cluster.aclose()


async def _keep_later(store: CertificateStore, tls: ServingTls, names: CertificateNames) -> None:
    await anyio.sleep(CHECK_INTERVAL)  # the first check ran before the server started
    await keep_certificate(store, tls, names)


async def _stop_on_signal(scope: anyio.CancelScope) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for received in signals:
            logger.info("received {}, shutting down", signal.Signals(received).name)
            scope.cancel()
            return


def main(settings: Settings) -> int:
    """Run the webhook; 1 with the reason when it cannot start."""
    try:
        anyio.run(run_webhook, settings, backend="asyncio")
    except KeyboardInterrupt:
        return 0
    except Exception as exc:
        logger.error("webhook cannot run: {}", exc)
        return 1
    return 0
