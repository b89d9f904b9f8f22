#!/usr/bin/env bash
# Build the Go tools the tests use, once per version, into the cache: csi-sanity
#   (kubernetes-csi/csi-test). The benchmarks build theirs in e2e/bench/build-*.sh.
# Prints nothing but the log lines; the binaries land in $FUSECSI_CACHE/bin/<name>-<version>.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

bin=$FUSECSI_CACHE/bin
mkdir -p "$bin"
export GOFLAGS=-modcacherw

sanity=$bin/csi-sanity-$CSI_SANITY_VERSION
if [[ ! -x $sanity ]]; then
  log "building csi-sanity $CSI_SANITY_VERSION (one-time, cached in $bin)"
  GOBIN=$(mktemp -d) && export GOBIN
  go install "github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity@$CSI_SANITY_VERSION"
  mv "$GOBIN/csi-sanity" "$sanity"
  rmdir "$GOBIN"
fi
