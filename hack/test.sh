#!/usr/bin/env bash
# Every test, in order of cost: static checks, unit tests (real mounts), csi-sanity per
# strategy, then the end-to-end tests on the local cluster. Each stage reports its counts; the
# last line is the total, "N passed, N failed". Exit status non-zero when anything failed.
set -uo pipefail
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"

passed=0 failed=0
out=$(mktemp -d /tmp/fusecsi-test.XXXXXX)
record() { # record NAME STATUS: one check that passes or fails as a whole
  if [[ $2 -eq 0 ]]; then passed=$((passed + 1)); echo "check $1: passed"; else failed=$((failed + 1)); echo "check $1: FAILED"; fi
}
count() { # count LOG PREFIX: add the "N passed, N failed" numbers a stage printed last
  local line p f
  line=$(grep -E "^(${2}: )?[0-9]+ passed, [0-9]+ failed" "$1" | tail -n1)
  if [[ -z $line ]]; then failed=$((failed + 1)); echo "$2: printed no summary: counted as 1 failed"; return; fi
  p=$(sed -nE 's/^.*\b([0-9]+) passed.*/\1/p' <<<"$line"); f=$(sed -nE 's/^.*\b([0-9]+) failed.*/\1/p' <<<"$line")
  passed=$((passed + ${p:-0})) failed=$((failed + ${f:-0}))
}

log "static checks"
"$VENV/bin/ruff" check . >"$out/ruff.log" 2>&1; s=$?; record ruff $s; ((s)) && cat "$out/ruff.log"
"$VENV/bin/ruff" format --check . >"$out/format.log" 2>&1; s=$?; record ruff-format $s; ((s)) && cat "$out/format.log"
"$VENV/bin/mypy" >"$out/mypy.log" 2>&1; s=$?; record mypy-strict $s; ((s)) && cat "$out/mypy.log"
protos/generate.sh --check >"$out/protos.log" 2>&1; s=$?; record protos-reproducible $s; ((s)) && cat "$out/protos.log"

log "the Helm chart renders what kustomize renders"
hack/check-helm.sh >"$out/helm.log" 2>&1; tail -n 1 "$out/helm.log"
grep -q "helm-chart: [0-9]* passed, 0 failed" "$out/helm.log" || cat "$out/helm.log"
count "$out/helm.log" helm-chart

log "unit tests"
"$VENV/bin/python" -m pytest unit -q -p no:cacheprovider --junitxml="$out/unit.xml" 2>&1 | tee "$out/unit.log" | tail -n 30
unit_counts=$("$VENV/bin/python" - "$out/unit.xml" <<'PY'
import sys, xml.etree.ElementTree as ET
suite = ET.parse(sys.argv[1]).getroot()
suite = suite if suite.tag == "testsuite" else suite[0]
tests, failures, errors, skipped = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
print(f"{tests - failures - errors - skipped} passed, {failures + errors} failed, {skipped} skipped")
PY
) || unit_counts="0 passed, 1 failed"
echo "unit: $unit_counts"
echo "unit: $unit_counts" >"$out/unit.count"; count "$out/unit.count" unit

log "csi-sanity, per strategy"
hack/sanity.sh 2>&1 | tee "$out/sanity.log"
count "$out/sanity.log" sanity

if [[ -x e2e/run.sh ]]; then
  log "end-to-end tests on the local cluster"
  e2e/run.sh 2>&1 | tee "$out/e2e.log"
  count "$out/e2e.log" e2e
fi

echo "$passed passed, $failed failed"
((failed == 0))
