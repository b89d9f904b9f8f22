#!/usr/bin/env bash
# Build one of the benchmarks' Go programs once per source version and print the binary's path.
# Usage: build-go.sh NAME, where NAME is a directory of e2e/bench with main.go, go.mod, go.sum
# (hostpath-baseline: the Go CSI node server baseline; cycle-client: the kubelet-like client).
# The binary lands in $FUSECSI_CACHE/bin/NAME-<hash of its sources>. Log lines go to stderr;
# stdout is the path alone, for `binary=$(build-go.sh NAME)`.
set -euo pipefail
source "$(dirname "$0")/../../hack/lib.sh"

name=${1:?usage: build-go.sh NAME (hostpath-baseline or cycle-client)}
src=$REPO_ROOT/e2e/bench/$name
[[ -f $src/main.go ]] || { echo "build-go.sh: no Go program at $src" >&2; exit 2; }
hash=$(cat "$src/main.go" "$src/go.mod" "$src/go.sum" | sha256sum | cut -c1-16)
binary=$FUSECSI_CACHE/bin/$name-$hash
if [[ ! -x $binary ]]; then
  log "building $name (one-time, cached as $binary)"
  mkdir -p "$FUSECSI_CACHE/bin"
  (cd "$src" && GOFLAGS=-modcacherw nice -n 10 go build -trimpath -o "$binary.tmp" .)
  mv "$binary.tmp" "$binary"
fi
echo "$binary"
