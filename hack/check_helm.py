"""Check that the Helm chart renders the same objects as the kustomize manifests.

Run by hack/check-helm.sh, which builds helm first:

    .venv/bin/python hack/check_helm.py --helm PATH [--kubectl kubectl]

Each check prints PASS or FAIL with the reason (a unified diff per differing object for the
comparison with kustomize); the last line is `helm-chart: N passed, N failed`.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import os
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "containers" / "helm" / "fusecsi"
DEPLOY = REPO / "containers" / "deploy"
RELEASE = "fusecsi"
NAMESPACE = "fusecsi"
DEFAULT_KUBELET_DIR = "/var/lib/kubelet"
DEFAULT_MOUNTPOD_DIR = "/var/lib/fusecsi/mountpods"
DEFAULT_WEBHOOK_NAME = "fusecsi-sidecar-injector"
CONTROLLER = "fusecsi-controller"

# Labels only Helm sets. They are left out of the comparison of objects' and pod templates'
# labels unless the kustomize output has them as labels too. Selectors (matchLabels) are compared
# as they are: a selector must select the same pods whichever way the objects were applied (the
# Mount Pods' PodDisruptionBudget selects app.kubernetes.io/managed-by=fusecsi, the driver's label).
HELM_ONLY_LABELS = {
    "helm.sh/chart",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
}

Obj = dict[str, Any]
Key = tuple[str, str, str]


class CheckFailed(Exception):
    """A check's failure; the message says why."""


# --- running the tools ---------------------------------------------------------------------------


def run(argv: list[str], cwd: Path = REPO) -> str:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise CheckFailed(
            f"`{' '.join(argv)}` exited with {proc.returncode}:\n{proc.stderr.strip()}"
        )
    return proc.stdout


def helm_template(
    helm: str, *extra: str, release: str = RELEASE, namespace: str = NAMESPACE
) -> str:
    return run(
        [helm, "template", release, str(CHART), "--namespace", namespace, *extra],
    )


def kustomize(kubectl: str) -> str:
    """`kubectl kustomize` of an overlay that is base + examples, written to a temporary dir."""
    with tempfile.TemporaryDirectory(prefix="fusecsi-check-helm-") as tmp:
        # kustomize takes no absolute resource paths: name them relative to the overlay.
        rel = os.path.relpath(DEPLOY, tmp)
        Path(tmp, "kustomization.yaml").write_text(
            "apiVersion: kustomize.config.k8s.io/v1beta1\n"
            "kind: Kustomization\n"
            "resources:\n"
            f"  - {rel}/base\n"
            f"  - {rel}/examples\n"
        )
        return run([kubectl, "kustomize", tmp])


def parse(text: str) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def key_of(obj: Obj) -> Key:
    meta = obj.get("metadata") or {}
    return (obj.get("kind", "?"), meta.get("namespace", ""), meta.get("name", "?"))


def show_key(key: Key) -> str:
    kind, namespace, name = key
    return f"{kind} {namespace + '/' if namespace else ''}{name}"


def index(objs: Iterable[Obj]) -> dict[Key, Obj]:
    out: dict[Key, Obj] = {}
    for obj in objs:
        key = key_of(obj)
        if key in out:
            raise CheckFailed(f"{show_key(key)} is rendered twice")
        out[key] = obj
    return out


# --- normalizing ---------------------------------------------------------------------------------


def label_maps(obj: Any) -> Iterable[dict[str, Any]]:
    """Every labels map in an object: metadata.labels and pod template labels (not selectors)."""
    if isinstance(obj, dict):
        for name, value in obj.items():
            if name == "labels" and isinstance(value, dict):
                yield value
            else:
                yield from label_maps(value)
    elif isinstance(obj, list):
        for item in obj:
            yield from label_maps(item)


def drop_labels(obj: Any, names: set[str]) -> None:
    """Remove the labels named from every labels map (not selectors); remove maps left empty."""
    if isinstance(obj, dict):
        for name in list(obj):
            value = obj[name]
            if name == "labels" and isinstance(value, dict):
                for label in names & set(value):
                    del value[label]
                if not value:
                    del obj[name]
            else:
                drop_labels(value, names)
    elif isinstance(obj, list):
        for item in obj:
            drop_labels(item, names)


def normalize(obj: Obj, helm_only: set[str]) -> Obj:
    out = copy.deepcopy(obj)
    drop_labels(out, helm_only)
    # TOML files in ConfigMaps are compared as what the driver reads, not as text.
    if out.get("kind") == "ConfigMap":
        for name, value in (out.get("data") or {}).items():
            if name.endswith(".toml") and isinstance(value, str):
                try:
                    out["data"][name] = {"parsed TOML": tomllib.loads(value)}
                except tomllib.TOMLDecodeError as exc:
                    out["data"][name] = {"invalid TOML": str(exc), "text": value}
    return out


def dump(obj: Obj) -> list[str]:
    text: str = yaml.safe_dump(obj, sort_keys=True, default_flow_style=False)
    return text.splitlines(keepends=True)


def compare(kustomized: list[Obj], rendered: list[Obj]) -> list[str]:
    """The differences between the two object sets, readable; empty when they are the same."""
    present = {label for labels in label_maps(kustomized) for label in labels}
    helm_only = HELM_ONLY_LABELS - present
    want = {k: normalize(v, helm_only) for k, v in index(kustomized).items()}
    got = {k: normalize(v, helm_only) for k, v in index(rendered).items()}
    problems = []
    for key in sorted(want.keys() | got.keys()):
        if key not in got:
            problems.append(f"only in kustomize: {show_key(key)}\n")
        elif key not in want:
            problems.append(f"only in helm: {show_key(key)}\n")
        elif want[key] != got[key]:
            diff = difflib.unified_diff(
                dump(want[key]),
                dump(got[key]),
                fromfile=f"kustomize: {show_key(key)}",
                tofile=f"helm: {show_key(key)}",
            )
            problems.append("".join(diff))
    return problems


# --- looking into objects ------------------------------------------------------------------------


def find(objs: list[Obj], kind: str, name: str | None = None) -> Obj:
    found = [
        o for o in objs if o.get("kind") == kind and (name is None or o["metadata"]["name"] == name)
    ]
    if len(found) != 1:
        raise CheckFailed(f"expected one {kind} {name or ''}, found {len(found)}")
    return found[0]


def pod_spec(objs: list[Obj], kind: str, name: str | None = None) -> Obj:
    spec: Obj = find(objs, kind, name)["spec"]["template"]["spec"]
    return spec


def container(spec: Obj, name: str) -> Obj:
    for c in spec["containers"]:
        if c["name"] == name:
            return dict(c)
    raise CheckFailed(f"no container {name}")


def volume(spec: Obj, name: str) -> Obj:
    for v in spec.get("volumes", []):
        if v["name"] == name:
            return dict(v)
    raise CheckFailed(f"no volume {name}")


def mount(c: Obj, name: str) -> Obj:
    for m in c.get("volumeMounts", []):
        if m["name"] == name:
            return dict(m)
    raise CheckFailed(f"container {c['name']} does not mount {name}")


def expect(what: str, got: Any, want: Any) -> None:
    if got != want:
        raise CheckFailed(f"{what}: got {got!r}, want {want!r}")


def config_toml(objs: list[Obj]) -> dict[str, Any]:
    text = find(objs, "ConfigMap")["data"]["config.toml"]
    return tomllib.loads(text)


# --- the checks ----------------------------------------------------------------------------------


def check_lint(helm: str, kubectl: str) -> None:
    run([helm, "lint", "--strict", str(CHART), "--namespace", NAMESPACE])


def check_same_as_kustomize(helm: str, kubectl: str) -> None:
    kustomized = parse(kustomize(kubectl))
    rendered = parse(helm_template(helm))
    problems = compare(kustomized, rendered)
    if problems:
        raise CheckFailed(
            f"{len(problems)} object(s) differ (- kustomize, + helm):\n" + "\n".join(problems)
        )
    print(f"  {len(rendered)} objects, the same in both")


def check_kubelet_dir(helm: str, kubectl: str) -> None:
    kubelet = "/data/kubelet"
    text = helm_template(helm, "--set", f"kubeletDir={kubelet}")
    left = [line.strip() for line in text.splitlines() if DEFAULT_KUBELET_DIR in line]
    if left:
        raise CheckFailed(f"{DEFAULT_KUBELET_DIR} is still rendered:\n  " + "\n  ".join(left))
    objs = parse(text)
    spec = pod_spec(objs, "DaemonSet")
    plugin = container(spec, "fusecsi")
    registrar = container(spec, "node-driver-registrar")
    plugin_dir = f"{kubelet}/plugins/csi.fusecsi.io"
    expect("kubelet-dir hostPath", volume(spec, "kubelet-dir")["hostPath"]["path"], kubelet)
    expect("kubelet-dir mountPath", mount(plugin, "kubelet-dir")["mountPath"], kubelet)
    expect("socket-dir hostPath", volume(spec, "socket-dir")["hostPath"]["path"], plugin_dir)
    expect(
        "registration-dir hostPath",
        volume(spec, "registration-dir")["hostPath"]["path"],
        f"{kubelet}/plugins_registry",
    )
    expect(
        "--allowed-target-dir",
        [a for a in plugin["args"] if a.startswith("--allowed-target-dir=")],
        [f"--allowed-target-dir={kubelet}"],
    )
    expect(
        "--kubelet-registration-path",
        [a for a in registrar["args"] if a.startswith("--kubelet-registration-path=")],
        [f"--kubelet-registration-path={plugin_dir}/csi.sock"],
    )


def check_custom_values(helm: str, kubectl: str) -> None:
    """Several roots, another driver name, a log level, ... reach every place they belong."""
    driver = "fuse.example.com"
    mountpod_dir = "/data/fusecsi/mountpods"
    roots = {"default": "/mnt/jfs", "scratch": "/mnt/scratch"}
    text = helm_template(
        helm,
        "--set",
        f"driverName={driver}",
        *[arg for name, path in roots.items() for arg in ("--set", f"roots.{name}={path}")],
        "--set",
        "logLevel=DEBUG",
        "--set",
        "controller.replicas=2",
        "--set",
        "namespace.create=false",
        "--set",
        f"mountPodDir={mountpod_dir}",
        "--set",
        "webhook.replicas=3",
        "--set",
        "clientImages.juicefs=registry.example/juicefs:1.4.1",
    )
    left = [line.strip() for line in text.splitlines() if DEFAULT_MOUNTPOD_DIR in line]
    if left:
        raise CheckFailed(f"{DEFAULT_MOUNTPOD_DIR} is still rendered:\n  " + "\n  ".join(left))
    objs = parse(text)
    expect("Namespace objects", [o for o in objs if o["kind"] == "Namespace"], [])
    expect(
        "config.toml",
        config_toml(objs),
        {
            "default_strategy": "hostPath",
            "log_format": "json",
            "log_level": "DEBUG",
            "roots": roots,
            "client_images": {"juicefs": "registry.example/juicefs:1.4.1"},
        },
    )
    expect("CSIDriver name", find(objs, "CSIDriver")["metadata"]["name"], driver)
    for sc in (o for o in objs if o["kind"] == "StorageClass"):
        expect(f"StorageClass {sc['metadata']['name']} provisioner", sc["provisioner"], driver)
    expect("controller replicas", find(objs, "Deployment", CONTROLLER)["spec"]["replicas"], 2)
    webhook = find(objs, "Deployment", DEFAULT_WEBHOOK_NAME)
    expect("webhook replicas", webhook["spec"]["replicas"], 3)
    webhook_args = container(webhook["spec"]["template"]["spec"], "webhook")["args"]
    expect("webhook --driver-name", webhook_args.count(f"--driver-name={driver}"), 1)
    expect(
        "webhook --webhook-config-name (the release keeps the default name)",
        [a for a in webhook_args if a.startswith("--webhook-config-name")],
        [],
    )
    for kind, name in (("DaemonSet", None), ("Deployment", CONTROLLER)):
        spec = pod_spec(objs, kind, name)
        driver_container = container(spec, "fusecsi")
        expect(
            f"{kind} --driver-name", driver_container["args"].count(f"--driver-name={driver}"), 1
        )
        for name, path in roots.items():
            expect(
                f"{kind} volume root-{name}", volume(spec, f"root-{name}")["hostPath"]["path"], path
            )
            expect(
                f"{kind} mount root-{name}",
                mount(driver_container, f"root-{name}")["mountPath"],
                path,
            )
    spec = pod_spec(objs, "DaemonSet")
    expect(
        "socket-dir hostPath",
        volume(spec, "socket-dir")["hostPath"]["path"],
        f"{DEFAULT_KUBELET_DIR}/plugins/{driver}",
    )
    registration = f"--kubelet-registration-path={DEFAULT_KUBELET_DIR}/plugins/{driver}/csi.sock"
    expect(
        "--kubelet-registration-path",
        registration in container(spec, "node-driver-registrar")["args"],
        True,
    )
    plugin = container(spec, "fusecsi")
    expect("mountpods hostPath", volume(spec, "mountpods")["hostPath"]["path"], mountpod_dir)
    expect("mountpods mountPath", mount(plugin, "mountpods")["mountPath"], mountpod_dir)
    expect(
        "--mountpod-dir",
        [a for a in plugin["args"] if a.startswith("--mountpod-dir=")],
        [f"--mountpod-dir={mountpod_dir}"],
    )
    expect(
        "controller --mountpod-dir",
        [
            a
            for a in container(pod_spec(objs, "Deployment", CONTROLLER), "fusecsi")["args"]
            if "mountpod" in a
        ],
        [],
    )


def check_webhook(helm: str, kubectl: str) -> None:
    """webhook.enabled=false renders none of its objects; another release gets its own names,
    passes them to the driver, and the webhook's Service is looked up in the release namespace."""
    objs = parse(helm_template(helm, "--set", "webhook.enabled=false"))
    left = [
        show_key(key_of(o))
        for o in objs
        if o["kind"] == "MutatingWebhookConfiguration"
        or "sidecar-injector" in o["metadata"]["name"]
    ]
    expect("objects rendered with webhook.enabled=false", left, [])

    release, namespace = "store", "storage"
    name = f"{release}-fusecsi-sidecar-injector"
    objs = parse(helm_template(helm, release=release, namespace=namespace))
    mwc = find(objs, "MutatingWebhookConfiguration")
    expect("MutatingWebhookConfiguration name", mwc["metadata"]["name"], name)
    expect(
        "clientConfig.service",
        [w["clientConfig"]["service"] for w in mwc["webhooks"]],
        [{"name": name, "namespace": namespace, "path": "/mutate", "port": 443}],
    )
    service = find(objs, "Service", name)
    expect("Service namespace", service["metadata"]["namespace"], namespace)
    deployment = find(objs, "Deployment", name)
    spec = deployment["spec"]["template"]["spec"]
    expect("webhook serviceAccountName", spec["serviceAccountName"], name)
    expect(
        "Service selects the webhook's pods",
        service["spec"]["selector"].items()
        <= deployment["spec"]["template"]["metadata"]["labels"].items(),
        True,
    )
    webhook = container(spec, "webhook")
    expect(
        "webhook --webhook-config-name",
        [a for a in webhook["args"] if a.startswith("--webhook-config-name")],
        [f"--webhook-config-name={name}"],
    )
    expect("webhook --driver-name", [a for a in webhook["args"] if "driver-name" in a], [])
    expect(
        "webhook config volume",
        volume(spec, "config")["configMap"]["name"],
        f"{release}-fusecsi-config",
    )
    expect(
        "ClusterRole resourceNames",
        [
            r.get("resourceNames")
            for r in find(objs, "ClusterRole", name)["rules"]
            if "resourceNames" in r
        ],
        [[name]],
    )
    expect(
        "Role resourceNames",
        [r.get("resourceNames") for r in find(objs, "Role", name)["rules"] if "resourceNames" in r],
        [[f"{name}-tls"]],
    )
    for kind in ("ClusterRoleBinding", "RoleBinding"):
        expect(
            f"{kind} subjects",
            find(objs, kind, name)["subjects"],
            [{"kind": "ServiceAccount", "name": name, "namespace": namespace}],
        )


def check_bad_values_fail(helm: str, kubectl: str) -> None:
    """Values that would give broken objects fail the render, naming the value."""
    cases = {
        "roots.Scratch=/mnt/scratch": "roots: name",
        "roots.scratch=relative/path": "must be an absolute host path",
        "kubeletDir=var/lib/kubelet": "kubeletDir must be an absolute path",
        "mountPodDir=mountpods": "mountPodDir must be an absolute path",
    }
    for setting, message in cases.items():
        try:
            helm_template(helm, "--set", setting)
        except CheckFailed as exc:
            if message not in str(exc):
                raise CheckFailed(f"--set {setting} failed without {message!r}: {exc}") from exc
        else:
            raise CheckFailed(f"--set {setting} rendered; it should fail with {message!r}")


CHECKS: list[tuple[str, Callable[[str, str], None]]] = [
    ("helm lint --strict", check_lint),
    ("default values render the kustomize base + examples", check_same_as_kustomize),
    ("kubeletDir=/data/kubelet leaves no /var/lib/kubelet", check_kubelet_dir),
    (
        "roots, driverName, logLevel, replicas, namespace.create, mountPodDir, webhook.replicas, "
        "clientImages",
        check_custom_values,
    ),
    ("webhook: enabled=false, another release name and namespace", check_webhook),
    ("bad values fail the render", check_bad_values_fail),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--helm", required=True, help="the helm binary (hack/helm.sh prints it)")
    parser.add_argument("--kubectl", default=os.environ.get("KUBECTL", "kubectl"))
    args = parser.parse_args()
    passed = failed = 0
    for name, check in CHECKS:
        try:
            check(args.helm, args.kubectl)
        except CheckFailed as exc:
            failed += 1
            print(f"FAIL {name}\n{exc}\n", flush=True)
        else:
            passed += 1
            print(f"PASS {name}", flush=True)
    print(f"helm-chart: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
