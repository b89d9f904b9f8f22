"""sidecar webhook on the real cluster: admission latency under 100 concurrent pod creations.

Needs the local cluster with fusecsi deployed (`e2e/deploy.sh`):

    KUBECONFIG=/var/lib/fusecsi-cluster/kubeconfig .venv/bin/python e2e/bench/cluster_webhook.py

Per round, 100 pods are created at once (100 concurrent CREATE requests, kept-alive
connections) in each of two namespaces that differ only in one label:

* `bench-webhook`: the apiserver calls the webhook for every pod (each names a bound sidecar
  claim, so each review looks up the claim and its PV and injects a sidecar);
* `bench-webhook-off` (the baseline): labelled `fusecsi.io/sidecar-injection=disabled`, so the
  webhook's namespaceSelector keeps the apiserver from calling it.

The pods select a node that does not exist, so nothing starts: what is measured is admission.
Figures:

* the webhook's latency **as the apiserver measures it** (its histogram
  `apiserver_admission_webhook_admission_duration_seconds`, from the request sent to the answer
  read; buckets 5, 25, 100, 500 ms, ...): how many calls fall under each bound, and p50/p99
  interpolated inside their bucket as Prometheus's histogram_quantile does;
* the webhook's own handling time per review (its log lines, `elapsed`);
* each CREATE's latency seen by the client, in both namespaces: the difference is what the
  webhook adds to a pod creation.

Rounds alternate between the namespaces, so that load affects both alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from kubernetes_asyncio import client, config

from e2e.bench.benchlib import cluster_kubectl, loadavg, machine, percentile, table
from e2e.tests.kube import Kubectl, wait_for

NAMESPACE = "bench-webhook"
BASELINE_NAMESPACE = "bench-webhook-off"
WEBHOOK = "sidecar.fusecsi.io"
WEBHOOK_SELECTOR = "app.kubernetes.io/component=webhook"
DRIVER_NAMESPACE = "fusecsi"
METRIC = "apiserver_admission_webhook_admission_duration_seconds_bucket"
TARGET_P99 = 0.050


def pod(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "bench-webhook"}},
        "spec": {
            "nodeSelector": {"fusecsi.io/bench": "no-such-node"},  # admitted, never started
            "terminationGracePeriodSeconds": 0,
            "containers": [{"name": "app", "image": "busybox", "command": ["true"]}],
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}],
        },
    }


def claim() -> str:
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": "data"},
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "storageClassName": "fusecsi-sidecar",
                "resources": {"requests": {"storage": "1Gi"}},
            },
        }
    )


def webhook_histogram(kubectl: Kubectl) -> dict[float, float]:
    """Cumulative count per upper bound of the webhook's CREATE admissions (not rejected)."""
    counts: dict[float, float] = {}
    for line in kubectl.run("get", "--raw", "/metrics").splitlines():
        if not line.startswith(METRIC) or f'name="{WEBHOOK}"' not in line:
            continue
        if 'operation="CREATE"' not in line or 'rejected="false"' not in line:
            continue
        bound = re.search(r'le="([^"]+)"', line)
        if bound:
            upper = float("inf") if bound[1] == "+Inf" else float(bound[1])
            counts[upper] = counts.get(upper, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def histogram_quantile(q: float, cumulative: dict[float, float]) -> float:
    """Prometheus's estimate: linear inside the bucket that holds the q-th observation."""
    bounds = sorted(cumulative)
    total = cumulative[bounds[-1]]
    rank = q * total
    lower, below = 0.0, 0.0
    for upper in bounds:
        if cumulative[upper] >= rank:
            if upper == float("inf"):
                return lower
            inside = cumulative[upper] - below
            return lower + (upper - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = upper, cumulative[upper]
    return lower


async def burst(api: client.CoreV1Api, namespace: str, prefix: str, count: int) -> list[float]:
    async def create(index: int) -> float:
        began = time.perf_counter()
        await api.create_namespaced_pod(namespace, pod(f"{prefix}-{index}"))
        return time.perf_counter() - began

    return list(await asyncio.gather(*(create(i) for i in range(count))))


async def clear(api: client.CoreV1Api, namespace: str) -> None:
    await api.delete_collection_namespaced_pod(
        namespace, label_selector="app=bench-webhook", grace_period_seconds=0
    )
    deadline = time.monotonic() + 120
    while (await api.list_namespaced_pod(namespace, label_selector="app=bench-webhook")).items:
        if time.monotonic() > deadline:
            raise TimeoutError(f"pods of {namespace} were not deleted")
        await asyncio.sleep(0.2)


def handling_times(kubectl: Kubectl, since: str) -> list[float]:
    """The webhook's own time per review of a bench pod, from its JSON log lines."""
    pods = json.loads(
        kubectl.run("get", "pods", "-n", DRIVER_NAMESPACE, "-l", WEBHOOK_SELECTOR, "-o", "json")
    )["items"]
    times = []
    for item in pods:
        logs = kubectl.run(
            "logs", "-n", DRIVER_NAMESPACE, item["metadata"]["name"], f"--since-time={since}",
            check=False,
        )  # fmt: skip
        for line in logs.splitlines():  # "admission <uid> <ns>/<pod>: injected <key> in 1.2 ms"
            took = re.search(r" in ([0-9.]+) ms", line)
            if f"{NAMESPACE}/bench-" in line and took:
                times.append(float(took[1]) / 1000)
    return times


async def measure(kubectl: Kubectl, rounds: int, count: int) -> dict[str, Any]:
    await config.load_kube_config(config_file=kubectl.kubeconfig)
    configuration = client.Configuration.get_default_copy()
    configuration.connection_pool_maxsize = count * 2  # every request of a burst in flight
    async with client.ApiClient(configuration) as api_client:
        api = client.CoreV1Api(api_client)
        # Warm the connections and the webhook's lookups (a first TLS handshake is not admission).
        for namespace in (NAMESPACE, BASELINE_NAMESPACE):
            await burst(api, namespace, "warm", count)
            await clear(api, namespace)
        creates: dict[str, list[float]] = {NAMESPACE: [], BASELINE_NAMESPACE: []}
        histogram: dict[float, float] = {}
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for index in range(rounds):
            before = webhook_histogram(kubectl)
            creates[NAMESPACE] += await burst(api, NAMESPACE, f"bench-{index}", count)
            after = webhook_histogram(kubectl)
            for bound, value in after.items():
                histogram[bound] = histogram.get(bound, 0.0) + value - before.get(bound, 0.0)
            await clear(api, NAMESPACE)
            creates[BASELINE_NAMESPACE] += await burst(
                api, BASELINE_NAMESPACE, f"bench-{index}", count
            )
            await clear(api, BASELINE_NAMESPACE)
    return {"creates": creates, "histogram": histogram, "since": since}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=100)
    args = parser.parse_args()
    kubectl = cluster_kubectl(NAMESPACE, BASELINE_NAMESPACE)
    if kubectl is None:
        return 0
    kubectl.run("label", "namespace", BASELINE_NAMESPACE, "fusecsi.io/sidecar-injection=disabled")
    print(f"# {machine()}; load average at start {loadavg()}")
    try:
        for namespace in (NAMESPACE, BASELINE_NAMESPACE):
            kubectl.apply(claim(), namespace)
            wait_for(
                f"the claim of {namespace} to bind",
                lambda n=namespace: kubectl.get("pvc", "data", n)["status"].get("phase") == "Bound",
                interval=0.2,
            )
        result = asyncio.run(measure(kubectl, args.rounds, args.concurrency))
        handled = handling_times(kubectl, result["since"])
    finally:
        for namespace in (NAMESPACE, BASELINE_NAMESPACE):
            kubectl.run(
                "delete", "namespace", namespace, "--wait=true", "--timeout=300s", check=False
            )
    print(f"# load average at end {loadavg()}")
    histogram: dict[float, float] = result["histogram"]
    total = histogram.get(float("inf"), 0.0)
    if not total:
        print("no admission reached the webhook: is it deployed and the claim a sidecar one?")
        return 1
    bucket_rows = [
        [f"<= {bound * 1000:g} ms" if bound != float("inf") else "all", f"{count:.0f}",
         f"{count / total * 100:.1f}%"]
        for bound, count in sorted(histogram.items())
    ]  # fmt: skip
    print(f"\nwebhook calls as the apiserver measured them ({total:.0f} calls):")
    print(table(["latency", "calls", "share"], bucket_rows))
    p50, p99 = histogram_quantile(0.5, histogram), histogram_quantile(0.99, histogram)
    print(
        f"\nestimated (inside the bucket) p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms; "
        f"target p99 under {TARGET_P99 * 1000:.0f} ms: " + ("met" if p99 < TARGET_P99 else "missed")
    )
    rows = []
    if handled:
        rows.append(
            ["webhook's own handling per review (its log)", str(len(handled)),
             f"{percentile(handled, 50) * 1000:.2f} ms", f"{percentile(handled, 99) * 1000:.2f} ms"]
        )  # fmt: skip
    creates: dict[str, list[float]] = result["creates"]
    for label, namespace in (
        ("pod CREATE, webhook called", NAMESPACE),
        ("pod CREATE, webhook not called (baseline)", BASELINE_NAMESPACE),
    ):
        values = creates[namespace]
        rows.append(
            [label, str(len(values)), f"{percentile(values, 50) * 1000:.1f} ms",
             f"{percentile(values, 99) * 1000:.1f} ms"]
        )  # fmt: skip
    print()
    print(table(["", "n", "p50", "p99"], rows))
    added = percentile(creates[NAMESPACE], 50) - percentile(creates[BASELINE_NAMESPACE], 50)
    added99 = percentile(creates[NAMESPACE], 99) - percentile(creates[BASELINE_NAMESPACE], 99)
    print(
        f"\nwhat the webhook adds to a pod CREATE: p50 {added * 1000:.1f} ms, "
        f"p99 {added99 * 1000:.1f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
