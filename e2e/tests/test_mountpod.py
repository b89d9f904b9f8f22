"""End to end, mountpod: Mount Pods shared by app pods, deleted when unused, healed when broken."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from e2e.tests.conftest import BUSYBOX, DATA_ROOT, DRIVER_NAMESPACE
from e2e.tests.kube import Kubectl, wait_for
from e2e.tests.test_volumes import pvc_manifest, static_pv_manifest, wait_bound, wait_running

STORAGE_CLASS = "fusecsi-mountpod"
DELETE_DELAY = 10.0  # the example StorageClass's deleteDelay
MOUNT_POD_SELECTOR = "app.kubernetes.io/component=mount-pod"

# A reader that never reopens its working directory: it opens the file anew each time, as a
# long-running application does, and reports every attempt.
READER = (
    "while true; do if cat /data/marker >/dev/null 2>&1; then echo ok; else echo fail; fi; "
    "sleep 0.5; done"
)


def app_pod(
    name: str, claim: str, command: str = "sleep 3600", *, propagation: str = "HostToContainer"
) -> dict[str, Any]:
    """A pod whose mount follows the host's (HostToContainer): it sees a re-bound volume."""
    return {
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
                    "volumeMounts": [
                        {
                            "name": "data",
                            "mountPath": "/data",
                            "mountPropagation": propagation,
                        }
                    ],
                }
            ],
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": claim}}],
        },
    }


def mount_pods(kubectl: Kubectl, volume_id: str | None = None) -> list[dict[str, Any]]:
    items = json.loads(
        kubectl.run("get", "pods", "-n", DRIVER_NAMESPACE, "-l", MOUNT_POD_SELECTOR, "-o", "json")
    )["items"]
    if volume_id is None:
        return list(items)
    return [
        pod
        for pod in items
        if (pod["metadata"].get("annotations") or {}).get("fusecsi.io/volume-id") == volume_id
    ]


def refs(pod: dict[str, Any]) -> dict[str, str]:
    annotations = pod["metadata"].get("annotations") or {}
    return {k: v for k, v in annotations.items() if k.startswith("fusecsi.io/ref-")}


def volume_id_of(kubectl: Kubectl, namespace: str, claim: str) -> str:
    pv = kubectl.get("pv", wait_bound(kubectl, namespace, claim)["spec"]["volumeName"])
    return str(pv["spec"]["csi"]["volumeHandle"])


def the_mount_pod(kubectl: Kubectl, volume_id: str) -> dict[str, Any]:
    return wait_for(
        f"exactly one Mount Pod of {volume_id}",
        lambda: (found := mount_pods(kubectl, volume_id)) and len(found) == 1 and found[0],
        timeout=60,
    )


def client_pids(volume_dir: Path) -> list[int]:
    """Host PIDs of the builtin client serving `volume_dir` (its command line names it)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"fuse" in argv and os.fsencode(volume_dir) in argv:
            pids.append(int(entry.name))
    return pids


def reads(kubectl: Kubectl, namespace: str, pod: str) -> bool:
    out = kubectl.exec(namespace, pod, "cat /data/marker 2>&1 || true", check=False)
    return out.strip() == "marker"


def start_reader(kubectl: Kubectl, namespace: str, claim: str) -> str:
    kubectl.apply(json.dumps(app_pod("reader", claim, READER)), namespace)
    wait_running(kubectl, namespace, "reader")
    kubectl.exec(namespace, "reader", "echo marker > /data/marker")
    return "reader"


def container_restarts(kubectl: Kubectl, namespace: str, pod: str) -> int:
    status = kubectl.get("pod", pod, namespace)["status"]
    return sum(c.get("restartCount", 0) for c in status.get("containerStatuses", []))


def test_pods_share_one_mount_pod_which_goes_after_the_delay(
    kubectl: Kubectl, namespace: str
) -> None:
    kubectl.apply(pvc_manifest("shared", STORAGE_CLASS), namespace)
    volume_id = volume_id_of(kubectl, namespace, "shared")
    names = ["app-a", "app-b", "app-c"]
    kubectl.apply("\n---\n".join(json.dumps(app_pod(n, "shared")) for n in names), namespace)
    for name in names:
        wait_running(kubectl, namespace, name)
    pod = the_mount_pod(kubectl, volume_id)
    assert len(refs(pod)) == 3
    kubectl.exec(namespace, "app-a", "echo hello > /data/greeting")
    assert kubectl.exec(namespace, "app-c", "cat /data/greeting").strip() == "hello"

    kubectl.run("delete", "pod", "-n", namespace, *names, "--wait=true", "--timeout=90s")
    unreferenced = wait_for(
        "the Mount Pod to lose its references",
        lambda: (found := mount_pods(kubectl, volume_id)) and not refs(found[0]) and found[0],
        timeout=60,
    )
    assert unreferenced["metadata"]["uid"] == pod["metadata"]["uid"]
    time.sleep(DELETE_DELAY / 3)
    assert mount_pods(kubectl, volume_id), "deleted before its deleteDelay"
    wait_for(
        "the unused Mount Pod to be deleted",
        lambda: not mount_pods(kubectl, volume_id),
        timeout=DELETE_DELAY + 60,
        interval=0.5,
    )


def test_twenty_pods_at_once_make_one_mount_pod_per_volume(
    kubectl: Kubectl, namespace: str
) -> None:
    claims = [f"vol-{i}" for i in range(4)]
    kubectl.apply("\n---\n".join(pvc_manifest(c, STORAGE_CLASS) for c in claims), namespace)
    volume_ids = [volume_id_of(kubectl, namespace, c) for c in claims]
    pods = [(f"app-{i}", claims[i % 4]) for i in range(20)]
    kubectl.apply("\n---\n".join(json.dumps(app_pod(n, c)) for n, c in pods), namespace)
    for name, _ in pods:
        wait_running(kubectl, namespace, name)
    for volume_id in volume_ids:
        found = mount_pods(kubectl, volume_id)
        assert len(found) == 1, f"{volume_id}: {[p['metadata']['name'] for p in found]}"
        assert len(refs(found[0])) == 5


def test_a_killed_client_heals_without_restarting_the_app(kubectl: Kubectl, namespace: str) -> None:
    kubectl.apply(pvc_manifest("data", STORAGE_CLASS), namespace)
    volume_id = volume_id_of(kubectl, namespace, "data")
    start_reader(kubectl, namespace, "data")
    pod = the_mount_pod(kubectl, volume_id)
    restarts_before = container_restarts(kubectl, DRIVER_NAMESPACE, pod["metadata"]["name"])
    source = DATA_ROOT / namespace / "data"
    pids = client_pids(source)
    assert pids, f"no client process serving {source}"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    wait_for(
        "kubelet to restart the client",
        lambda: (
            container_restarts(kubectl, DRIVER_NAMESPACE, pod["metadata"]["name"]) > restarts_before
        ),
        timeout=60,
    )
    wait_for("the reader to read again", lambda: reads(kubectl, namespace, "reader"), timeout=60)
    assert container_restarts(kubectl, namespace, "reader") == 0
    log = kubectl.run("logs", "-n", namespace, "reader", "--tail=3").split()
    assert log[-1] == "ok", log


def test_a_deleted_mount_pod_is_recreated_and_the_app_reads_again(
    kubectl: Kubectl, namespace: str
) -> None:
    kubectl.apply(pvc_manifest("data", STORAGE_CLASS), namespace)
    volume_id = volume_id_of(kubectl, namespace, "data")
    start_reader(kubectl, namespace, "data")
    pod = the_mount_pod(kubectl, volume_id)
    kubectl.run("delete", "pod", "-n", DRIVER_NAMESPACE, pod["metadata"]["name"], "--wait=true")
    recreated = wait_for(
        "a new Mount Pod",
        lambda: (
            (found := mount_pods(kubectl, volume_id))
            and found[0]["metadata"]["uid"] != pod["metadata"]["uid"]
            and found[0]
        ),
        timeout=60,
    )
    assert recreated["metadata"]["name"] == pod["metadata"]["name"]
    assert len(refs(recreated)) == 1
    wait_for("the reader to read again", lambda: reads(kubectl, namespace, "reader"), timeout=90)
    assert container_restarts(kubectl, namespace, "reader") == 0


def test_a_node_plugin_restart_disturbs_nothing(kubectl: Kubectl, namespace: str) -> None:
    kubectl.apply(pvc_manifest("data", STORAGE_CLASS), namespace)
    volume_id = volume_id_of(kubectl, namespace, "data")
    start_reader(kubectl, namespace, "data")
    pod = the_mount_pod(kubectl, volume_id)
    selector = "app.kubernetes.io/component=node"
    kubectl.run("delete", "pod", "-n", DRIVER_NAMESPACE, "-l", selector, "--wait=true")
    kubectl.run(
        "wait", "pod", "-n", DRIVER_NAMESPACE, "-l", selector, "--for=condition=Ready",
        "--timeout=120s",
    )  # fmt: skip
    assert reads(kubectl, namespace, "reader")
    kubectl.apply(json.dumps(app_pod("second", "data")), namespace)
    wait_running(kubectl, namespace, "second")
    assert kubectl.exec(namespace, "second", "cat /data/marker").strip() == "marker"
    after = the_mount_pod(kubectl, volume_id)
    assert after["metadata"]["uid"] == pod["metadata"]["uid"]
    assert len(refs(after)) == 2


def test_a_static_volume_with_the_builtin_client(kubectl: Kubectl, namespace: str) -> None:
    directory = DATA_ROOT / "static" / namespace
    directory.mkdir(parents=True)
    (directory / "existing").write_text("from before")
    pv_name = f"pv-{namespace}"
    attributes = {
        "strategy": "mountpod",
        "client": "builtin",
        "path": f"static/{namespace}",
        "capacity": "256Mi",
    }
    kubectl.apply(static_pv_manifest(pv_name, namespace, "static", attributes))
    try:
        kubectl.apply(pvc_manifest("static", "", "1Gi", volume_name=pv_name), namespace)
        kubectl.apply(json.dumps(app_pod("app", "static")), namespace)
        wait_running(kubectl, namespace, "app")
        assert kubectl.exec(namespace, "app", "cat /data/existing").strip() == "from before"
        size_kib = kubectl.exec(namespace, "app", "df -Pk /data | tail -n1").split()[1]
        assert int(size_kib) == 256 * 1024
        pod = the_mount_pod(kubectl, pv_name)
        assert pod["spec"]["containers"][0]["securityContext"] == {"privileged": True}
    finally:
        kubectl.run("delete", "namespace", namespace, "--wait=true", "--timeout=120s", check=False)
        kubectl.run("delete", "pv", pv_name, "--wait=true", "--timeout=60s", check=False)


def juicefs_volume(kubectl: Kubectl, namespace: str, strategy: str, path: str) -> tuple[Path, str]:
    """A static JuiceFS PV of `strategy` bound to the claim `jfs`: SQLite metadata and a `file`
    bucket below the root, formatted on first use; credentials only in the Secret `jfs` its
    `nodePublishSecretRef` names. Returns (the store directory, the PV's name)."""
    store = DATA_ROOT / f"juicefs-{strategy}-e2e" / namespace
    (store / "bucket").mkdir(parents=True)
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "jfs"},
        "stringData": {
            "name": "e2e",
            "metaurl": f"sqlite3://{store}/meta.db",
            "storage": "file",
            "bucket": f"{store}/bucket/",
        },
    }
    kubectl.apply(json.dumps(secret), namespace)
    pv_name = f"jfs-{strategy.lower()}-{namespace}"
    pv = json.loads(
        static_pv_manifest(
            pv_name,
            namespace,
            "jfs",
            {
                "strategy": strategy,
                "client": "juicefs",
                "root": "default",
                "path": path,
                "capacity": "1Gi",
                "clientImage": os.environ["FUSECSI_E2E_JUICEFS_IMAGE"],
            },
        )
    )
    pv["spec"]["csi"]["nodePublishSecretRef"] = {"name": "jfs", "namespace": namespace}
    kubectl.apply(json.dumps(pv))
    kubectl.apply(pvc_manifest("jfs", "", "1Gi", volume_name=pv_name), namespace)
    return store, pv_name


@pytest.mark.skipif(
    not os.environ.get("FUSECSI_E2E_JUICEFS_IMAGE"),
    reason="no JuiceFS client image (e2e/deploy.sh builds it and sets FUSECSI_E2E_JUICEFS_IMAGE)",
)
def test_the_juicefs_client_formats_on_first_use_and_serves_a_subdir(
    kubectl: Kubectl, namespace: str
) -> None:
    store, pv_name = juicefs_volume(kubectl, namespace, "mountpod", "apps/one")
    try:
        kubectl.apply(json.dumps(app_pod("app", "jfs")), namespace)
        wait_running(kubectl, namespace, "app")
        kubectl.exec(namespace, "app", "echo through-juicefs > /data/hello")
        assert kubectl.exec(namespace, "app", "cat /data/hello").strip() == "through-juicefs"
        assert (store / "meta.db").exists(), "the volume was not formatted"
        assert any((store / "bucket").rglob("*")), "no object reached the local bucket"
        pod = the_mount_pod(kubectl, pv_name)
        text = json.dumps(pod)
        assert f"{store}/meta.db" not in text, "the metadata URL leaked into the pod"
        mount_line = [
            line
            for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if pod["metadata"]["name"] in line and "juicefs" in line
        ]
        assert mount_line, "no JuiceFS mount on the host"
    finally:
        kubectl.run("delete", "namespace", namespace, "--wait=true", "--timeout=120s", check=False)
        kubectl.run("delete", "pv", pv_name, "--wait=true", "--timeout=60s", check=False)
