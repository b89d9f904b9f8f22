#!/usr/bin/env bash
# Checks that the cluster started by up.sh really works, the way the CSI driver will use it:
#   - the node is Ready and kubectl can list nodes and pods;
#   - a busybox pod runs, gets a pod IP, and reaches the apiserver through the `kubernetes`
#     service IP (10.0.0.1:443), with and without its service-account token;
#   - a privileged pod mounts a tmpfs into a hostPath volume with Bidirectional propagation,
#     and the host sees that mount and its content.
# Everything it creates lives in its own namespace, deleted at the end. Prints one line per
# check and a closing "N passed, N failed" line; exits non-zero on any failure.

set -euo pipefail

# shellcheck source=images.sh
source "$(dirname "${BASH_SOURCE[0]}")/images.sh"

KUBECTL=$(find_kubectl) || die "kubectl not found"
export KUBECONFIG=${KUBECONFIG:-$KUBECONFIG_ADMIN}
NS=fusecsi-smoke
PROP_DIR=$KUBELET_DIR/fusecsi-smoke-propagation
kc() { "$KUBECTL" -n "$NS" "$@"; }

passed=0
failed=0
check() {
    local what=$1
    shift
    if "$@"; then
        echo "PASS: $what"
        passed=$((passed + 1))
    else
        echo "FAIL: $what"
        failed=$((failed + 1))
    fi
}

cleanup() {
    "$KUBECTL" delete namespace "$NS" --wait=true --timeout=60s >/dev/null 2>&1 || true
    # The container's mount went away with it; the directory is ours to remove.
    umount "$PROP_DIR/mnt" 2>/dev/null || true
    rm -rf --one-file-system "$PROP_DIR"
}
trap cleanup EXIT

node_ready() { "$KUBECTL" wait --for=condition=Ready --timeout=60s "node/$NODE_NAME" >/dev/null; }
lists_work() { "$KUBECTL" get nodes,pods -A >/dev/null; }

create_pods() {
    "$KUBECTL" create namespace "$NS" >/dev/null
    # Pods cannot be created before the namespace's default service account exists.
    wait_for "service account in $NS" 60 "" kc get serviceaccount default
    kc apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata: {name: client}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: busybox
    image: $BUSYBOX_IMAGE
    command: [sh, -c, "sleep 3600"]
---
apiVersion: v1
kind: Pod
metadata: {name: propagation}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: busybox
    image: $BUSYBOX_IMAGE
    command: [sh, -c, "mkdir -p /host/mnt && mount -t tmpfs fusecsi-smoke /host/mnt && echo from-pod > /host/mnt/hello && sleep 3600"]
    securityContext: {privileged: true}
    volumeMounts:
    - {name: host, mountPath: /host, mountPropagation: Bidirectional}
  volumes:
  - name: host
    hostPath: {path: $PROP_DIR, type: DirectoryOrCreate}
EOF
    kc wait --for=condition=Ready --timeout=120s pod/client pod/propagation >/dev/null
}

pod_has_ip() {
    local ip
    ip=$(kc get pod client -o jsonpath='{.status.podIP}')
    echo "  client pod IP: $ip"
    [[ $ip == 10.88.* ]]
}

# Anonymous requests may read /version (system:public-info-viewer).
reaches_api_service() {
    kc exec client -- wget -q -O - --no-check-certificate "https://$API_SERVICE_IP:443/version" |
        grep -q "\"gitVersion\": \"$KUBE_VERSION\""
}

# With the pod's token the apiserver knows the caller: 403 Forbidden (no RBAC grant), not 401.
token_is_accepted() {
    local out
    # shellcheck disable=SC2016  # $(cat ...) runs inside the pod
    out=$(kc exec client -- sh -c 'wget -q -O - --no-check-certificate \
        --header "Authorization: Bearer $(cat /var/run/secrets/kubernetes.io/serviceaccount/token)" \
        https://'"$API_SERVICE_IP"'/api/v1/namespaces/default/pods 2>&1' 2>&1 || true)
    [[ $out == *"403 Forbidden"* ]]
}

host_sees_pod_mount() {
    local i
    for ((i = 0; i < 20; i++)); do
        [[ $(cat "$PROP_DIR/mnt/hello" 2>/dev/null) == from-pod ]] && return 0
        sleep 0.5
    done
    return 1
}

main() {
    check "node $NODE_NAME is Ready" node_ready
    check "kubectl get nodes,pods -A" lists_work
    if create_pods; then
        check "busybox pod has a pod IP" pod_has_ip
        check "pod reaches the apiserver at $API_SERVICE_IP:443" reaches_api_service
        check "apiserver accepts the pod's service-account token" token_is_accepted
        check "host sees a mount made in a Bidirectional hostPath volume" host_sees_pod_mount
    else
        check "test pods become Ready" false
        kc describe pods | tail -n 30 || true
    fi
    echo "$passed passed, $failed failed"
    ((failed == 0))
}

main "$@"
