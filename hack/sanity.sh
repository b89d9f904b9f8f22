#!/usr/bin/env bash
# Run csi-sanity (kubernetes-csi/csi-test) against fusecsi, once per strategy.
# Usage: hack/sanity.sh [STRATEGY...]   (default: every strategy that runs without a cluster)
# mountpod needs the local cluster (e2e/run.sh runs it there): KUBECONFIG, the cluster's node
# name in SANITY_NODE and the builtin client's image in SANITY_BUILTIN_IMAGE. Its Mount Pods run
# in the namespace fusecsi-sanity on that node, which is this machine, so the driver started
# here sees their mounts.
# sidecar runs here too: the target sits in a pod-like directory, and a loop plays kubelet
# restarting the pod's `fusecsi sidecar`, which takes each published fd and serves it.
# For each strategy it prints csi-sanity's "Ran N of M Specs" line and "N passed, N failed";
# the last line sums them up. Exit status: non-zero when any spec failed.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

strategies=("$@")
((${#strategies[@]})) || strategies=(hostPath inprocess sidecar)
"$REPO_ROOT/hack/go-tools.sh"
sanity=$FUSECSI_CACHE/bin/csi-sanity-$CSI_SANITY_VERSION

total_passed=0 total_failed=0 status=0
for strategy in "${strategies[@]}"; do
  work=$(mktemp -d /tmp/fusecsi-sanity.XXXXXX)
  mkdir -p "$work/data" "$work/mnt"
  printf 'strategy: %s\n' "$strategy" >"$work/parameters.yaml"
  extra=() node=sanity-node mountdir=$work/mnt/target sidecar=
  if [[ $strategy == mountpod ]]; then
    : "${KUBECONFIG:?mountpod sanity needs KUBECONFIG (the local cluster)}"
    node=${SANITY_NODE:?} extra=(--kubeconfig "$KUBECONFIG" --namespace fusecsi-sanity
      --client-image "builtin=${SANITY_BUILTIN_IMAGE:?}" --mountpod-ready-timeout 60)
    printf 'client: builtin\ndeleteDelay: 0s\n' >>"$work/parameters.yaml"
    # Mount Pods mount the root with HostToContainer propagation, which needs a shared host
    # mount: e2e/deploy.sh made /srv/fusecsi one.
    data=${SANITY_SHARED_ROOT:-/srv/fusecsi}/.sanity-$(basename "$work")
    mkdir -p "$data" && rmdir "$work/data" && ln -s "$data" "$work/data"
    "${KUBECTL:-kubectl}" create namespace fusecsi-sanity --dry-run=client -o yaml |
      "${KUBECTL:-kubectl}" label --local -f - -o yaml pod-security.kubernetes.io/enforce=privileged |
      "${KUBECTL:-kubectl}" apply -f - >/dev/null
  fi
  if [[ $strategy == sidecar ]]; then
    # kubelet's layout: <pods>/<uid>/volumes/kubernetes.io~csi/<volume>/<target>, and the
    # pod's emptyDir where the node plugin listens for the sidecar.
    mountdir=$work/mnt/pods/sanity/volumes/kubernetes.io~csi/vol
    emptydir=$work/mnt/pods/sanity/volumes/kubernetes.io~empty-dir/fusecsi-sidecar
    mkdir -p "$emptydir" "$(dirname "$mountdir")"
    key=$("$VENV/bin/python" -c 'from strategies.sidecar import contract; print(contract.inline_key("vol"))')
    (cd "$emptydir" && while :; do "$VENV/bin/fusecsi" sidecar --socket "$key.sock" 2>>"$work/sidecar.log"; sleep 0.1; done) &
    sidecar=$!
  fi
  "$VENV/bin/fusecsi" all "${extra[@]}" \
    --endpoint "unix://$work/csi.sock" --node-id "$node" \
    --root "default=$(readlink -f "$work/data")" --allowed-target-dir "$work/mnt" \
    --state-dir "$work/state" --default-strategy "$strategy" \
    --log-level DEBUG >"$work/driver.log" 2>&1 &
  driver=$!
  for _ in $(seq 100); do [[ -S $work/csi.sock ]] && break; sleep 0.1; done

  set +e
  "$sanity" -csi.endpoint "unix://$work/csi.sock" \
    -csi.mountdir "$mountdir" -csi.stagingdir "$work/mnt/staging" \
    -csi.testvolumeparameters "$work/parameters.yaml" \
    -ginkgo.no-color \
    -ginkgo.junit-report "$work/junit.xml" >"$work/sanity.log" 2>&1
  result=$?
  set -e
  kill -TERM "$driver" 2>/dev/null; wait "$driver" 2>/dev/null || true
  if [[ -n $sidecar ]]; then
    pkill -TERM -P "$sidecar" 2>/dev/null; kill -TERM "$sidecar" 2>/dev/null
    wait "$sidecar" 2>/dev/null || true
  fi

  ran=$(grep -m1 -E '^Ran [0-9]+ of [0-9]+ Specs' "$work/sanity.log" || echo "Ran ? of ? Specs (no summary)")
  summary=$(grep -m1 -E '(SUCCESS|FAIL)! -- ' "$work/sanity.log" || true)
  passed=$(sed -nE 's/.* ([0-9]+) Passed.*/\1/p' <<<"$summary")
  failed=$(sed -nE 's/.* ([0-9]+) Failed.*/\1/p' <<<"$summary")
  passed=${passed:-0} failed=${failed:-0}
  if ((result != 0)) && ((failed == 0)); then failed=1; fi
  echo "csi-sanity [$strategy]: $ran"
  echo "csi-sanity [$strategy]: $passed passed, $failed failed"
  # Every skipped spec names the capability fusecsi does not advertise: show them grouped.
  [[ -f $work/junit.xml ]] && "$VENV/bin/python" - "$work/junit.xml" "$strategy" <<'PY'
import collections, sys, xml.etree.ElementTree as ET
reasons = collections.Counter(
    (case.find("skipped").get("message") or "").removeprefix("skipped - ")
    for case in ET.parse(sys.argv[1]).getroot().iter("testcase")
    if case.find("skipped") is not None
)
print(f"csi-sanity [{sys.argv[2]}]: skipped: " + "; ".join(f"{n} x {r}" for r, n in sorted(reasons.items())))
PY
  if ((failed)); then
    status=1
    grep -E '^\s*\[FAIL\]|^  \[FAILED\]|• \[FAILED\]' "$work/sanity.log" | head -40 || true
    echo "(full log: $work/sanity.log, driver log: $work/driver.log)"
  else
    [[ -L $work/data ]] && rm -rf "$(readlink -f "$work/data")"
    rm -rf "$work"
  fi
  total_passed=$((total_passed + passed)) total_failed=$((total_failed + failed))
done
echo "sanity: $total_passed passed, $total_failed failed"
exit $status
