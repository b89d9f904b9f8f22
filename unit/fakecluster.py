"""An in-memory apiserver and a tiny kubelet, for unit tests of the mountpod strategy only.

The apiserver part keeps pods and secrets with resourceVersions, honours conditional patches
and deletes (409 on a stale version), and streams watch events. The kubelet part really runs
each Mount Pod's client command on this machine (paths inside the pod are translated to the
hostPath they come from), restarts it when it dies, as kubelet would, and stops it when its pod
is deleted. So the strategy under test mounts real FUSE filesystems; only the control plane
is fake. e2e/ runs the same strategy against a real cluster.
"""

from __future__ import annotations

import asyncio
import copy
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator

from strategies.kube.cluster import ApiError, Obj

CONTAINER_PREFIX = "/fusecsi"


class FakeCluster:
    """Implements strategies.kube.cluster.Cluster; `requests` counts calls by method name."""

    def __init__(self, namespace: str = "fusecsi", *, restart_delay: float = 0.2) -> None:
        self.namespace = namespace
        self.restart_delay = restart_delay
        self.pods: dict[tuple[str, str], Obj] = {}
        self.secrets: dict[str, Obj] = {}
        self.requests: Counter[str] = Counter()
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, list[str]] = {}
        self.claims: dict[str, tuple[str, str]] = {}  # PV name -> (namespace, PVC)
        self._version = 100
        self._watchers: list[asyncio.Queue[Obj]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.RLock()
        self._stopping: set[str] = set()

    # -- the apiserver ------------------------------------------------------------------------

    def _next_version(self) -> str:
        self._version += 1
        return str(self._version)

    def _emit(self, kind: str, pod: Obj) -> None:
        event = {"type": kind, "object": copy.deepcopy(pod)}
        loop = self._loop
        if loop is None:
            return
        for queue in list(self._watchers):
            loop.call_soon_threadsafe(queue.put_nowait, event)

    def add_app_pod(self, namespace: str, name: str, uid: str, node: str) -> None:
        """A pod some user created (no process runs for it)."""
        with self._lock:
            pod = {
                "metadata": {
                    "name": name,
                    "namespace": namespace,
                    "uid": uid,
                    "resourceVersion": self._next_version(),
                },
                "spec": {"nodeName": node},
                "status": {"phase": "Running"},
            }
            self.pods[(namespace, name)] = pod
            self._emit("ADDED", pod)

    def remove_app_pod(self, namespace: str, name: str) -> None:
        with self._lock:
            pod = self.pods.pop((namespace, name))
            pod["metadata"]["resourceVersion"] = self._next_version()
            self._emit("DELETED", pod)

    async def list_node_pods(self, node: str) -> tuple[list[Obj], str]:
        self.requests["list_node_pods"] += 1
        self._loop = asyncio.get_running_loop()
        with self._lock:
            items = [
                copy.deepcopy(pod)
                for pod in self.pods.values()
                if pod["spec"].get("nodeName") == node
            ]
            return items, str(self._version)

    async def watch_node_pods(self, node: str, resource_version: str) -> AsyncIterator[Obj]:
        self.requests["watch_node_pods"] += 1
        self._loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Obj] = asyncio.Queue()
        self._watchers.append(queue)
        try:
            while True:
                event = await queue.get()
                if event["object"]["spec"].get("nodeName") == node:
                    yield event
        finally:
            self._watchers.remove(queue)

    async def get_pod(self, name: str) -> Obj | None:
        self.requests["get_pod"] += 1
        with self._lock:
            pod = self.pods.get((self.namespace, name))
            return copy.deepcopy(pod) if pod else None

    async def create_pod(self, manifest: Obj) -> Obj:
        self.requests["create_pod"] += 1
        with self._lock:
            name = manifest["metadata"]["name"]
            if (self.namespace, name) in self.pods:
                raise ApiError(409, "AlreadyExists", f'pods "{name}" already exists')
            pod = copy.deepcopy(manifest)
            pod["metadata"]["uid"] = f"uid-{name}-{self._version}"
            pod["metadata"]["resourceVersion"] = self._next_version()
            pod["status"] = {"phase": "Pending"}
            self.pods[(self.namespace, name)] = pod
            self._emit("ADDED", pod)
            threading.Thread(target=self._kubelet, args=(name,), daemon=True).start()
            return copy.deepcopy(pod)

    async def patch_pod(self, name: str, patch: Obj) -> Obj:
        self.requests["patch_pod"] += 1
        with self._lock:
            pod = self.pods.get((self.namespace, name))
            if pod is None:
                raise ApiError(404, "NotFound", f'pods "{name}" not found')
            meta = patch.get("metadata", {})
            wanted = meta.get("resourceVersion")
            if wanted is not None and wanted != pod["metadata"]["resourceVersion"]:
                raise ApiError(409, "Conflict", "the object has been modified")
            annotations = dict(pod["metadata"].get("annotations") or {})
            for key, value in (meta.get("annotations") or {}).items():
                if value is None:
                    annotations.pop(key, None)
                else:
                    annotations[key] = value
            pod["metadata"]["annotations"] = annotations
            pod["metadata"]["resourceVersion"] = self._next_version()
            self._emit("MODIFIED", pod)
            return copy.deepcopy(pod)

    async def delete_pod(self, name: str, *, resource_version: str | None = None) -> None:
        self.requests["delete_pod"] += 1
        with self._lock:
            pod = self.pods.get((self.namespace, name))
            if pod is None:
                return
            if (
                resource_version is not None
                and resource_version != pod["metadata"]["resourceVersion"]
            ):
                raise ApiError(409, "Conflict", "precondition failed: resourceVersion")
            if pod["metadata"].get("deletionTimestamp"):
                return
            pod["metadata"]["deletionTimestamp"] = "now"
            pod["metadata"]["resourceVersion"] = self._next_version()
            self._emit("MODIFIED", pod)
            self._stopping.add(name)
        threading.Thread(target=self._terminate, args=(name,), daemon=True).start()

    async def create_secret(self, manifest: Obj) -> None:
        self.requests["create_secret"] += 1
        with self._lock:
            name = manifest["metadata"]["name"]
            if name in self.secrets:
                raise ApiError(409, "AlreadyExists", f'secrets "{name}" already exists')
            self.secrets[name] = copy.deepcopy(manifest)

    async def delete_secret(self, name: str) -> None:
        self.requests["delete_secret"] += 1
        with self._lock:
            self.secrets.pop(name, None)

    async def list_secrets(self, label_selector: str) -> list[Obj]:
        self.requests["list_secrets"] += 1
        wanted = dict(item.split("=", 1) for item in label_selector.split(","))
        with self._lock:
            return [
                copy.deepcopy(secret)
                for secret in self.secrets.values()
                if all(secret["metadata"].get("labels", {}).get(k) == v for k, v in wanted.items())
            ]

    async def describe_failure(self, pod_name: str, container: str) -> str:
        self.requests["describe_failure"] += 1
        return "client log: " + " | ".join(self.logs.get(pod_name, [])[-5:])

    async def claim_of_volume(self, pv_name: str) -> tuple[str, str] | None:
        self.requests["claim_of_volume"] += 1
        return self.claims.get(pv_name)

    async def pod_containers(self, namespace: str, name: str) -> set[str] | None:
        self.requests["pod_containers"] += 1
        with self._lock:
            pod = self.pods.get((namespace, name))
            if pod is None:
                return None
            spec = pod["spec"]
            return {
                c["name"] for c in [*spec.get("containers", []), *spec.get("initContainers", [])]
            }

    # -- the kubelet --------------------------------------------------------------------------

    def mount_pods(self) -> list[Obj]:
        with self._lock:
            return [
                copy.deepcopy(pod)
                for (namespace, _), pod in self.pods.items()
                if namespace == self.namespace
                and (pod["metadata"].get("labels") or {}).get("app.kubernetes.io/managed-by")
                == "fusecsi"
            ]

    def _argv_and_env(self, pod: Obj) -> tuple[list[str], dict[str, str]]:
        container = pod["spec"]["containers"][0]
        host_dir = next(
            volume["hostPath"]["path"]
            for volume in pod["spec"]["volumes"]
            if volume["name"] == "fusecsi-mount"
        )

        def translate(word: str) -> str:
            return (
                word.replace(CONTAINER_PREFIX, host_dir, 1) if word.startswith("/fusecsi") else word
            )

        argv = [translate(word) for word in container["command"]]
        if argv[0] == "fusecsi":
            argv = [sys.executable, "-m", "csi", *argv[1:]]
        env = dict(os.environ)
        for item in container.get("env") or []:
            ref = (item.get("valueFrom") or {}).get("secretKeyRef")
            if ref is None:
                env[item["name"]] = item.get("value", "")
            else:
                secret = self.secrets[ref["name"]]
                env[item["name"]] = secret["stringData"][ref["key"]]
        return argv, env

    def _set_status(self, name: str, *, running: bool, restarts: int) -> None:
        with self._lock:
            pod = self.pods.get((self.namespace, name))
            if pod is None:
                return
            state = {"running": {}} if running else {"terminated": {"exitCode": 1}}
            pod["status"] = {
                "phase": "Running",
                "containerStatuses": [{"name": "client", "restartCount": restarts, "state": state}],
            }
            pod["metadata"]["resourceVersion"] = self._next_version()
            self._emit("MODIFIED", pod)

    def _kubelet(self, name: str) -> None:
        restarts = 0
        while True:
            with self._lock:
                pod = self.pods.get((self.namespace, name))
                if pod is None or name in self._stopping:
                    return
                argv, env = self._argv_and_env(pod)
                process = subprocess.Popen(
                    argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
                )
                self.processes[name] = process
            self._set_status(name, running=True, restarts=restarts)
            assert process.stderr is not None
            lines = self.logs.setdefault(name, [])
            with process.stderr:
                for raw in process.stderr:
                    lines.append(raw.decode(errors="replace").rstrip())
            process.wait()
            if name in self._stopping:
                return
            self._set_status(name, running=False, restarts=restarts)
            time.sleep(self.restart_delay)
            restarts += 1

    def _terminate(self, name: str) -> None:
        process = self.processes.get(name)
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        with self._lock:
            pod = self.pods.pop((self.namespace, name), None)
            self._stopping.discard(name)
            self.processes.pop(name, None)
            if pod is not None:
                pod["metadata"]["resourceVersion"] = self._next_version()
                self._emit("DELETED", pod)

    def kill_client(self, name: str) -> None:
        """kill -9 the client process of a Mount Pod (kubelet then restarts it)."""
        process = self.processes[name]
        process.send_signal(signal.SIGKILL)

    def shutdown(self) -> None:
        """Stop every client (end of a test); pods stay in the store."""
        with self._lock:
            self._stopping.update(name for _, name in self.pods)
            processes = list(self.processes.values())
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
