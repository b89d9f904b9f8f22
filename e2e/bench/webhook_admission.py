"""Latency of the sidecar webhook's admissions under bursts, next to an HTTPS baseline measured
in the same run.

The webhook runs as its own process (`serve_webhook` from csi/webhook.py, the code
`fusecsi webhook` runs, with a self-signed certificate from `generate_material`). Its lookup is
the one `fusecsi webhook` uses: `KubeObjects` over `KubeCluster` (kubernetes-asyncio, HTTPS,
a bearer token), behind the server's `CachedLookup`, talking to a fake apiserver in a third
process that serves the recorded objects of unit/fixtures/admission/objects.json (each answer
serialized once: the real apiserver's own work is not the webhook's, and its authn, authz and
etcd reads are not here either, so the lookups are if anything faster than on a cluster). The
webhook logs every admission as deployed (JSON lines, to a file). This process sends bursts of
--concurrency simultaneous requests (an aiohttp client trusting the CA), in interleaved
rounds, each subject once per round:

* baseline: GET /healthz, the same HTTPS round trip with no work behind it;
* admission: POST /mutate with the recorded review of a pod with two bound sidecar PVCs (two
  PVC and two PV lookups, two sidecars injected: the heaviest recorded case), the same claims
  in every review (a Deployment's replicas: after the first, the lookups are cached);
* admission, each pod its own claims: the same review naming claims (and so volumes) no
  review named before, so every lookup is an API request (a StatefulSet's pods, each with its
  own claims, or the first pods of many Deployments);

each over kept-alive connections (as the apiserver calls webhooks) and, in separate rows, with a
new TLS connection per request. Latency is per request, from send to the whole answer read;
server CPU is the webhook process's user+system time per request, fake apiserver CPU the same
for the fake apiserver.

Run:  .venv/bin/python e2e/bench/webhook_admission.py [--concurrency 100] [--rounds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import itertools
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import benchlib
from aiohttp import web
from benchlib import ms, percentile, ratio

FIXTURES = benchlib.REPO / "unit" / "fixtures" / "admission"
HOSTNAME = "fusecsi-sidecar-injector.fusecsi.svc"
TARGET_P99 = 0.050


# --- the server process ---------------------------------------------------------------------------


TOKEN = "bench-token"
UNIQUE = "u"


class FakeApiserver:
    """The recorded PVCs, PVs and StorageClasses, served over HTTPS the way the apiserver serves
    GETs: each object as JSON (serialized once here: the real apiserver's own cost is not the
    webhook's), a Status 404 for anything else, the bearer token checked."""

    def __init__(self) -> None:
        objects = json.loads((FIXTURES / "objects.json").read_text())
        self.paths: dict[str, bytes] = {}
        for o in objects["persistentvolumeclaims"]:
            meta = o["metadata"]
            path = f"/api/v1/namespaces/{meta['namespace']}/persistentvolumeclaims/{meta['name']}"
            self.paths[path] = json.dumps(o).encode()
        for o in objects["persistentvolumes"]:
            self.paths[f"/api/v1/persistentvolumes/{o['metadata']['name']}"] = json.dumps(
                o
            ).encode()
        for o in objects["storageclasses"]:
            path = f"/apis/storage.k8s.io/v1/storageclasses/{o['metadata']['name']}"
            self.paths[path] = json.dumps(o).encode()
        self.gets = 0

    def renamed(self, path: str) -> bytes | None:
        """`<claim>-u<N>` and `<volume>-u<N>`: the recorded claim bound to the recorded volume
        `<volume>-u<N>`, and that volume, renamed (claims that no review asked for before)."""
        base, sep, unique = path.rpartition(f"-{UNIQUE}")
        recorded = self.paths.get(base)
        if not sep or not unique.isdigit() or recorded is None:
            return None
        suffix = f"-{UNIQUE}{unique}"
        item = json.loads(recorded)
        item["metadata"]["name"] += suffix
        if item["kind"] == "PersistentVolumeClaim" and item["spec"].get("volumeName"):
            item["spec"]["volumeName"] += suffix
        return json.dumps(item).encode()

    async def handle(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.Response(status=401, text="Unauthorized")
        self.gets += 1
        body = self.paths.get(request.path) or self.renamed(request.path)
        if request.method != "GET" or body is None:
            status = {
                "kind": "Status",
                "apiVersion": "v1",
                "status": "Failure",
                "reason": "NotFound",
                "code": 404,
                "message": f"{request.path} not found",
            }
            return web.json_response(status, status=404)
        return web.Response(body=body, content_type="application/json")


def ip_material(address: str) -> Any:
    """A CA and a certificate it signs for the IP `address` (the fake apiserver's)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from csi.webhook import TlsMaterial

    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench apiserver CA")])

    def builder(subject: x509.Name, public: Any) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
        )

    ca = (
        builder(ca_name, ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert = (
        builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, address)]), key.public_key())
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(address))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return TlsMaterial(cert.public_bytes(pem), key_pem, ca.public_bytes(pem))


def apiserver(work: Path) -> int:
    """`--apiserver WORK`: the fake apiserver on 127.0.0.1 (its own CA), WORK/kubeconfig for it."""
    sys.path.insert(0, str(benchlib.REPO))
    from csi.webhook import ServingTls

    material = ip_material("127.0.0.1")
    tls = ServingTls(work / "apiserver-tls")
    tls.load(material)
    fake = FakeApiserver()

    async def main() -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", fake.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls.context, backlog=1024)
        await site.start()
        port = runner.addresses[0][1]
        ca = base64.b64encode(material.ca_pem).decode()
        kubeconfig = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "bench",
                    "cluster": {
                        "server": f"https://127.0.0.1:{port}",
                        "certificate-authority-data": ca,
                    },
                }
            ],
            "users": [{"name": "bench", "user": {"token": TOKEN}}],
            "contexts": [{"name": "bench", "context": {"cluster": "bench", "user": "bench"}}],
            "current-context": "bench",
        }
        (work / "kubeconfig.tmp").write_text(json.dumps(kubeconfig))
        os.replace(work / "kubeconfig.tmp", work / "kubeconfig")
        try:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    break
        finally:
            (work / "apiserver-gets").write_text(str(fake.gets))
            await runner.cleanup()

    anyio.run(main, backend="asyncio")
    return 0


def serve(work: Path) -> int:
    """`--serve WORK`: certificate into WORK, the webhook on 127.0.0.1 reading the objects from
    the fake apiserver of WORK/kubeconfig, its port in WORK/port. Logs as the deployed webhook
    does (JSON lines on stderr, which the caller sends to WORK/webhook.log)."""
    sys.path.insert(0, str(benchlib.REPO))
    from csi.logging import configure_logging
    from csi.settings import Settings
    from csi.webhook import CertificateNames, ServingTls, generate_material, serve_webhook
    from strategies.kube.cluster import KubeCluster
    from strategies.kube.objects import KubeObjects

    settings = Settings(
        driver_name="csi.fusecsi.io",
        roots={"default": Path("/mnt/jfs"), "archive": Path("/mnt/archive")},
        sidecar_image="registry.local/fusecsi:bench",
        webhook_address="127.0.0.1:0",
        shutdown_grace=2.0,
        log_format="json",
    )
    configure_logging(settings)
    names = CertificateNames.from_settings(settings)
    material = generate_material(names, now=datetime.datetime.now(datetime.UTC))
    (work / "ca.crt").write_bytes(material.ca_pem)
    tls = ServingTls(work / "tls")
    tls.load(material)

    async def main() -> None:
        # The lookup `fusecsi webhook` uses (csi/webhook.py run_webhook), over HTTPS.
        cluster = await KubeCluster.connect(namespace="fusecsi", kubeconfig=work / "kubeconfig")
        try:
            async with anyio.create_task_group() as tasks:
                lookup = KubeObjects(cluster)
                _, port = await tasks.start(serve_webhook, settings, lookup, tls.context)
                (work / "port.tmp").write_text(str(port))
                os.replace(work / "port.tmp", work / "port")
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        tasks.cancel_scope.cancel()
                        return
        finally:
            await cluster.aclose()

    anyio.run(main, backend="asyncio")
    return 0


# --- the client ----------------------------------------------------------------------------------


@dataclass
class Subject:
    name: str
    method: str
    path: str
    body: bytes | Iterator[bytes] | None
    """One body for every request, or the next one of an iterator for each."""
    new_connections: bool
    latencies: list[float] = field(default_factory=list)
    server_cpu: float = 0.0
    apiserver_cpu: float = 0.0
    client_cpu: float = 0.0
    check: Callable[[bytes], str] | None = None
    not_injected: dict[str, int] = field(default_factory=dict)
    """why -> how many answers did not inject"""


def own_claims(review: bytes) -> Iterator[bytes]:
    """The review again and again, each time naming claims no review named before."""
    for n in itertools.count():
        item = json.loads(review)
        request = item["request"]
        request["uid"] = f"{request['uid'][:-6]}{n % 1000000:06d}"
        for volume in request["object"]["spec"]["volumes"]:
            if "persistentVolumeClaim" in volume:
                volume["persistentVolumeClaim"]["claimName"] += f"-{UNIQUE}{n}"
        yield json.dumps(item).encode()


def check_injected(body: bytes) -> str:
    """Empty when the answer injects, else why not (a lookup over its budget admits the pod
    unchanged, with a warning: counted and reported, not fatal)."""
    response = json.loads(body)["response"]
    if not response.get("allowed"):
        raise RuntimeError(f"the webhook refused the pod: {response}")
    if response.get("patchType") != "JSONPatch":
        return "; ".join(response.get("warnings") or ["no patch"])
    return ""


async def burst(
    session: aiohttp.ClientSession, url: str, subject: Subject, context: ssl.SSLContext, n: int
) -> list[float]:
    start = asyncio.Event()

    async def one(body: bytes | None) -> float:
        await start.wait()
        began = time.perf_counter()
        async with session.request(
            subject.method,
            url + subject.path,
            data=body,
            headers={"Content-Type": "application/json"} if body else None,
            ssl=context,
            server_hostname=HOSTNAME,
        ) as answer:
            body = await answer.read()
            if answer.status != 200:
                raise RuntimeError(f"{subject.path}: HTTP {answer.status}: {body[:200]!r}")
        took = time.perf_counter() - began
        if subject.check is not None and (why := subject.check(body)):
            subject.not_injected[why] = subject.not_injected.get(why, 0) + 1
        return took

    if subject.body is None or isinstance(subject.body, bytes):
        bodies = [subject.body] * n
    else:
        bodies = [next(subject.body) for _ in range(n)]
    tasks = [asyncio.ensure_future(one(body)) for body in bodies]
    await asyncio.sleep(0)
    start.set()
    return list(await asyncio.gather(*tasks))


def start(argv: list[str], ready: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as sink:
        process = subprocess.Popen(
            [sys.executable, __file__, *argv], stdin=subprocess.DEVNULL, stderr=sink
        )
    deadline = time.monotonic() + 30
    while not ready.exists():
        if process.poll() is not None:
            raise RuntimeError(f"{argv[0]} exited with {process.returncode}; see {log}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{argv[0]} did not start in 30 s")
        time.sleep(0.02)
    return process


async def measure(args: argparse.Namespace, work: Path) -> None:
    fake = start(["--apiserver", str(work)], work / "kubeconfig", work / "apiserver.log")
    server = None
    try:
        server = start(["--serve", str(work)], work / "port", work / "webhook.log")
        url = f"https://127.0.0.1:{(work / 'port').read_text()}"
        context = ssl.create_default_context(cadata=(work / "ca.crt").read_text())
        review = (FIXTURES / "pod-bound-pvc.json").read_bytes()
        subjects = [
            Subject("baseline: GET /healthz", "GET", "/healthz", None, False),
            Subject(
                "admission: POST /mutate", "POST", "/mutate", review, False, check=check_injected
            ),
            Subject(
                "admission: POST /mutate, each pod its own claims",
                "POST",
                "/mutate",
                own_claims(review),
                False,
                check=check_injected,
            ),
            Subject("baseline: GET /healthz, new TLS connection", "GET", "/healthz", None, True),
            Subject(
                "admission: POST /mutate, new TLS connection",
                "POST",
                "/mutate",
                review,
                True,
                check=check_injected,
            ),
        ]
        kept = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=args.concurrency))
        fresh = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=args.concurrency, force_close=True)
        )
        async with kept, fresh:
            for subject in subjects:  # warm-up: connections, caches, imports
                session = fresh if subject.new_connections else kept
                await burst(session, url, subject, context, args.concurrency)
                subject.not_injected.clear()
            for _ in range(args.rounds):
                for subject in subjects:
                    session = fresh if subject.new_connections else kept
                    cpu, own = benchlib.cpu_seconds(server.pid), time.process_time()
                    api = benchlib.cpu_seconds(fake.pid)
                    subject.latencies += await burst(
                        session, url, subject, context, args.concurrency
                    )
                    subject.server_cpu += benchlib.cpu_seconds(server.pid) - cpu
                    subject.apiserver_cpu += benchlib.cpu_seconds(fake.pid) - api
                    subject.client_cpu += time.process_time() - own
    finally:
        if server is not None:
            benchlib.stop_process(server, timeout=10)
        benchlib.stop_process(fake, timeout=10)
    report(args, subjects)


def report(args: argparse.Namespace, subjects: list[Subject]) -> None:
    rows = []
    for subject in subjects:
        baseline = next(
            s
            for s in subjects
            if s.new_connections == subject.new_connections and s.path == "/healthz"
        )
        p50, p99 = percentile(subject.latencies, 50), percentile(subject.latencies, 99)
        rows.append(
            [
                subject.name,
                ms(p50),
                ms(p99),
                ms(max(subject.latencies)),
                ratio(p99, percentile(baseline.latencies, 99)),
                ms(subject.server_cpu / len(subject.latencies)),
                ms(subject.apiserver_cpu / len(subject.latencies)),
                ms(subject.client_cpu / len(subject.latencies)),
                str(sum(subject.not_injected.values())) if subject.check else "-",
            ]
        )
    print()
    print(
        f"webhook admission: bursts of {args.concurrency} concurrent requests, {args.rounds} "
        f"interleaved rounds ({args.rounds * args.concurrency} requests per subject, after one "
        "warm-up burst); HTTPS (ECDSA P-256) on 127.0.0.1; client and server share this machine"
    )
    headers = [
        "subject",
        "p50",
        "p99",
        "max",
        "p99 vs baseline",
        "server CPU/req",
        "fake apiserver CPU/req",
        "client CPU/req",
        "not injected",
    ]
    print(benchlib.table(headers, rows))
    print()
    for subject in subjects:
        for why, count in subject.not_injected.items():
            print(f"{subject.name}: {count} answer(s) did not inject: {why}")
    for admission in subjects:
        if admission.path != "/mutate" or admission.new_connections:
            continue
        p99 = percentile(admission.latencies, 99)
        print(
            f"target admission p99 < {ms(TARGET_P99)} (kept-alive connections, as the apiserver "
            f"calls), {admission.name}: {'met' if p99 < TARGET_P99 else 'MISSED'} ({ms(p99)})"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=100, help="requests per burst")
    parser.add_argument("--rounds", type=int, default=10, help="measured bursts per subject")
    parser.add_argument("--timeout", type=float, default=300.0, help="give up after this long")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--apiserver", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        return serve(args.serve)
    if args.apiserver is not None:
        return apiserver(args.apiserver)
    print(f"webhook_admission: {benchlib.machine()}")
    with benchlib.stop_on_signals(), benchlib.workdir("webhook", tmpfs_state=False) as work:
        finished = benchlib.run_bounded(lambda work: measure(args, work), work, args.timeout)
    if not finished:
        return 1
    print(f"webhook_admission: done, load average {benchlib.loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
