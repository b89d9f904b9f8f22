#!/usr/bin/env bash
# Build the Go benchmark client (cycle-client/) once per source version and print the binary's
# path: $FUSECSI_CACHE/bin/cycle-client-<hash of main.go, go.mod, go.sum>.
# Log lines go to stderr; stdout is the path alone, for `client=$(build-cycle-client.sh)`.
set -euo pipefail
source "$(dirname "$0")/../../hack/lib.sh"

src=$REPO_ROOT/e2e/bench/cycle-client
hash=$(cat "$src/main.go" "$src/go.mod" "$src/go.sum" | sha256sum | cut -c1-16)
binary=$FUSECSI_CACHE/bin/cycle-client-$hash
if [[ ! -x $binary ]]; then
  log "building the Go benchmark client (one-time, cached as $binary)"
  mkdir -p "$FUSECSI_CACHE/bin"
  (cd "$src" && GOFLAGS=-modcacherw nice -n 10 go build -trimpath -o "$binary.tmp" .)
  mv "$binary.tmp" "$binary"
fi
echo "$binary"
