# shellcheck shell=bash
# shellcheck disable=SC2034  # a settings library: its variables are used by the scripts that source it
# Shared settings and helpers for the single-node e2e cluster (up.sh, down.sh, images.sh).
# Sourced, never executed. Every path and version the cluster uses is defined here, once.

# --- Versions -----------------------------------------------------------------------------------
# One Kubernetes release for every component. 1.33 is the newest line that still runs on this
# machine's cgroup v1 without extra flags and whose kubelet still falls back to its own
# cgroupDriver setting when Debian's containerd 1.6 cannot answer the CRI RuntimeConfig call.
KUBE_VERSION=${KUBE_VERSION:-v1.33.13}
# The matching k8s.io/* staging modules are tagged v0.<minor>.<patch>.
KUBE_STAGING_VERSION=v0.${KUBE_VERSION#v1.}

# --- Paths --------------------------------------------------------------------------------------
E2E_CLUSTER_SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
FUSECSI_CACHE=${FUSECSI_CACHE:-$HOME/.cache/fusecsi}
# Everything the running cluster owns lives under CLUSTER_DIR, except the kubelet root dir and
# the CNI bridge, whose locations other components expect.
CLUSTER_DIR=${FUSECSI_CLUSTER_DIR:-/var/lib/fusecsi-cluster}
LOG_DIR=$CLUSTER_DIR/logs
RUN_DIR=$CLUSTER_DIR/run
PKI_DIR=$CLUSTER_DIR/pki
CONF_DIR=$CLUSTER_DIR/conf
KUBECONFIG_ADMIN=$CLUSTER_DIR/kubeconfig
KUBELET_DIR=/var/lib/kubelet
CONTAINERD_ROOT=$CLUSTER_DIR/containerd/root
CONTAINERD_STATE=$CLUSTER_DIR/containerd/state
CONTAINERD_SOCK=$RUN_DIR/containerd.sock
CNI_CONF_DIR=$CLUSTER_DIR/cni/net.d
CNI_DATA_DIR=$CLUSTER_DIR/cni/ipam
CNI_BIN_DIR=/usr/lib/cni
KUBE_BIN_DIR=$FUSECSI_CACHE/kube/$KUBE_VERSION/bin

# --- Network ------------------------------------------------------------------------------------
NODE_NAME=${FUSECSI_NODE_NAME:-fusecsi-node}
# The bridge is created by up.sh (not lazily by the CNI plugin) so that its address exists
# before the apiserver starts: the apiserver advertises it, and pods reach it via their gateway.
CNI_BRIDGE=fusecsi0
CNI_NETWORK_NAME=fusecsi
POD_CIDR=10.88.0.0/16
NODE_IP=10.88.0.1
SERVICE_CIDR=10.0.0.0/24
API_SERVICE_IP=10.0.0.1
API_PORT=6443

log() { printf '%s [cluster] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# Builds are niced so that they do not starve tests that other people run on the same 2 cores.
nice_run() { nice -n 10 "$@"; }

# --- Processes ----------------------------------------------------------------------------------
pidfile() { echo "$RUN_DIR/$1.pid"; }

# Prints the pid of a running component, or fails. The pidfile alone is not trusted: the pid
# must still belong to a process whose executable has the component's name (pids get reused).
component_pid() {
    local name=$1 pid exe
    [[ -r $(pidfile "$name") ]] || return 1
    pid=$(<"$(pidfile "$name")")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
    [[ $(basename "${exe% (deleted)}") == "$name" ]] || return 1
    echo "$pid"
}

# Starts a long-running server in the background with its own log file and pidfile.
# setsid: its own session, so a Ctrl-C in the calling shell does not kill the cluster.
start_component() {
    local name=$1
    shift
    if component_pid "$name" >/dev/null; then
        log "$name already running"
        return 0
    fi
    log "starting $name"
    setsid "$@" >>"$LOG_DIR/$name.log" 2>&1 </dev/null 9>&- &
    echo $! >"$(pidfile "$name")"
}

# stop_components TIMEOUT NAME...: SIGTERM to each running component, a wait of up to TIMEOUT
# seconds for all of them together, then SIGKILL for any left. Only ever the pids from our
# pidfiles (checked by component_pid).
stop_components() {
    local timeout=$1 name pid i alive
    shift
    local pids=()
    for name in "$@"; do
        if pid=$(component_pid "$name"); then
            log "stopping $name (pid $pid)"
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
        fi
    done
    for ((i = 0; i < timeout * 10; i++)); do
        alive=()
        for pid in "${pids[@]}"; do
            kill -0 "$pid" 2>/dev/null && alive+=("$pid")
        done
        ((${#alive[@]} == 0)) && break
        sleep 0.1
    done
    for pid in "${pids[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then
            log "pid $pid did not exit in ${timeout}s, killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    for name in "$@"; do
        rm -f "$(pidfile "$name")"
    done
}

# Polls a command until it succeeds; on timeout shows the component's log tail and fails.
wait_for() {
    local what=$1 timeout=$2 logname=$3 i
    shift 3
    for ((i = 0; i < timeout; i++)); do
        if "$@" >/dev/null 2>&1; then
            return 0
        fi
        if [[ -n $logname ]] && ! component_pid "$logname" >/dev/null; then
            tail -n 30 "$LOG_DIR/$logname.log" >&2 || true
            die "$logname exited while waiting for $what (log: $LOG_DIR/$logname.log)"
        fi
        sleep 1
    done
    [[ -n $logname ]] && tail -n 30 "$LOG_DIR/$logname.log" >&2
    die "timed out after ${timeout}s waiting for $what"
}

# One up.sh or down.sh at a time: the cluster is machine-wide, and several people may share the
# machine. The lock lives in the cache, not the cluster dir, so down.sh can delete the latter.
take_cluster_lock() {
    mkdir -p "$FUSECSI_CACHE"
    # A fixed fd, so that start_component can close it: a component inheriting it would hold
    # the lock for as long as it runs.
    exec 9>>"$FUSECSI_CACHE/cluster.lock"
    if ! flock -n 9; then
        log "waiting for another up.sh/down.sh to finish"
        flock -w 1800 9 || die "timed out waiting for $FUSECSI_CACHE/cluster.lock"
    fi
}

# --- Host packages ------------------------------------------------------------------------------
# nftables: kube-proxy's cleanup and down.sh use `nft`.
DEBIAN_PACKAGES=(containerd runc containernetworking-plugins etcd-server iptables nftables conntrack
    ipset busybox-static openssl curl gcc libc6-dev)

ensure_debian_packages() {
    local missing=() p
    for p in "${DEBIAN_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    ((${#missing[@]} == 0)) && return 0
    log "installing Debian packages: ${missing[*]}"
    apt-get update -qq
    # Debian's containerd package ships no running service here (no init system), so installing
    # it does not start a second containerd.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}

# --- Kubernetes binaries ------------------------------------------------------------------------
KUBE_COMMANDS=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy)

kube_binaries_present() {
    local c
    for c in "${KUBE_COMMANDS[@]}"; do
        [[ -x $KUBE_BIN_DIR/$c ]] || return 1
    done
}

# Builds the Kubernetes commands from the k8s.io/kubernetes module with `go build`.
# k8s.io/kubernetes replaces its k8s.io/* staging modules with ./staging/src/... directories, and
# replace directives of a dependency are ignored, so a wrapper module has to pin each staging
# module to its published v0.X.Y instead. All commands are built in one `go build` so shared
# packages are compiled once.
build_kube() {
    kube_binaries_present && return 0
    command -v go >/dev/null || die "go is required to build Kubernetes"
    local src=$FUSECSI_CACHE/kube/$KUBE_VERSION/src kmod info commit mod pkgs=() c start
    start=$(date +%s)
    mkdir -p "$src" "$KUBE_BIN_DIR"
    log "building Kubernetes $KUBE_VERSION (slow on a cold cache)"
    # Read the upstream go.mod to learn the staging module names and the tag's commit.
    info=$(cd "$src" && go mod download -json "k8s.io/kubernetes@$KUBE_VERSION")
    kmod=$(sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p' <<<"$info")
    commit=$(sed -n 's/^[[:space:]]*"Hash": "\(.*\)",\{0,1\}$/\1/p' <<<"$info")
    {
        echo "// Generated by fusecsi e2e/cluster/lib.sh: builds Kubernetes $KUBE_VERSION."
        echo "module fusecsi.local/kubebuild"
        echo
        echo "go 1.24.0"
        echo
        # Same runtime behaviour defaults as upstream's main module.
        echo "godebug default=go1.24"
        echo
        echo "require k8s.io/kubernetes $KUBE_VERSION"
        echo
        echo "replace ("
        sed -n 's|^[[:space:]]*\(k8s.io/[a-z0-9-]*\) => ./staging/src/.*|\1|p' "$kmod" |
            while read -r mod; do echo "    $mod => $mod $KUBE_STAGING_VERSION"; done
        echo ")"
    } >"$src/go.mod"
    # A tools file records the commands as dependencies so `go mod tidy` resolves them.
    {
        echo "//go:build tools"
        echo
        echo "package tools"
        echo
        echo "import ("
        for c in "${KUBE_COMMANDS[@]}"; do
            echo "    _ \"k8s.io/kubernetes/cmd/$c\""
            pkgs+=("k8s.io/kubernetes/cmd/$c")
        done
        echo ")"
    } >"$src/tools.go"
    (cd "$src" && nice_run go mod tidy)
    # Version stamping as upstream's hack/lib/version.sh does, so nodes report v1.33.x.
    local vpkg ldflags="-s -w"
    for vpkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        ldflags+=" -X $vpkg.gitVersion=$KUBE_VERSION -X $vpkg.gitCommit=$commit"
        ldflags+=" -X $vpkg.gitTreeState=clean -X $vpkg.buildDate=1970-01-01T00:00:00Z"
        ldflags+=" -X $vpkg.gitMajor=1 -X $vpkg.gitMinor=$(cut -d. -f2 <<<"$KUBE_VERSION")"
    done
    (cd "$src" && CGO_ENABLED=0 nice_run go build -trimpath -ldflags "$ldflags" -o "$KUBE_BIN_DIR/" "${pkgs[@]}")
    log "built Kubernetes $KUBE_VERSION in $(($(date +%s) - start))s"
}

# kubectl matching the cluster's minor version when the machine has several (the preinstalled
# Cloud SDK dispatcher ships kubectl.1.27 ... kubectl.1.33 next to a default one).
find_kubectl() {
    local minor k
    minor=$(cut -d. -f1,2 <<<"${KUBE_VERSION#v}")
    for k in "$(dirname "$(readlink -f "$(command -v kubectl)")")/kubectl.$minor" \
        "$(command -v "kubectl.$minor" || true)" "$(command -v kubectl || true)"; do
        [[ -n $k && -x $k ]] && { echo "$k"; return 0; }
    done
    return 1
}
