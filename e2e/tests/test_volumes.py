"""End to end, per strategy: what a user does with PVCs and pods, on a real cluster."""

from __future__ import annotations

import json
import re
import shutil
import textwrap
import time
from pathlib import Path

import pytest

from e2e.tests.conftest import BUSYBOX, DATA_ROOT
from e2e.tests.kube import Kubectl, wait_for

STRATEGIES = ["hostPath", "inprocess"]
STORAGE_CLASS = {"hostPath": "fusecsi-hostpath", "inprocess": "fusecsi-inprocess"}


def pvc_manifest(
    name: str, storage_class: str, size: str = "64Mi", *, volume_name: str = ""
) -> str:
    spec: dict[str, object] = {
        "accessModes": ["ReadWriteMany"],
        "storageClassName": storage_class,
        "resources": {"requests": {"storage": size}},
    }
    if volume_name:
        spec["volumeName"] = volume_name
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": name},
            "spec": spec,
        }
    )


def static_pv_manifest(name: str, namespace: str, claim: str, attributes: dict[str, str]) -> str:
    """A PV an admin writes by hand, bound in advance to one claim."""
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": name},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadWriteMany"],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": "",
                "claimRef": {"namespace": namespace, "name": claim},
                "csi": {
                    "driver": "csi.fusecsi.io",
                    "volumeHandle": name,
                    "volumeAttributes": attributes,
                },
            },
        }
    )


def pod_manifest(
    name: str, claim: str, *, readonly: bool = False, command: str = "sleep 3600"
) -> str:
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name},
            "spec": {
                "terminationGracePeriodSeconds": 1,
                "containers": [
                    {
                        "name": "app",
                        "image": BUSYBOX,
                        "imagePullPolicy": "IfNotPresent",
                        "command": ["sh", "-c", command],
                        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                    }
                ],
                "volumes": [
                    {
                        "name": "data",
                        "persistentVolumeClaim": {"claimName": claim, "readOnly": readonly},
                    }
                ],
            },
        }
    )


def wait_bound(kubectl: Kubectl, namespace: str, claim: str) -> dict:
    return wait_for(
        f"PVC {claim} to be Bound",
        lambda: (
            (pvc := kubectl.get("pvc", claim, namespace))["status"].get("phase") == "Bound" and pvc
        ),
    )


def wait_running(kubectl: Kubectl, namespace: str, pod: str) -> dict:
    return wait_for(
        f"pod {pod} to run",
        lambda: (p := kubectl.get("pod", pod, namespace))["status"].get("phase") == "Running" and p,
        timeout=180,
    )


def volume_dir(kubectl: Kubectl, namespace: str, claim: str) -> Path:
    pv = kubectl.get("pv", kubectl.get("pvc", claim, namespace)["spec"]["volumeName"])
    return DATA_ROOT / pv["spec"]["csi"]["volumeAttributes"]["path"]


def host_mounts_of(pod_uid: str) -> list[str]:
    return [
        line for line in Path("/proc/self/mountinfo").read_text().splitlines() if pod_uid in line
    ]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_dynamic_volume_is_shared_between_pods_and_cleaned_up(
    kubectl: Kubectl, namespace: str, strategy: str
) -> None:
    kubectl.apply(pvc_manifest("shared", STORAGE_CLASS[strategy]), namespace)
    wait_bound(kubectl, namespace, "shared")
    kubectl.apply(pod_manifest("writer", "shared"), namespace)
    kubectl.apply(pod_manifest("reader", "shared"), namespace)
    writer = wait_running(kubectl, namespace, "writer")
    wait_running(kubectl, namespace, "reader")

    kubectl.exec(namespace, "writer", f"echo written-by-writer-{strategy} > /data/hello")
    assert (
        kubectl.exec(namespace, "reader", "cat /data/hello").strip()
        == f"written-by-writer-{strategy}"
    )
    directory = volume_dir(kubectl, namespace, "shared")
    assert directory == DATA_ROOT / namespace / "shared"  # pathPattern ${pvc.namespace}/${pvc.name}
    assert (directory / "hello").read_text().strip() == f"written-by-writer-{strategy}"

    uid = writer["metadata"]["uid"]
    assert host_mounts_of(uid), "the writer's volume is not mounted on the host"
    kubectl.run("delete", "pod", "writer", "-n", namespace, "--wait=true", "--timeout=90s")
    wait_for("the writer's mounts to go", lambda: not host_mounts_of(uid), timeout=60)
    assert (
        kubectl.exec(namespace, "reader", "cat /data/hello").strip()
        == f"written-by-writer-{strategy}"
    )

    kubectl.run("delete", "pod", "reader", "-n", namespace, "--wait=true", "--timeout=90s")
    kubectl.run("delete", "pvc", "shared", "-n", namespace, "--wait=true", "--timeout=90s")
    wait_for(f"{directory} to be handled by onDelete", lambda: not directory.exists(), timeout=90)
    if strategy == "inprocess":  # its StorageClass says onDelete: archive
        archived = [p.name for p in (DATA_ROOT / ".fusecsi" / "archive").iterdir()]
        assert any(name.startswith("pvc-") for name in archived), archived


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_static_volume_shows_existing_data(
    kubectl: Kubectl, namespace: str, strategy: str
) -> None:
    directory = DATA_ROOT / "static" / f"{namespace}-{strategy.lower()}"
    directory.mkdir(parents=True)
    (directory / "dataset.txt").write_text("preexisting\n")
    pv_name = f"{namespace}-static"
    try:
        kubectl.apply(
            static_pv_manifest(
                pv_name,
                namespace,
                "static",
                {"strategy": strategy, "path": str(directory.relative_to(DATA_ROOT))},
            )
        )
        kubectl.apply(
            pvc_manifest("static", "", size="1Gi", volume_name=pv_name),
            namespace,
        )
        wait_bound(kubectl, namespace, "static")
        kubectl.apply(pod_manifest("app", "static"), namespace)
        wait_running(kubectl, namespace, "app")
        assert kubectl.exec(namespace, "app", "cat /data/dataset.txt").strip() == "preexisting"
        kubectl.run("delete", "pod", "app", "-n", namespace, "--wait=true", "--timeout=90s")
    finally:
        kubectl.run(
            "delete", "pvc", "static", "-n", namespace, "--wait=true", "--timeout=60s", check=False
        )
        kubectl.run("delete", "pv", pv_name, "--wait=true", "--timeout=60s", check=False)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_read_only_mount_refuses_writes(kubectl: Kubectl, namespace: str, strategy: str) -> None:
    kubectl.apply(pvc_manifest("data", STORAGE_CLASS[strategy]), namespace)
    wait_bound(kubectl, namespace, "data")
    kubectl.apply(pod_manifest("ro", "data", readonly=True), namespace)
    wait_running(kubectl, namespace, "ro")
    out = kubectl.exec(namespace, "ro", "touch /data/x 2>&1; echo status=$?", check=False)
    assert "Read-only file system" in out and "status=1" in out, out


def test_expansion_is_seen_by_df_in_the_pod(kubectl: Kubectl, namespace: str) -> None:
    kubectl.apply(pvc_manifest("grow", STORAGE_CLASS["inprocess"], size="64Mi"), namespace)
    wait_bound(kubectl, namespace, "grow")
    kubectl.apply(pod_manifest("app", "grow"), namespace)
    wait_running(kubectl, namespace, "app")

    def df_kib() -> int:
        line = kubectl.exec(namespace, "app", "df -kP /data | tail -n1")
        return int(line.split()[1])

    assert df_kib() == 64 * 1024
    out = kubectl.exec(
        namespace,
        "app",
        "dd if=/dev/zero of=/data/big bs=1M count=80 2>&1; echo status=$?",
        check=False,
    )
    assert "No space left on device" in out, out
    kubectl.run(
        "patch",
        "pvc",
        "grow",
        "-n",
        namespace,
        "-p",
        '{"spec":{"resources":{"requests":{"storage":"128Mi"}}}}',
    )
    wait_for(
        "df in the pod to show 128 MiB", lambda: df_kib() == 128 * 1024, timeout=180, interval=2
    )
    out = kubectl.exec(
        namespace,
        "app",
        "dd if=/dev/zero of=/data/big bs=1M count=80 2>&1; echo status=$?",
        check=False,
    )
    assert "status=0" in out, out


def test_an_unknown_strategy_leaves_the_pvc_pending_with_an_event(
    kubectl: Kubectl, namespace: str
) -> None:
    storage_class = f"{namespace}-typo"
    kubectl.apply(
        textwrap.dedent(f"""
            apiVersion: storage.k8s.io/v1
            kind: StorageClass
            metadata: {{name: {storage_class}}}
            provisioner: csi.fusecsi.io
            parameters: {{strategy: mountPod2}}
        """)
    )
    try:
        kubectl.apply(pvc_manifest("typo", storage_class), namespace)
        events = wait_for(
            "a ProvisioningFailed event",
            lambda: [e for e in kubectl.events_for(namespace, "typo") if "ProvisioningFailed" in e],
        )
        assert re.search(
            r"parameters\.strategy: unknown strategy 'mountPod2'; available: hostPath, inprocess",
            events[0],
        )
        assert kubectl.get("pvc", "typo", namespace)["status"]["phase"] == "Pending"
    finally:
        kubectl.run("delete", "storageclass", storage_class, check=False)


def test_a_path_outside_the_root_leaves_the_pod_waiting_with_an_event(
    kubectl: Kubectl, namespace: str
) -> None:
    pv_name = f"{namespace}-escape"
    kubectl.apply(
        static_pv_manifest(
            pv_name, namespace, "escape", {"strategy": "hostPath", "path": "../../etc"}
        )
    )
    try:
        kubectl.apply(
            pvc_manifest("escape", "", size="1Gi", volume_name=pv_name),
            namespace,
        )
        wait_bound(kubectl, namespace, "escape")
        kubectl.apply(pod_manifest("app", "escape"), namespace)
        events = wait_for(
            "a FailedMount event",
            lambda: [e for e in kubectl.events_for(namespace, "app") if "FailedMount" in e],
            timeout=120,
        )
        assert "volume_context.path: '../../etc' must not contain '..'" in events[0], events
        assert kubectl.get("pod", "app", namespace)["status"]["phase"] == "Pending"
    finally:
        kubectl.run(
            "delete", "pod", "app", "-n", namespace, "--wait=true", "--timeout=60s", check=False
        )
        kubectl.run(
            "delete", "pvc", "escape", "-n", namespace, "--wait=true", "--timeout=60s", check=False
        )
        kubectl.run("delete", "pv", pv_name, "--wait=true", "--timeout=60s", check=False)


def test_after_all_pods_are_gone_nothing_of_ours_is_mounted(kubectl: Kubectl) -> None:
    """Runs last (pytest keeps file order): every test above deleted its namespace and pods."""
    wait_for(
        "the test namespaces to be gone",
        lambda: (
            not [
                n
                for n in kubectl.run("get", "namespaces", "-o", "name").split()
                if n.startswith("namespace/e2e-")
            ]
        ),
        timeout=180,
    )

    def ours() -> list[str]:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
        return [
            line
            for line in lines
            if "kubernetes.io~csi" in line or " fuse.fusecsi " in line or " fusecsi:" in line
        ]

    deadline = time.monotonic() + 60
    while ours() and time.monotonic() < deadline:
        time.sleep(1)
    assert not ours(), "\n".join(ours())
