#!/usr/bin/env bash
# Brings up a real single-node Kubernetes cluster on this machine for fusecsi's e2e tests:
# containerd + runc + CNI bridge from Debian, etcd, and kube-apiserver, kube-controller-manager,
# kube-scheduler, kubelet and kube-proxy built from one Kubernetes release.
#
# Idempotent: every step checks before it acts, so running it on a running cluster changes
# nothing and succeeds. The last line of output is `KUBECONFIG=<path>`.
# Tear down with down.sh. See docs/cluster.md.

set -euo pipefail

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source=images.sh
source "$E2E_CLUSTER_SRC/images.sh"

[[ $(id -u) == 0 ]] || die "must run as root (mounts, cgroups, iptables)"

# --- PKI --------------------------------------------------------------------------------------------
# new_cert NAME CN ORG SANS KEYUSAGE [CA]: a key and a cert signed by CA (default: ca) in
# $PKI_DIR, unless present.
new_cert() {
    local name=$1 cn=$2 org=$3 sans=$4 usage=$5 ca=${6:-ca} subj="/CN=$2" ext
    [[ -s $PKI_DIR/$name.crt ]] && return 0
    [[ -n $org ]] && subj="/O=$org/CN=$cn"
    ext=$(mktemp)
    {
        echo "basicConstraints=critical,CA:FALSE"
        echo "keyUsage=critical,digitalSignature,keyEncipherment"
        echo "extendedKeyUsage=$usage"
        [[ -n $sans ]] && echo "subjectAltName=$sans"
    } >"$ext"
    openssl req -new -newkey rsa:2048 -nodes -keyout "$PKI_DIR/$name.key" -subj "$subj" \
        -out "$PKI_DIR/$name.csr" 2>/dev/null
    openssl x509 -req -in "$PKI_DIR/$name.csr" -CA "$PKI_DIR/$ca.crt" -CAkey "$PKI_DIR/$ca.key" \
        -CAcreateserial -days 365 -sha256 -extfile "$ext" -out "$PKI_DIR/$name.crt" 2>/dev/null
    rm -f "$ext" "$PKI_DIR/$name.csr"
}

# new_ca NAME CN: a self-signed CA in $PKI_DIR, unless present.
new_ca() {
    [[ -s $PKI_DIR/$1.crt ]] && return 0
    openssl req -x509 -new -newkey rsa:2048 -nodes -keyout "$PKI_DIR/$1.key" -days 365 \
        -subj "/CN=$2" -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" \
        -out "$PKI_DIR/$1.crt" 2>/dev/null
}

make_pki() {
    mkdir -p "$PKI_DIR"
    chmod 700 "$PKI_DIR"
    [[ -s $PKI_DIR/ca.crt ]] || log "generating certificates in $PKI_DIR"
    new_ca ca fusecsi-cluster-ca
    # Aggregation layer (front proxy), as a real cluster has it: a separate CA whose client
    # cert the apiserver presents to aggregated API servers.
    new_ca front-proxy-ca fusecsi-front-proxy-ca
    new_cert front-proxy-client front-proxy-client "" "" clientAuth front-proxy-ca
    local api_sans="DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc"
    api_sans+=",DNS:kubernetes.default.svc.cluster.local,DNS:localhost,DNS:$NODE_NAME"
    api_sans+=",IP:127.0.0.1,IP:$API_SERVICE_IP,IP:$NODE_IP"
    new_cert apiserver kube-apiserver "" "$api_sans" serverAuth
    # The apiserver's client identity towards kubelets (logs, exec, port-forward).
    new_cert apiserver-kubelet-client kube-apiserver-kubelet-client system:masters "" clientAuth
    new_cert admin kubernetes-admin system:masters "" clientAuth
    new_cert controller-manager system:kube-controller-manager "" "" clientAuth
    new_cert scheduler system:kube-scheduler "" "" clientAuth
    # Bound to the built-in system:node-proxier role.
    new_cert kube-proxy system:kube-proxy "" "" clientAuth
    # system:node:<name> in system:nodes is what the Node authorizer and NodeRestriction expect.
    new_cert kubelet-client "system:node:$NODE_NAME" system:nodes "" clientAuth
    new_cert kubelet-server "$NODE_NAME" "" "DNS:$NODE_NAME,DNS:localhost,IP:$NODE_IP,IP:127.0.0.1" serverAuth
    # Service-account token signing key pair.
    if [[ ! -s $PKI_DIR/sa.key ]]; then
        openssl genrsa -out "$PKI_DIR/sa.key" 2048 2>/dev/null
        openssl rsa -in "$PKI_DIR/sa.key" -pubout -out "$PKI_DIR/sa.pub" 2>/dev/null
    fi
}

# install_file DEST [MODE]: stdin becomes DEST, atomically and only if the content changed.
# Running components must not see a rewrite of their config: kube-proxy exits when its config
# file changes, which would make a second up.sh restart it.
install_file() {
    local dest=$1 mode=${2:-644}
    cat >"$dest.tmp"
    chmod "$mode" "$dest.tmp"
    if cmp -s "$dest.tmp" "$dest"; then
        rm -f "$dest.tmp"
    else
        mv "$dest.tmp" "$dest"
    fi
}

# write_kubeconfig FILE USER CERTNAME: credentials embedded, so the file can be copied anywhere.
write_kubeconfig() {
    local file=$1 user=$2 cert=$3
    install_file "$file" 600 <<EOF
apiVersion: v1
kind: Config
clusters:
- name: fusecsi
  cluster:
    server: https://127.0.0.1:$API_PORT
    certificate-authority-data: $(base64 -w0 "$PKI_DIR/ca.crt")
users:
- name: $user
  user:
    client-certificate-data: $(base64 -w0 "$PKI_DIR/$cert.crt")
    client-key-data: $(base64 -w0 "$PKI_DIR/$cert.key")
contexts:
- name: $user@fusecsi
  context: {cluster: fusecsi, user: $user}
current-context: $user@fusecsi
EOF
}

# --- Configuration files ----------------------------------------------------------------------------
write_configs() {
    mkdir -p "$CONF_DIR" "$CNI_CONF_DIR" "$CNI_DATA_DIR"
    write_kubeconfig "$KUBECONFIG_ADMIN" kubernetes-admin admin
    write_kubeconfig "$CONF_DIR/controller-manager.kubeconfig" system:kube-controller-manager controller-manager
    write_kubeconfig "$CONF_DIR/scheduler.kubeconfig" system:kube-scheduler scheduler
    write_kubeconfig "$CONF_DIR/kubelet.kubeconfig" "system:node:$NODE_NAME" kubelet-client
    write_kubeconfig "$CONF_DIR/kube-proxy.kubeconfig" system:kube-proxy kube-proxy

    # containerd: own root, state and socket, so it cannot clash with another containerd.
    # restrict_oom_score_adj: without CAP_SYS_RESOURCE no process may lower its OOM score, so the
    # CRI must clamp the scores kubelet asks for instead of failing container creation.
    # netns_mounts_under_state_dir: pod network namespaces live under our state dir, not
    # /var/run/netns, so down.sh can find exactly ours.
    install_file "$CONF_DIR/containerd.toml" <<EOF
version = 2
root = "$CONTAINERD_ROOT"
state = "$CONTAINERD_STATE"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "$CONTAINERD_SOCK"

[plugins."io.containerd.internal.v1.opt"]
  path = "$CLUSTER_DIR/containerd/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$CONTAINERD_STATE/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$CNI_BIN_DIR"
    conf_dir = "$CNI_CONF_DIR"
    max_conf_num = 1
EOF

    # CNI: a bridge with host-local addresses, plus portmap for hostPort. No masquerading: pods
    # only need to reach this host (the apiserver), and nothing may leave the machine.
    install_file "$CNI_CONF_DIR/10-$CNI_NETWORK_NAME.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "$CNI_NETWORK_NAME",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$CNI_BRIDGE",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$CNI_DATA_DIR",
        "ranges": [[{"subnet": "$POD_CIDR", "gateway": "$NODE_IP"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF

    # No cluster DNS: pods get a resolver that answers nothing rather than the host's resolver,
    # so no pod traffic is sent off the machine.
    printf 'nameserver 127.0.0.1\noptions timeout:1 attempts:1\n' | install_file "$CONF_DIR/resolv.conf"

    install_file "$CONF_DIR/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $PKI_DIR/ca.crt}
authorization: {mode: Webhook}
tlsCertFile: $PKI_DIR/kubelet-server.crt
tlsPrivateKeyFile: $PKI_DIR/kubelet-server.key
containerRuntimeEndpoint: unix://$CONTAINERD_SOCK
# Debian's containerd 1.6 cannot report its cgroup driver (no CRI RuntimeConfig); kubelet 1.33
# then falls back to this setting. cgroup v1, no systemd: cgroupfs.
cgroupDriver: cgroupfs
# CAP_SYS_RESOURCE is missing, so the default -999 cannot be applied.
oomScoreAdj: 0
failSwapOn: false
clusterDomain: cluster.local
resolvConf: $CONF_DIR/resolv.conf
podLogsDir: $CLUSTER_DIR/pod-logs
# Every image is imported locally and can never be pulled again: never garbage-collect images.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
# Evict only when the machine is really out of resources (the disk is shared with others).
evictionHard:
  memory.available: 100Mi
  nodefs.available: 1%
  nodefs.inodesFree: 1%
  imagefs.available: 1%
serializeImagePulls: false
EOF

    # kube-proxy in iptables mode provides the kubernetes service (10.0.0.1:443 -> apiserver)
    # and every other ClusterIP service. It must leave host-wide conntrack sysctls alone, and not
    # enable route_localnet (only needed for NodePorts on 127.0.0.1).
    install_file "$CONF_DIR/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: $CONF_DIR/kube-proxy.kubeconfig
mode: iptables
clusterCIDR: $POD_CIDR
hostnameOverride: $NODE_NAME
bindAddress: $NODE_IP
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
oomScoreAdj: 0
nodePortAddresses: [primary]
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
iptables:
  localhostNodePorts: false
EOF
}

# --- Host networking ----------------------------------------------------------------------------------
# Sysctls this cluster changes (kubelet sets the vm./kernel. ones itself); their previous values
# are saved once so down.sh can put them back.
HOST_SYSCTLS=(net.ipv4.ip_forward net.bridge.bridge-nf-call-iptables net.bridge.bridge-nf-call-ip6tables
    vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops
    kernel.keys.root_maxkeys kernel.keys.root_maxbytes)

setup_host_network() {
    local s
    # Remember which nftables tables existed, so down.sh can drop the (empty) ones that the
    # iptables-nft backend creates for our rules, and no others.
    if [[ ! -e $CLUSTER_DIR/nft-tables.before ]]; then
        nft list tables >"$CLUSTER_DIR/nft-tables.before.tmp"
        mv "$CLUSTER_DIR/nft-tables.before.tmp" "$CLUSTER_DIR/nft-tables.before"
    fi
    if [[ ! -s $CLUSTER_DIR/sysctl.saved ]]; then
        for s in "${HOST_SYSCTLS[@]}"; do
            echo "$s=$(sysctl -n "$s")"
        done >"$CLUSTER_DIR/sysctl.saved.tmp"
        mv "$CLUSTER_DIR/sysctl.saved.tmp" "$CLUSTER_DIR/sysctl.saved"
    fi
    sysctl -qw net.ipv4.ip_forward=1
    # Service traffic between pods on the same bridge must pass through iptables (kube-proxy).
    sysctl -qw net.bridge.bridge-nf-call-iptables=1 net.bridge.bridge-nf-call-ip6tables=1

    # The bridge exists before any pod so that the apiserver can advertise its address.
    if ! ip link show "$CNI_BRIDGE" >/dev/null 2>&1; then
        log "creating bridge $CNI_BRIDGE ($NODE_IP)"
        ip link add "$CNI_BRIDGE" type bridge
    fi
    ip addr replace "$NODE_IP/${POD_CIDR#*/}" dev "$CNI_BRIDGE"
    ip link set "$CNI_BRIDGE" up
    # Service IPs are routed into our bridge, never to the default gateway: until kube-proxy has
    # written its DNAT rules, a packet for 10.0.0.1 then dies here instead of leaving the machine.
    ip route replace "$SERVICE_CIDR" dev "$CNI_BRIDGE"
}

# --- Components -----------------------------------------------------------------------------------
KUBECTL=$(find_kubectl) || die "kubectl not found"
kc() { "$KUBECTL" --kubeconfig "$KUBECONFIG_ADMIN" "$@"; }

start_containerd() {
    mkdir -p "$CONTAINERD_ROOT" "$CONTAINERD_STATE" "$RUN_DIR"
    start_component containerd containerd --config "$CONF_DIR/containerd.toml"
    wait_for "containerd" 60 containerd ctr -a "$CONTAINERD_SOCK" version
}

start_etcd() {
    mkdir -p "$CLUSTER_DIR/etcd"
    chmod 700 "$CLUSTER_DIR/etcd"
    # Loopback only, on non-default ports so that an etcd used by someone else's tests on this
    # machine does not clash. Plain HTTP: nothing but the apiserver on this host talks to it.
    start_component etcd etcd --name fusecsi --data-dir "$CLUSTER_DIR/etcd" \
        --listen-client-urls http://127.0.0.1:12379 --advertise-client-urls http://127.0.0.1:12379 \
        --listen-peer-urls http://127.0.0.1:12380 --initial-advertise-peer-urls http://127.0.0.1:12380 \
        --initial-cluster fusecsi=http://127.0.0.1:12380 --listen-metrics-urls http://127.0.0.1:12381 \
        --logger zap --log-outputs stderr --auto-compaction-retention 1
    wait_for "etcd" 60 etcd curl -fsS http://127.0.0.1:12379/health
}

start_control_plane() {
    local b=$KUBE_BIN_DIR p=$PKI_DIR
    start_component kube-apiserver "$b/kube-apiserver" \
        --etcd-servers http://127.0.0.1:12379 \
        --bind-address 0.0.0.0 --secure-port "$API_PORT" --advertise-address "$NODE_IP" \
        --service-cluster-ip-range "$SERVICE_CIDR" \
        --authorization-mode Node,RBAC --enable-admission-plugins NodeRestriction \
        --allow-privileged=true \
        --client-ca-file "$p/ca.crt" \
        --tls-cert-file "$p/apiserver.crt" --tls-private-key-file "$p/apiserver.key" \
        --kubelet-client-certificate "$p/apiserver-kubelet-client.crt" \
        --kubelet-client-key "$p/apiserver-kubelet-client.key" \
        --kubelet-certificate-authority "$p/ca.crt" \
        --kubelet-preferred-address-types InternalIP \
        --requestheader-client-ca-file "$p/front-proxy-ca.crt" \
        --requestheader-allowed-names front-proxy-client \
        --requestheader-username-headers X-Remote-User --requestheader-group-headers X-Remote-Group \
        --requestheader-extra-headers-prefix X-Remote-Extra- \
        --proxy-client-cert-file "$p/front-proxy-client.crt" \
        --proxy-client-key-file "$p/front-proxy-client.key" \
        --service-account-issuer https://kubernetes.default.svc.cluster.local \
        --service-account-key-file "$p/sa.pub" --service-account-signing-key-file "$p/sa.key" \
        --v 1
    wait_for "kube-apiserver readiness" 120 kube-apiserver kc get --raw /readyz

    start_component kube-controller-manager "$b/kube-controller-manager" \
        --kubeconfig "$CONF_DIR/controller-manager.kubeconfig" \
        --authentication-kubeconfig "$CONF_DIR/controller-manager.kubeconfig" \
        --authorization-kubeconfig "$CONF_DIR/controller-manager.kubeconfig" \
        --bind-address 127.0.0.1 --leader-elect=false \
        --service-cluster-ip-range "$SERVICE_CIDR" \
        --cluster-signing-cert-file "$p/ca.crt" --cluster-signing-key-file "$p/ca.key" \
        --root-ca-file "$p/ca.crt" --service-account-private-key-file "$p/sa.key" \
        --use-service-account-credentials=true --v 1
    start_component kube-scheduler "$b/kube-scheduler" \
        --kubeconfig "$CONF_DIR/scheduler.kubeconfig" \
        --authentication-kubeconfig "$CONF_DIR/scheduler.kubeconfig" \
        --authorization-kubeconfig "$CONF_DIR/scheduler.kubeconfig" \
        --bind-address 127.0.0.1 --leader-elect=false --v 1
}

# kube-proxy has written the DNAT chain of the default/kubernetes service.
api_service_programmed() {
    iptables -t nat -S KUBE-SERVICES 2>/dev/null | grep -q -- "-d $API_SERVICE_IP/32 .*default/kubernetes:https"
}

start_node() {
    mkdir -p "$KUBELET_DIR" "$CLUSTER_DIR/pod-logs"
    start_component kubelet "$KUBE_BIN_DIR/kubelet" \
        --config "$CONF_DIR/kubelet.yaml" --kubeconfig "$CONF_DIR/kubelet.kubeconfig" \
        --root-dir "$KUBELET_DIR" --hostname-override "$NODE_NAME" --node-ip "$NODE_IP" --v 1
    start_component kube-proxy "$KUBE_BIN_DIR/kube-proxy" --config "$CONF_DIR/kube-proxy.yaml" --v 1
    wait_for "kubelet health" 120 kubelet curl -fsS http://127.0.0.1:10248/healthz
    wait_for "node $NODE_NAME to register" 120 kubelet kc get node "$NODE_NAME"
    wait_for "node $NODE_NAME to be Ready" 180 kubelet \
        kc wait --for=condition=Ready --timeout=1s "node/$NODE_NAME"
    # Pods cannot be created in a namespace before its default service account exists.
    wait_for "default service account" 60 kube-controller-manager kc -n default get serviceaccount default
    wait_for "kube-proxy rules for the kubernetes service" 60 kube-proxy api_service_programmed
}

main() {
    local start
    start=$(date +%s)
    take_cluster_lock
    ensure_debian_packages
    build_kube
    # FUSECSI_CLUSTER_IMAGES picks the images to build and import (default: all of images.sh).
    local images=() name wanted=()
    read -r -a wanted <<<"${FUSECSI_CLUSTER_IMAGES:-${ALL_IMAGES[*]}}"
    for name in "${wanted[@]}"; do
        images+=("$(build_image "$name")")
    done

    if [[ -d $LOG_DIR ]] && ! component_pid kube-apiserver >/dev/null && [[ ! -e $RUN_DIR ]]; then
        # A fresh start after down.sh: keep the previous run's logs one generation back.
        rm -rf "$LOG_DIR.previous"
        mv "$LOG_DIR" "$LOG_DIR.previous"
    fi
    mkdir -p "$CLUSTER_DIR" "$LOG_DIR" "$RUN_DIR"
    make_pki
    write_configs
    setup_host_network

    start_containerd
    for name in "${images[@]}"; do
        import_image "$name"
    done
    start_etcd
    start_control_plane
    start_node
    log "cluster up in $(($(date +%s) - start))s"
    echo "KUBECONFIG=$KUBECONFIG_ADMIN"
}

main "$@"
