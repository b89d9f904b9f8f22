"""Fixtures of the end-to-end tests: a reachable cluster with fusecsi deployed (by e2e/run.sh),
a namespace per test, and, when a test fails, the evidence: driver logs, Events, kubelet's log."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e.tests.kube import Kubectl

DRIVER_NAMESPACE = "fusecsi"
DATA_ROOT = Path(os.environ.get("FUSECSI_E2E_ROOT", "/srv/fusecsi"))
BUSYBOX = os.environ.get("FUSECSI_E2E_BUSYBOX", "fusecsi.local/busybox:1.35")
KUBELET_LOG = os.environ.get("FUSECSI_E2E_KUBELET_LOG", "")


@pytest.fixture(scope="session")
def kubectl() -> Kubectl:
    kubeconfig = os.environ.get("KUBECONFIG")
    if not kubeconfig or not Path(kubeconfig).exists():
        pytest.skip(
            "no cluster: KUBECONFIG is not set (run e2e/run.sh, which brings the cluster up)"
        )
    client = Kubectl(kubeconfig, binary=os.environ.get("KUBECTL", "kubectl"))
    try:
        client.run("get", "--raw", "/readyz", timeout=10)
    except Exception as exc:  # the reason names what is missing
        pytest.skip(f"cluster at {kubeconfig} is not reachable: {exc}")
    return client


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    report = yield
    if report.when == "call":  # type: ignore[attr-defined]
        item.stash[FAILED] = report.failed  # type: ignore[attr-defined]
    return report


FAILED = pytest.StashKey[bool]()


@pytest.fixture
def namespace(kubectl: Kubectl, request: pytest.FixtureRequest) -> Iterator[str]:
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    kubectl.run("create", "namespace", name)
    yield name
    if request.node.stash.get(FAILED, False):
        _dump_evidence(kubectl, name)
    kubectl.run(
        "delete", "namespace", name, "--wait=true", "--timeout=120s", check=False, timeout=150
    )


def _dump_evidence(kubectl: Kubectl, namespace: str) -> None:
    print(f"\n===== evidence for the failed test (namespace {namespace}) =====")
    print(kubectl.run("get", "pods,pvc", "-n", namespace, "-o", "wide", check=False))
    print(kubectl.run("get", "events", "-n", namespace, "--sort-by=.lastTimestamp", check=False))
    print(kubectl.run("get", "pv", check=False))
    for component, container in (
        ("node", "fusecsi"),
        ("controller", "fusecsi"),
        ("controller", "csi-provisioner"),
    ):
        print(f"--- {component}/{container} log (tail) ---")
        print(
            kubectl.run(
                "logs", "-n", DRIVER_NAMESPACE, "-l", f"app.kubernetes.io/component={component}",
                "-c", container, "--tail=60", check=False,
            )
        )  # fmt: skip
    if KUBELET_LOG and Path(KUBELET_LOG).exists():
        print("--- kubelet log (tail) ---")
        print(
            subprocess.run(
                ["tail", "-n", "60", KUBELET_LOG], capture_output=True, text=True, check=False
            ).stdout
        )
