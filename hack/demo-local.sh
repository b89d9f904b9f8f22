#!/usr/bin/env bash
# The walkthrough without Kubernetes (`make demo-local`): fusecsi on a local socket with a local directory as
# the shared filesystem, and walk through a volume's life through the CSI API, printing each
# command so that you can run it yourself. Needs root (mounts) and /dev/fuse.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

if [[ $(id -u) -ne 0 ]]; then echo "demo: needs root (it mounts volumes); run it with sudo" >&2; exit 1; fi
if [[ ! -c /dev/fuse ]]; then echo "demo: /dev/fuse is missing; the inprocess strategy needs FUSE" >&2; exit 1; fi

work=${DEMO_DIR:-/tmp/fusecsi-demo}
endpoint=unix://$work/csi.sock
export PATH=$VENV/bin:$PATH
fusecsi=fusecsi
mkdir -p "$work/data" "$work/pods"

step() { printf '\n\033[1m# %s\033[0m\n' "$1"; }
run() { printf '$ %s\n' "$*" >&2; "$@"; }

step "Start the driver (node + controller in one process) on $endpoint"
echo "\$ fusecsi all --endpoint $endpoint --root default=$work/data --allowed-target-dir $work/pods --state-dir $work/state &"
"$fusecsi" all --endpoint "$endpoint" --root "default=$work/data" --allowed-target-dir "$work/pods" \
  --state-dir "$work/state" --default-strategy hostPath >"$work/driver.log" 2>&1 &
driver=$!
cleanup() {
  "$fusecsi" client --endpoint "$endpoint" unpublish default/demo "$work/pods/app/mount" >/dev/null 2>&1 || true
  "$fusecsi" client --endpoint "$endpoint" delete default/demo >/dev/null 2>&1 || true
  kill "$driver" 2>/dev/null && wait "$driver" 2>/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 50); do "$fusecsi" client --endpoint "$endpoint" probe >/dev/null 2>&1 && break; sleep 0.2; done
run "$fusecsi" client --endpoint "$endpoint" info

step "Create a 64 MiB volume served by the inprocess strategy (a directory of the root)"
run "$fusecsi" client --endpoint "$endpoint" create demo --size 64Mi --param strategy=inprocess | tee "$work/volume.json"
context=$(python3 -c 'import json,sys; print(json.dumps(json.load(open(sys.argv[1]))["volume"]["volumeContext"]))' "$work/volume.json")

step "Publish it into a pod's target directory, as kubelet would"
run "$fusecsi" client --endpoint "$endpoint" publish default/demo "$work/pods/app/mount" --context "$context"
run grep "$work/pods/app/mount" /proc/self/mounts

step "Write and read through the mount; the data lands in the root's directory"
run sh -c "echo 'hello from a pod' > $work/pods/app/mount/hello.txt"
run cat "$work/data/demo/hello.txt"
run df -h "$work/pods/app/mount"

step "The capacity is enforced: writing 80 MiB into 64 MiB fails with ENOSPC"
run dd if=/dev/zero of="$work/pods/app/mount/big" bs=1M count=80 status=none || echo "(dd failed as expected)"
rm -f "$work/pods/app/mount/big"

step "Volume stats, as kubelet reads them"
run "$fusecsi" client --endpoint "$endpoint" stats default/demo "$work/pods/app/mount"

step "Unpublish and delete (onDelete=delete removes the directory)"
run "$fusecsi" client --endpoint "$endpoint" unpublish default/demo "$work/pods/app/mount"
run "$fusecsi" client --endpoint "$endpoint" delete default/demo
run ls "$work/data"

step "Done. The driver log is in $work/driver.log; the driver stops now."
