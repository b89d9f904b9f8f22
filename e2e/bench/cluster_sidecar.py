"""sidecar on the real cluster: the start-up time a sidecar volume adds to a pod.

Needs the local cluster with fusecsi deployed (`e2e/deploy.sh`):

    KUBECONFIG=/var/lib/fusecsi-cluster/kubeconfig .venv/bin/python e2e/bench/cluster_sidecar.py

Per round, two pods that differ only in their volume's StorageClass: `fusecsi-hostpath`
(the baseline: one bind mount) and `fusecsi-sidecar` (webhook injection, the fd mount, the
native sidecar's start and its FUSE INIT). Each is timed from `kubectl apply` to the pod's Ready
condition, on an already bound PVC. Target: the sidecar adds under 2 s.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from e2e.bench.benchlib import cluster_kubectl, loadavg, machine, percentile, table
from e2e.bench.cluster_mountpod import pod, pvc
from e2e.tests.kube import Kubectl, wait_for

NAMESPACE = "bench-sidecar"


def ready_after_apply(kubectl: Kubectl, name: str, claim: str) -> float:
    began = time.monotonic()
    kubectl.apply(pod(name, claim), NAMESPACE)
    wait_for(
        f"{name} to be Ready",
        lambda: any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in kubectl.get("pod", name, NAMESPACE)["status"].get("conditions", [])
        ),
        timeout=180,
        interval=0.1,
    )
    return time.monotonic() - began


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    kubectl = cluster_kubectl(NAMESPACE)
    if kubectl is None:
        return 0
    times: dict[str, list[float]] = {"hostpath": [], "sidecar": []}
    try:
        for kind in times:
            kubectl.apply(pvc(kind, f"fusecsi-{kind}"), NAMESPACE)
            wait_for(
                f"{kind} bound",
                lambda k=kind: kubectl.get("pvc", k, NAMESPACE)["status"].get("phase") == "Bound",
                interval=0.2,
            )
        for i in range(args.rounds):
            for kind in times:  # interleaved, so that load affects both alike
                times[kind].append(ready_after_apply(kubectl, f"{kind}-{i}", kind))
    finally:
        kubectl.run("delete", "namespace", NAMESPACE, "--wait=true", "--timeout=300s", check=False)
    base, side = times["hostpath"], times["sidecar"]
    rows = [
        [label, str(len(values)), f"{percentile(values, 50) * 1000:.0f} ms",
         f"{percentile(values, 99) * 1000:.0f} ms"]
        for label, values in (("pod with a hostPath volume (baseline)", base),
                              ("pod with a sidecar volume", side))
    ]  # fmt: skip
    added = percentile(side, 50) - percentile(base, 50)
    print(f"# {machine()}; load average {loadavg()}")
    print(table(["apply -> Ready", "n", "p50", "p99"], rows))
    print(f"\nstart-up the sidecar adds at p50: {added * 1000:.0f} ms (target: under 2000 ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
