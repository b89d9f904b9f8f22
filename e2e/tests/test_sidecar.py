"""End to end, sidecar: the apiserver calls the webhook over TLS, the sidecar runs unprivileged."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from e2e.tests.conftest import DRIVER_NAMESPACE
from e2e.tests.kube import Kubectl, wait_for
from e2e.tests.test_mountpod import app_pod, juicefs_volume
from e2e.tests.test_volumes import pvc_manifest, wait_bound, wait_running

STORAGE_CLASS = "fusecsi-sidecar"
WEBHOOK = "fusecsi-sidecar-injector"


def sidecars(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        c
        for c in pod["spec"].get("initContainers") or []
        if c["name"].startswith("fusecsi-sidecar-")
    ]


def pod_processes(pod_uid: str) -> dict[int, list[bytes]]:
    """pid -> argv of the processes of a pod on this host (found by cgroup)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            cgroup = (entry / "cgroup").read_text()
        except OSError:
            continue
        if pod_uid.replace("-", "_") in cgroup or pod_uid in cgroup:
            found[int(entry.name)] = argv
    return found


def host_status(pod_uid: str) -> dict[str, str]:
    """/proc/<pid>/status of the sidecar process of a pod (found by its socket argument)."""
    for pid, argv in pod_processes(pod_uid).items():
        if b"sidecar" in argv and b"--socket" in argv:
            status = Path(f"/proc/{pid}/status").read_text()
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


def juicefs_pids(pod_uid: str) -> list[int]:
    """The JuiceFS client processes of a pod (not the sh wrapper that runs them)."""
    return [
        pid
        for pid, argv in pod_processes(pod_uid).items()
        if argv
        and Path(argv[0].decode(errors="replace")).name != "sh"
        and b"juicefs" in b" ".join(argv)
    ]


def sidecar_restarts(kubectl: Kubectl, namespace: str, pod: str) -> int:
    status = kubectl.get("pod", pod, namespace)["status"]
    return sum(
        c.get("restartCount", 0)
        for c in status.get("initContainerStatuses") or []
        if c["name"].startswith("fusecsi-sidecar-")
    )


def host_mounts_of(pod_uid: str) -> list[str]:
    return [
        line
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if f"/pods/{pod_uid}/" in line
    ]


@pytest.mark.skipif(
    not os.environ.get("FUSECSI_E2E_JUICEFS_IMAGE"),
    reason="no JuiceFS client image (e2e/deploy.sh builds it and sets FUSECSI_E2E_JUICEFS_IMAGE)",
)
def test_juicefs_runs_in_a_privileged_sidecar_with_credentials_only_from_the_node_plugin(
    kubectl: Kubectl, namespace: str
) -> None:
    """JuiceFS cannot take a /dev/fuse fd: its sidecar mounts by itself (privileged mode)."""
    store, pv_name = juicefs_volume(kubectl, namespace, "sidecar", "apps/sidecar")
    metaurl = f"sqlite3://{store}/meta.db"
    try:
        wait_bound(kubectl, namespace, "jfs")
        kubectl.apply(json.dumps(app_pod("app", "jfs")), namespace)  # HostToContainer
        pod = wait_running(kubectl, namespace, "app")
        (sidecar,) = sidecars(pod)
        assert sidecar["securityContext"]["privileged"] is True
        assert {
            "name": "fusecsi-sidecar",
            "mountPath": "/fusecsi-sidecar",
            "mountPropagation": "Bidirectional",
        } in sidecar["volumeMounts"]
        assert metaurl not in json.dumps(pod), "the metadata URL leaked into the pod"
        # The app container, started after the sidecar's startup probe, sees JuiceFS.
        mounts = kubectl.exec(namespace, "app", "grep ' /data ' /proc/mounts")
        assert "fuse.juicefs" in mounts, mounts
        kubectl.exec(namespace, "app", "echo through-the-juicefs-sidecar > /data/hello")
        text = kubectl.exec(namespace, "app", "cat /data/hello").strip()
        assert text == "through-the-juicefs-sidecar"
        assert (store / "meta.db").exists(), "the volume was not formatted"
        assert any((store / "bucket").rglob("*")), "no object reached the local bucket"
        uid = pod["metadata"]["uid"]
        assert any("juicefs" in line for line in host_mounts_of(uid)), "not on the host target"

        # The client is killed: kubelet restarts the sidecar, whose new client's mount is
        # stacked on the dead one: the app (HostToContainer) reads again without restarting.
        pids = juicefs_pids(uid)
        assert pids, f"no JuiceFS client process of the pod: {pod_processes(uid)}"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        wait_for(
            "kubelet to restart the sidecar",
            lambda: sidecar_restarts(kubectl, namespace, "app") > 0,
            timeout=90,
        )
        wait_for(
            "the app to read again",
            lambda: (
                kubectl.exec(namespace, "app", "cat /data/hello 2>&1", check=False).strip()
                == "through-the-juicefs-sidecar"
            ),
            timeout=120,
        )
        status = kubectl.get("pod", "app", namespace)["status"]
        assert all(c.get("restartCount", 0) == 0 for c in status["containerStatuses"])

        kubectl.run("delete", "pod", "app", "-n", namespace, "--wait=true", "--timeout=120s")
        # Kubelet tears the volumes down after the pod object is gone: give it that time.
        wait_for("the pod's mounts to go", lambda: not host_mounts_of(uid), timeout=60)
    finally:
        kubectl.run("delete", "namespace", namespace, "--wait=true", "--timeout=120s", check=False)
        kubectl.run("delete", "pv", pv_name, "--wait=true", "--timeout=60s", check=False)
