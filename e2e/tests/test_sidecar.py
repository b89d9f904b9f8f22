"""End to end, sidecar: the apiserver calls the webhook over TLS, the sidecar runs unprivileged."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from e2e.tests.conftest import DRIVER_NAMESPACE
from e2e.tests.kube import Kubectl, wait_for
from e2e.tests.test_mountpod import app_pod
from e2e.tests.test_volumes import pvc_manifest, wait_bound, wait_running

STORAGE_CLASS = "fusecsi-sidecar"
WEBHOOK = "fusecsi-sidecar-injector"


def sidecars(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        c
        for c in pod["spec"].get("initContainers") or []
        if c["name"].startswith("fusecsi-sidecar-")
    ]


def host_status(pod_uid: str) -> dict[str, str]:
    """/proc/<pid>/status of the sidecar process of a pod (found by its socket argument)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if b"sidecar" not in argv or b"--socket" not in argv:
                continue
            cgroup = (entry / "cgroup").read_text()
        except OSError:
            continue
        if pod_uid.replace("-", "_") in cgroup or pod_uid in cgroup:
            status = (entry / "status").read_text()
            return dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    raise AssertionError(f"no sidecar process of pod {pod_uid} on this host")


def test_a_pod_gets_an_unprivileged_sidecar_that_serves_its_volume(
    kubectl: Kubectl, namespace: str
) -> None:
    kubectl.apply(pvc_manifest("data", STORAGE_CLASS), namespace)
    wait_bound(kubectl, namespace, "data")
    kubectl.apply(json.dumps(app_pod("app", "data", propagation="None")), namespace)
    pod = wait_running(kubectl, namespace, "app")
    (sidecar,) = sidecars(pod)
    assert sidecar["restartPolicy"] == "Always"
    security = sidecar["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] != 0
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    kubectl.exec(namespace, "app", "echo through-the-sidecar > /data/hello")
    assert kubectl.exec(namespace, "app", "cat /data/hello").strip() == "through-the-sidecar"
    mounts = kubectl.exec(namespace, "app", "grep ' /data ' /proc/mounts")
    assert "fuse.fusecsi" in mounts, mounts
    status = host_status(pod["metadata"]["uid"])
    assert status["Uid"].split()[0] != "0", status["Uid"]
    assert int(status["CapEff"], 16) == 0, status["CapEff"]
    assert status["NoNewPrivs"].strip() == "1"


def test_a_job_with_a_sidecar_volume_completes(kubectl: Kubectl, namespace: str) -> None:
    kubectl.apply(pvc_manifest("data", STORAGE_CLASS), namespace)
    wait_bound(kubectl, namespace, "data")
    template = app_pod(
        "job", "data", "echo done > /data/result && cat /data/result", propagation="None"
    )
    template["spec"]["restartPolicy"] = "Never"
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "writer"},
        "spec": {"backoffLimit": 0, "template": {"spec": template["spec"]}},
    }
    kubectl.apply(json.dumps(job), namespace)
    wait_for(
        "the Job to complete",
        lambda: (kubectl.get("job", "writer", namespace).get("status") or {}).get("succeeded"),
        timeout=180,
    )


def test_a_pod_not_selecting_the_strategy_is_untouched(kubectl: Kubectl, namespace: str) -> None:
    kubectl.apply(pvc_manifest("plain", "fusecsi-hostpath"), namespace)
    wait_bound(kubectl, namespace, "plain")
    kubectl.apply(json.dumps(app_pod("app", "plain", propagation="None")), namespace)
    pod = wait_running(kubectl, namespace, "app")
    assert not pod["spec"].get("initContainers")
    assert "fusecsi.io/sidecar-injected" not in (pod["metadata"].get("annotations") or {})


def test_with_the_webhook_down_the_pod_waits_with_an_event_saying_why(
    kubectl: Kubectl, namespace: str
) -> None:
    kubectl.apply(pvc_manifest("data", STORAGE_CLASS), namespace)
    wait_bound(kubectl, namespace, "data")
    kubectl.run("scale", "deployment", WEBHOOK, "-n", DRIVER_NAMESPACE, "--replicas=0")
    try:
        wait_for(
            "the webhook pods to be gone",
            lambda: not json.loads(
                kubectl.run(
                    "get", "pods", "-n", DRIVER_NAMESPACE, "-l",
                    "app.kubernetes.io/component=webhook", "-o", "json",
                )
            )["items"],
            timeout=60,
        )  # fmt: skip
        kubectl.apply(json.dumps(app_pod("app", "data", propagation="None")), namespace)
        pod = kubectl.get("pod", "app", namespace)
        assert not sidecars(pod), "injected although the webhook is down"
        events = wait_for(
            "a FailedMount event naming the missing sidecar",
            lambda: [e for e in kubectl.events_for(namespace, "app") if "did not inject" in e],
            timeout=120,
        )
        assert "FailedMount" in events[0]
        assert kubectl.get("pod", "app", namespace)["status"].get("phase") == "Pending"
    finally:
        kubectl.run("scale", "deployment", WEBHOOK, "-n", DRIVER_NAMESPACE, "--replicas=2")
        kubectl.run(
            "rollout", "status", "deployment", WEBHOOK, "-n", DRIVER_NAMESPACE, "--timeout=120s"
        )
