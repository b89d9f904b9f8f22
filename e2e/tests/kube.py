"""A thin, typed wrapper around kubectl for the end-to-end tests.

kubectl (rather than an API client) keeps every step of a test something a reader can paste
into a shell against the same cluster.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


class KubectlError(RuntimeError):
    pass


@dataclass(frozen=True)
class Kubectl:
    kubeconfig: str
    binary: str = "kubectl"

    def run(
        self, *args: str, stdin: str | None = None, check: bool = True, timeout: float = 120
    ) -> str:
        command = [self.binary, f"--kubeconfig={self.kubeconfig}", *args]
        result = subprocess.run(
            command, input=stdin, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise KubectlError(f"$ {shlex.join(command)}\n{result.stderr.strip()}")
        return result.stdout

    def apply(self, manifest: str, namespace: str | None = None) -> None:
        args = ["apply", "-f", "-"] + (["-n", namespace] if namespace else [])
        self.run(*args, stdin=manifest)

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict[str, Any]:
        args = ["get", kind, name, "-o", "json"] + (["-n", namespace] if namespace else [])
        return json.loads(self.run(*args))  # type: ignore[no-any-return]

    def get_or_none(
        self, kind: str, name: str, namespace: str | None = None
    ) -> dict[str, Any] | None:
        args = ["get", kind, name, "-o", "json", "--ignore-not-found"] + (
            ["-n", namespace] if namespace else []
        )
        out = self.run(*args)
        return json.loads(out) if out.strip() else None

    def exec(self, namespace: str, pod: str, command: str, *, check: bool = True) -> str:
        return self.run("exec", "-n", namespace, pod, "--", "sh", "-c", command, check=check)

    def events_for(self, namespace: str, name: str) -> list[str]:
        out = self.run(
            "get",
            "events",
            "-n",
            namespace,
            "-o",
            "json",
            "--field-selector",
            f"involvedObject.name={name}",
        )
        return [f"{e.get('reason')}: {e.get('message')}" for e in json.loads(out)["items"]]


def wait_for(
    what: str, probe: Callable[[], T | None], timeout: float = 120, interval: float = 1.0
) -> T:
    """Call `probe` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = probe()
        except (KubectlError, subprocess.TimeoutExpired) as exc:
            last = exc
        if last and not isinstance(last, Exception):
            return last  # type: ignore[no-any-return]
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what} (last: {last})")


def kubeconfig_from_env() -> str | None:
    return os.environ.get("KUBECONFIG") or None
