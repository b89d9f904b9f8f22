#!/usr/bin/env bash
# The main job: a real single-node Kubernetes on this machine (built from source, cached), fusecsi
# deployed from its own manifests, and one demo workload per working strategy. Prints what to try
# and how to tear down. The first run builds Kubernetes and the images (about 35 minutes on two
# cores); later runs take about a minute.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"

missing=()
[[ $(id -u) -eq 0 ]] || missing+=("root: the cluster runs kubelet and containerd, and volumes are mounts")
[[ -c /dev/fuse ]] || missing+=("/dev/fuse: the inprocess strategy serves volumes through FUSE")
command -v go >/dev/null || missing+=("Go: Kubernetes and the CSI sidecars are built from source")
if ((${#missing[@]})); then
  echo "make demo cannot start the cluster on this machine. Missing:" >&2
  printf '  - %s\n' "${missing[@]}" >&2
  echo "Without Kubernetes, try the local walkthrough: make demo-local (needs root and /dev/fuse too)." >&2
  exit 2
fi

e2e/deploy.sh | tee /tmp/fusecsi-demo-deploy.out
kubeconfig=$(sed -n 's/^KUBECONFIG=//p' /tmp/fusecsi-demo-deploy.out | tail -n1)
[[ -n $kubeconfig ]] || { echo "deploying fusecsi failed; logs in _out/e2e/" >&2; exit 1; }
kubectl=$(bash -c 'source e2e/cluster/lib.sh; find_kubectl')
k() { "$kubectl" --kubeconfig "$kubeconfig" "$@"; }

log "starting one demo workload per strategy (namespace fusecsi-demo)"
k apply -f e2e/demo/workloads.yaml >/dev/null
k -n fusecsi-demo rollout status deployment/writer-hostpath --timeout=180s >/dev/null
k -n fusecsi-demo rollout status deployment/writer-inprocess --timeout=180s >/dev/null
k -n fusecsi-demo rollout status deployment/writer-mountpod --timeout=180s >/dev/null
k -n fusecsi-demo rollout status deployment/writer-sidecar --timeout=180s >/dev/null
sleep 6
k -n fusecsi-demo get pvc,pods -o wide

cat <<TXT

fusecsi is running on a single-node Kubernetes on this machine.

  export KUBECONFIG=$kubeconfig
  alias kubectl=$kubectl

Try:
  kubectl -n fusecsi get pods                                   # node plugin, controller
  kubectl -n fusecsi-demo exec deploy/writer-hostpath -- tail -n 3 /data/log     # both replicas write here
  kubectl -n fusecsi-demo exec deploy/writer-inprocess -- df -h /data            # the 256Mi quota, as df sees it
  kubectl -n fusecsi-demo exec deploy/writer-inprocess -- dd if=/dev/zero of=/data/big bs=1M count=300   # ENOSPC
  kubectl -n fusecsi-demo patch pvc quota-inprocess -p '{"spec":{"resources":{"requests":{"storage":"512Mi"}}}}'
  kubectl -n fusecsi get pods -l app.kubernetes.io/component=mount-pod -o wide   # one Mount Pod, two writers
  kubectl -n fusecsi-demo get pod -l app=writer-sidecar -o jsonpath='{.items[0].spec.initContainers[0].securityContext}'   # the injected sidecar: no privilege
  ls /srv/fusecsi/fusecsi-demo/                                 # the volumes are directories of the root
  kubectl -n fusecsi logs daemonset/fusecsi-node -c fusecsi     # the driver's log (JSON)

Tear down:
  make cluster-down     # stops every component, removes mounts, network and state
TXT
