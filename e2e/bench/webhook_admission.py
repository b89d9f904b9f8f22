"""Latency of the sidecar webhook's admissions under bursts, next to an HTTPS baseline measured
in the same run.

The webhook runs as its own process (`serve_webhook` from csi/webhook.py, the code
`fusecsi webhook` runs, with a self-signed certificate from `generate_material` and a lookup
answering from the recorded objects in unit/fixtures/admission/objects.json, so no apiserver
time is in the figures; it logs every admission, as in production, to a file). This process
sends bursts of --concurrency simultaneous requests (an aiohttp client trusting the CA), in
interleaved rounds, each subject once per round:

* baseline: GET /healthz, the same HTTPS round trip with no work behind it;
* admission: POST /mutate with the recorded review of a pod with two bound sidecar PVCs (two
  PVC and two PV lookups, two sidecars injected: the heaviest recorded case);

each over kept-alive connections (as the apiserver calls webhooks) and, in separate rows, with a
new TLS connection per request. Latency is per request, from send to the whole answer read;
server CPU is the webhook process's user+system time per request.

Run:  .venv/bin/python e2e/bench/webhook_admission.py [--concurrency 100] [--rounds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import benchlib
from benchlib import ms, percentile, ratio

FIXTURES = benchlib.REPO / "unit" / "fixtures" / "admission"
HOSTNAME = "fusecsi-sidecar-injector.fusecsi.svc"
TARGET_P99 = 0.050


# --- the server process ---------------------------------------------------------------------------


class MemoryLookup:
    """The recorded PVCs, PVs and StorageClasses, answered from memory (the same objects each
    time: a review only reads them)."""

    def __init__(self) -> None:
        objects = json.loads((FIXTURES / "objects.json").read_text())
        self.pvcs = {
            (o["metadata"]["namespace"], o["metadata"]["name"]): o
            for o in objects["persistentvolumeclaims"]
        }
        self.pvs = {o["metadata"]["name"]: o for o in objects["persistentvolumes"]}
        self.classes = {o["metadata"]["name"]: o for o in objects["storageclasses"]}

    async def get_pvc(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.pvcs.get((namespace, name))

    async def get_pv(self, name: str) -> dict[str, Any] | None:
        return self.pvs.get(name)

    async def get_storage_class(self, name: str) -> dict[str, Any] | None:
        return self.classes.get(name)


def serve(work: Path) -> int:
    """`--serve WORK`: certificate into WORK, the webhook on 127.0.0.1, its port in WORK/port."""
    sys.path.insert(0, str(benchlib.REPO))
    from loguru import logger

    from csi.settings import Settings
    from csi.webhook import CertificateNames, ServingTls, generate_material, serve_webhook

    logger.remove()
    logger.add(work / "webhook.log", level="INFO")
    settings = Settings(
        driver_name="csi.fusecsi.io",
        roots={"default": Path("/mnt/jfs"), "archive": Path("/mnt/archive")},
        sidecar_image="registry.local/fusecsi:bench",
        webhook_address="127.0.0.1:0",
        shutdown_grace=2.0,
    )
    names = CertificateNames.from_settings(settings)
    material = generate_material(names, now=datetime.datetime.now(datetime.UTC))
    (work / "ca.crt").write_bytes(material.ca_pem)
    tls = ServingTls(work / "tls")
    tls.load(material)

    async def main() -> None:
        async with anyio.create_task_group() as tasks:
            _, port = await tasks.start(serve_webhook, settings, MemoryLookup(), tls.context)
            (work / "port.tmp").write_text(str(port))
            os.replace(work / "port.tmp", work / "port")
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    tasks.cancel_scope.cancel()
                    return

    anyio.run(main, backend="asyncio")
    return 0


# --- the client ----------------------------------------------------------------------------------


@dataclass
class Subject:
    name: str
    method: str
    path: str
    body: bytes | None
    new_connections: bool
    latencies: list[float] = field(default_factory=list)
    server_cpu: float = 0.0
    client_cpu: float = 0.0
    check: Callable[[bytes], None] | None = None


def check_injected(body: bytes) -> None:
    response = json.loads(body)["response"]
    if not response.get("allowed") or response.get("patchType") != "JSONPatch":
        raise RuntimeError(f"the webhook did not inject: {response}")


async def burst(
    session: aiohttp.ClientSession, url: str, subject: Subject, context: ssl.SSLContext, n: int
) -> list[float]:
    start = asyncio.Event()

    async def one() -> float:
        await start.wait()
        began = time.perf_counter()
        async with session.request(
            subject.method,
            url + subject.path,
            data=subject.body,
            headers={"Content-Type": "application/json"} if subject.body else None,
            ssl=context,
            server_hostname=HOSTNAME,
        ) as answer:
            body = await answer.read()
            if answer.status != 200:
                raise RuntimeError(f"{subject.path}: HTTP {answer.status}: {body[:200]!r}")
        took = time.perf_counter() - began
        if subject.check is not None:
            subject.check(body)
        return took

    tasks = [asyncio.ensure_future(one()) for _ in range(n)]
    await asyncio.sleep(0)
    start.set()
    return list(await asyncio.gather(*tasks))


async def measure(args: argparse.Namespace, work: Path) -> None:
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(work)], stdin=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 30
        while not (work / "port").exists():
            if server.poll() is not None:
                raise RuntimeError(f"the webhook exited with {server.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError("the webhook did not start in 30 s")
            await anyio.sleep(0.02)
        url = f"https://127.0.0.1:{(work / 'port').read_text()}"
        context = ssl.create_default_context(cadata=(work / "ca.crt").read_text())
        review = (FIXTURES / "pod-bound-pvc.json").read_bytes()
        subjects = [
            Subject("baseline: GET /healthz", "GET", "/healthz", None, False),
            Subject(
                "admission: POST /mutate", "POST", "/mutate", review, False, check=check_injected
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
            for _ in range(args.rounds):
                for subject in subjects:
                    session = fresh if subject.new_connections else kept
                    cpu, own = benchlib.cpu_seconds(server.pid), time.process_time()
                    subject.latencies += await burst(
                        session, url, subject, context, args.concurrency
                    )
                    subject.server_cpu += benchlib.cpu_seconds(server.pid) - cpu
                    subject.client_cpu += time.process_time() - own
    finally:
        benchlib.stop_process(server, timeout=10)
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
                ms(subject.client_cpu / len(subject.latencies)),
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
        "client CPU/req",
    ]
    print(benchlib.table(headers, rows))
    admission = subjects[1]
    p99 = percentile(admission.latencies, 99)
    print()
    print(
        f"target admission p99 < {ms(TARGET_P99)} (kept-alive connections, as the apiserver "
        f"calls): {'met' if p99 < TARGET_P99 else 'MISSED'} ({ms(p99)})"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=100, help="requests per burst")
    parser.add_argument("--rounds", type=int, default=10, help="measured bursts per subject")
    parser.add_argument("--timeout", type=float, default=300.0, help="give up after this long")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        return serve(args.serve)
    print(f"webhook_admission: {benchlib.machine()}")
    with benchlib.stop_on_signals(), benchlib.workdir("webhook", tmpfs_state=False) as work:
        finished = benchlib.run_bounded(lambda work: measure(args, work), work, args.timeout)
    if not finished:
        return 1
    print(f"webhook_admission: done, load average {benchlib.loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
