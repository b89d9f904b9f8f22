#!/usr/bin/env bash
# Run every benchmark in e2e/bench/ (each *.py but the shared benchlib.py) and print its tables.
# Usage: e2e/bench/run.sh   (or `make bench`, which runs hack/bootstrap.sh first)
# Installs nothing itself: the Go baseline is built once into $FUSECSI_CACHE by
# `build-go.sh hostpath-baseline` and passed to the benchmarks that take --go-baseline. Each benchmark
# bounds its own time; `timeout` here is only a backstop (SIGTERM, on which they unmount).
# Exit status: non-zero when any benchmark failed; the others still run.
set -euo pipefail
source "$(dirname "$0")/../../hack/lib.sh"

bench=$REPO_ROOT/e2e/bench
python=$VENV/bin/python
limit=${BENCH_TIMEOUT:-1800}

baseline=
if command -v go >/dev/null; then
  baseline=$("$bench/build-go.sh" hostpath-baseline) || baseline=
fi
[[ -n $baseline ]] || log "no Go toolchain or build failed: benchmarks run without the Go baseline"

status=0
for script in "$bench"/*.py; do
  name=$(basename "$script" .py)
  [[ $name == benchlib ]] && continue
  args=()
  if [[ -n $baseline ]] && grep -q -- '"--go-baseline"' "$script"; then
    args+=(--go-baseline "$baseline")
  fi
  echo
  echo "=== $name ($(date -u '+%Y-%m-%d %H:%M UTC'), load average $(cut -d' ' -f1-3 /proc/loadavg))"
  if ! (cd "$REPO_ROOT" && timeout --kill-after=60 "$limit" "$python" "$script" "${args[@]}"); then
    echo "=== $name FAILED"
    status=1
  fi
done
exit $status
