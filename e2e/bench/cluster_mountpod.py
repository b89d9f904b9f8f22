"""mountpod on the real cluster: publish time, API requests per publish, idle requests.

Needs the local cluster with fusecsi deployed (`e2e/deploy.sh`, which prints KUBECONFIG=...):

    KUBECONFIG=/var/lib/fusecsi-cluster/kubeconfig .venv/bin/python e2e/bench/cluster_mountpod.py

Per round: a new PVC of the example `fusecsi-mountpod` StorageClass, a first pod (its publish
creates the Mount Pod), then a second pod on the same PVC (its publish shares it).
- Publish time is NodePublishVolume's duration as the node plugin logs it ("-> OK in N ms"),
  i.e. from kubelet's call to a live mount at the target, the Mount Pod's start included.
- Baselines in the same run: a plain pod's start (create -> Running, what every pod pays), and
  a hostPath publish (one bind mount behind the same gRPC server).
- API requests of the node plugin alone come from the apiserver's own metrics: the script
  installs a FlowSchema that matches only the node plugin's service account, and reads
  `apiserver_flowcontrol_dispatched_requests_total{flow_schema="fusecsi-node-bench"}` around
  each publish (every verb, reads and watches included). The verbs come from
  `apiserver_request_total` (pods and secrets writes; the script's own pod create subtracted).
- Idle: the flow schema's count over 60 s with nothing happening (the plugin's watch, opened
  before, is not a new request).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from e2e.bench.benchlib import cluster_kubectl, loadavg, machine, percentile, table
from e2e.tests.kube import Kubectl, wait_for

NAMESPACE = "bench-mountpod"
BUSYBOX = os.environ.get("FUSECSI_E2E_BUSYBOX", "fusecsi.local/busybox:1.35")
FLOW_SCHEMA = "fusecsi-node-bench"
_DISPATCHED = re.compile(
    r'^apiserver_flowcontrol_dispatched_requests_total\{[^}]*flow_schema="'
    + FLOW_SCHEMA
    + r'"[^}]*\} (\d+(?:\.\d+)?(?:e\+\d+)?)$'
)
_METRIC = re.compile(r"^apiserver_request_total\{([^}]*)\} (\d+(?:\.\d+)?(?:e\+\d+)?)$")


def request_counts(kubectl: Kubectl, *, reads: bool = False) -> Counter[str]:
    """apiserver_request_total for pods (no subresource) and secrets, by 'VERB resource'.

    Reads of pods (GET, LIST, WATCH) are left out unless asked for: this script itself polls
    pods. The plugin reads a pod only after a 409 on a patch, which the `409` key counts.
    """
    counts: Counter[str] = Counter()
    for line in kubectl.run("get", "--raw", "/metrics").splitlines():
        match = _METRIC.match(line)
        if not match:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
        resource, verb = labels.get("resource"), labels.get("verb", "")
        if resource not in ("pods", "secrets") or labels.get("subresource"):
            continue
        if resource == "pods" and verb in ("GET", "LIST", "WATCH") and not reads:
            continue
        value = int(float(match.group(2)))
        counts[f"{verb} {resource}"] += value
        if labels.get("code") == "409":
            counts["409"] += value
    return counts


def plugin_requests(kubectl: Kubectl) -> int:
    """Requests the apiserver dispatched for the node plugin's service account (all verbs)."""
    total = 0
    for line in kubectl.run("get", "--raw", "/metrics").splitlines():
        match = _DISPATCHED.match(line)
        if match:
            total += int(float(match.group(1)))
    return total


def flow_schema() -> str:
    """A FlowSchema for the node plugin's service account only: its requests get counted."""
    return json.dumps(
        {
            "apiVersion": "flowcontrol.apiserver.k8s.io/v1",
            "kind": "FlowSchema",
            "metadata": {"name": FLOW_SCHEMA},
            "spec": {
                "matchingPrecedence": 100,
                "priorityLevelConfiguration": {"name": "workload-high"},
                "distinguisherMethod": {"type": "ByUser"},
                "rules": [
                    {
                        "subjects": [
                            {
                                "kind": "ServiceAccount",
                                "serviceAccount": {"namespace": "fusecsi", "name": "fusecsi-node"},
                            }
                        ],
                        "resourceRules": [
                            {
                                "verbs": ["*"],
                                "apiGroups": ["*"],
                                "resources": ["*"],
                                "namespaces": ["*"],
                                "clusterScope": True,
                            }
                        ],
                    }
                ],
            },
        }
    )


def delta(after: Counter[str], before: Counter[str]) -> Counter[str]:
    return Counter({key: after[key] - before[key] for key in after if after[key] != before[key]})


def pod(name: str, claim: str | None) -> str:
    volumes = [{"name": "data", "persistentVolumeClaim": {"claimName": claim}}] if claim else []
    mounts = [{"name": "data", "mountPath": "/data"}] if claim else []
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name},
            "spec": {
                "terminationGracePeriodSeconds": 0,
                "containers": [
                    {
                        "name": "app",
                        "image": BUSYBOX,
                        "imagePullPolicy": "IfNotPresent",
                        "command": ["sleep", "3600"],
                        "volumeMounts": mounts,
                    }
                ],
                "volumes": volumes,
            },
        }
    )


def pvc(name: str, storage_class: str) -> str:
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": name},
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "storageClassName": storage_class,
                "resources": {"requests": {"storage": "64Mi"}},
            },
        }
    )


def start_pod(kubectl: Kubectl, name: str, claim: str | None) -> float:
    began = time.monotonic()
    kubectl.apply(pod(name, claim), NAMESPACE)
    wait_for(
        f"{name} to run",
        lambda: kubectl.get("pod", name, NAMESPACE)["status"].get("phase") == "Running",
        timeout=180,
        interval=0.1,
    )
    return time.monotonic() - began


def publish_durations(kubectl: Kubectl, since: str) -> dict[str, list[float]]:
    """NodePublishVolume durations (seconds) by volume ID, from the node plugin's JSON log."""
    logs = kubectl.run(
        "logs", "-n", "fusecsi", "-l", "app.kubernetes.io/component=node", "-c", "fusecsi",
        f"--since-time={since}", "--tail=-1",
    )  # fmt: skip
    found: dict[str, list[float]] = {}
    for line in logs.splitlines():
        try:
            record = json.loads(line)["record"]
        except (ValueError, KeyError):
            continue
        extra = record.get("extra", {})
        match = re.match(r"node_publish_volume -> OK in ([\d.]+) ms", record.get("message", ""))
        if match and extra.get("rpc") == "node_publish_volume":
            found.setdefault(extra["volume_id"], []).append(float(match.group(1)) / 1000)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--idle", type=float, default=60.0, help="seconds of idle counting")
    args = parser.parse_args()
    kubectl = cluster_kubectl(NAMESPACE)
    if kubectl is None:
        return 0
    kubectl.apply(flow_schema())
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 1))
    plain, new_requests, shared_requests = [], [], []
    new_totals: list[int] = []
    shared_totals: list[int] = []
    claims: dict[str, str] = {}
    try:
        for kind in ("hostpath", "mountpod"):
            for i in range(args.rounds):
                claim = f"{kind}-{i}"
                kubectl.apply(pvc(claim, f"fusecsi-{kind}"), NAMESPACE)
                volume = wait_for(
                    f"{claim} bound",
                    lambda c=claim: kubectl.get("pvc", c, NAMESPACE)["spec"].get("volumeName"),
                    interval=0.2,
                )
                claims[claim] = str(kubectl.get("pv", volume)["spec"]["csi"]["volumeHandle"])
                before, total_before = request_counts(kubectl), plugin_requests(kubectl)
                start_pod(kubectl, f"{claim}-a", claim)
                middle, total_middle = request_counts(kubectl), plugin_requests(kubectl)
                start_pod(kubectl, f"{claim}-b", claim)
                after, total_after = request_counts(kubectl), plugin_requests(kubectl)
                if kind == "mountpod":
                    new_totals.append(total_middle - total_before)
                    shared_totals.append(total_after - total_middle)
                    first, second = delta(middle, before), delta(after, middle)
                    first["POST pods"] -= 1  # the app pod this script created
                    second["POST pods"] -= 1
                    new_requests.append(+first)
                    shared_requests.append(+second)
        for i in range(args.rounds):
            plain.append(start_pod(kubectl, f"plain-{i}", None))
        idle_before = plugin_requests(kubectl)
        time.sleep(args.idle)
        idle = plugin_requests(kubectl) - idle_before
        durations = publish_durations(kubectl, since)
    finally:
        kubectl.run("delete", "namespace", NAMESPACE, "--wait=true", "--timeout=300s", check=False)
        kubectl.run("delete", "flowschema", FLOW_SCHEMA, "--ignore-not-found", check=False)

    def series(kind: str, index: int) -> list[float]:
        return [
            durations[claims[f"{kind}-{i}"]][index]
            for i in range(args.rounds)
            if len(durations.get(claims[f"{kind}-{i}"], [])) > index
        ]

    rows = []
    for label, values in (
        ("mountpod publish, new Mount Pod", series("mountpod", 0)),
        ("mountpod publish, shared Mount Pod", series("mountpod", 1)),
        ("hostPath publish (baseline)", series("hostpath", 0) + series("hostpath", 1)),
        ("plain pod start, create->Running (baseline)", plain),
    ):
        if values:
            rows.append(
                [label, str(len(values)), f"{percentile(values, 50) * 1000:.0f} ms",
                 f"{percentile(values, 99) * 1000:.0f} ms"]
            )  # fmt: skip
    print(f"# {machine()}; load average {loadavg()}")
    print(table(["what", "n", "p50", "p99"], rows))
    print()

    def verbs(samples: list[Counter[str]]) -> str:
        merged: Counter[str] = Counter()
        for sample in samples:
            merged.update(sample)
        return ", ".join(
            f"{key}: {value / len(samples):.1f}" for key, value in sorted(merged.items())
        )

    print(
        table(
            ["node plugin API requests", "min", "max", "writes per publish (mean, by verb)"],
            [
                ["publish, new Mount Pod", str(min(new_totals)), str(max(new_totals)),
                 verbs(new_requests)],
                ["publish, shared Mount Pod", str(min(shared_totals)), str(max(shared_totals)),
                 verbs(shared_requests)],
                [f"idle, {args.idle:.0f} s", str(idle), str(idle), ""],
            ],
        )
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
