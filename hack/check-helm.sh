#!/usr/bin/env bash
# Check that the Helm chart (containers/helm/fusecsi) renders the same objects as the kustomize
# manifests (containers/deploy/base + examples), and that its values reach every place they
# belong. Builds helm once (hack/helm.sh); needs kubectl (for `kubectl kustomize`) and the venv.
# The last line is `helm-chart: N passed, N failed`; the exit code is non-zero on a failure.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

[[ -x $VENV/bin/python ]] || "$REPO_ROOT/hack/bootstrap.sh"
command -v "${KUBECTL:-kubectl}" >/dev/null || { log "kubectl is required (kubectl kustomize)"; exit 1; }
helm=$("$REPO_ROOT/hack/helm.sh")
exec "$VENV/bin/python" "$REPO_ROOT/hack/check_helm.py" --helm "$helm" "$@"
