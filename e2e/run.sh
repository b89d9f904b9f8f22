#!/usr/bin/env bash
# End-to-end tests on a real single-node Kubernetes built on this machine: a fresh cluster with
# fusecsi deployed (e2e/deploy.sh), e2e/tests with pytest, then the cluster is torn down (unless
# E2E_KEEP_CLUSTER=1, which also reuses a running cluster). Prints "e2e: N passed, N failed" last.
set -uo pipefail
source "$(dirname "$0")/../hack/lib.sh"
cd "$REPO_ROOT"
out=$REPO_ROOT/_out/e2e
mkdir -p "$out"

if [[ ${E2E_KEEP_CLUSTER:-0} != 1 ]]; then
  export E2E_FRESH_CLUSTER=1
  trap 'log "tearing the cluster down"; e2e/cluster/down.sh >"$out/down.log" 2>&1 || tail -n 20 "$out/down.log"' EXIT
fi
e2e/deploy.sh | tee "$out/deploy.out"
if [[ ${PIPESTATUS[0]} -ne 0 ]]; then
  echo "e2e: deploying fusecsi failed (see above and $out/)"
  echo "e2e: 0 passed, 1 failed"
  exit 1
fi
KUBECONFIG=$(sed -n 's/^KUBECONFIG=//p' "$out/deploy.out" | tail -n1)
export KUBECONFIG
KUBECTL=$(bash -c 'source e2e/cluster/lib.sh; find_kubectl')
export KUBECTL
FUSECSI_E2E_JUICEFS_IMAGE=$(containers/juicefs/build.sh --ref-only)
export FUSECSI_E2E_JUICEFS_IMAGE

log "running the end-to-end tests"
FUSECSI_E2E_KUBELET_LOG=${FUSECSI_CLUSTER_DIR:-/var/lib/fusecsi-cluster}/logs/kubelet.log \
  "$VENV/bin/python" -m pytest e2e/tests -p no:cacheprovider -o testpaths=e2e/tests --timeout=600 \
  -v --junitxml="$out/e2e.xml" 2>&1 | tee "$out/pytest.log" | grep -E '(PASSED|FAILED|ERROR|SKIPPED)|^=+|Error' | tail -n 80
log "csi-sanity against the mountpod strategy (its Mount Pods run in this cluster)"
SANITY_NODE=$("$KUBECTL" get nodes -o jsonpath='{.items[0].metadata.name}') \
SANITY_BUILTIN_IMAGE=$(containers/fusecsi/build.sh --ref-only) \
  hack/sanity.sh mountpod 2>&1 | tee "$out/sanity-mountpod.log"
"$KUBECTL" delete namespace fusecsi-sanity --ignore-not-found --wait=true --timeout=120s >/dev/null 2>&1 || true
"$VENV/bin/python" - "$out/e2e.xml" "$out/sanity-mountpod.log" <<'PY'
import re, sys, xml.etree.ElementTree as ET
suite = ET.parse(sys.argv[1]).getroot()
suite = suite if suite.tag == "testsuite" else suite[0]
tests, failures, errors, skipped = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
passed, failed = tests - failures - errors - skipped, failures + errors
# csi-sanity's specs against mountpod count with the e2e tests (they need this cluster).
text = open(sys.argv[2]).read()
match = re.search(r"^sanity: (\d+) passed, (\d+) failed$", text, re.M)
sanity_passed, sanity_failed = (int(match[1]), int(match[2])) if match else (0, 1)
passed, failed = passed + sanity_passed, failed + sanity_failed
print(f"e2e: {passed} passed, {failed} failed, {skipped} skipped")
sys.exit(1 if failed else 0)
PY
