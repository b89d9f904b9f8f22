#!/usr/bin/env bash
# Build helm from its Go module, once per version, into the cache, and print the binary's path:
#   $FUSECSI_CACHE/bin/helm-<version>
# helm.sh/helm/v3 has no replace directives, so a plain `go install` builds it. The version
# variables are stamped as upstream's Makefile does, so `helm version` and the default
# .Capabilities.KubeVersion of `helm template` are the release's.
# Logs go to stderr; stdout is only the path, so `helm=$(hack/helm.sh)` works.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

HELM_VERSION=${HELM_VERSION:-v3.22.0}
bin=$FUSECSI_CACHE/bin
helm=$bin/helm-$HELM_VERSION

if [[ ! -x $helm ]]; then
  command -v go >/dev/null || { log "go is required to build helm"; exit 1; }
  mkdir -p "$bin"
  export GOFLAGS=-modcacherw
  log "building helm $HELM_VERSION (one-time, cached in $bin)"
  # client-go v0.X.Y stands for Kubernetes 1.X, the version helm reports by default.
  gomod=$(go mod download -json "helm.sh/helm/v3@$HELM_VERSION" |
    sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')
  kube_minor=$(sed -n 's/^[[:space:]]*k8s.io\/client-go v0\.\([0-9]*\)\..*/\1/p' "$gomod")
  ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
  if [[ -n $kube_minor ]]; then
    for pkg in pkg/lint/rules pkg/chartutil; do
      ldflags+=" -X helm.sh/helm/v3/$pkg.k8sVersionMajor=1 -X helm.sh/helm/v3/$pkg.k8sVersionMinor=$kube_minor"
    done
  fi
  GOBIN=$(mktemp -d) && export GOBIN
  trap 'rm -rf "$GOBIN"' EXIT
  CGO_ENABLED=0 nice -n 10 go install -trimpath -ldflags "$ldflags" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" >&2
  mv "$GOBIN/helm" "$helm.tmp"
  mv "$helm.tmp" "$helm"
fi
echo "$helm"
