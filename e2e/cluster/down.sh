#!/usr/bin/env bash
# Tears down the cluster that up.sh started and removes everything it left on the host:
# processes, mounts, pod network namespaces, veths and the bridge, iptables rules and chains,
# kubepods cgroups, changed sysctls, and the cluster's state (etcd data, containerd root,
# certificates, kubelet dir). Logs are kept in $CLUSTER_DIR/logs for post-mortems; pass --purge
# to remove them too.
#
# Idempotent: every step tolerates finding nothing, so running it with no cluster succeeds.

set -euo pipefail

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[[ $(id -u) == 0 ]] || die "must run as root"
PURGE=false
[[ ${1:-} == --purge ]] && PURGE=true

# --- Processes --------------------------------------------------------------------------------------
# Kills every container of ours through containerd while it still runs, so that the shims exit
# and containerd forgets them. (Without a CRI client this skips the CNI DEL of each sandbox; the
# network leftovers it would have removed are cleaned below.)
kill_containers() {
    component_pid containerd >/dev/null || return 0
    local ctr_=(ctr -a "$CONTAINERD_SOCK" -n k8s.io) t c
    for t in $("${ctr_[@]}" tasks ls -q 2>/dev/null); do
        "${ctr_[@]}" tasks kill --all --signal SIGKILL "$t" >/dev/null 2>&1 || true
    done
    for t in $("${ctr_[@]}" tasks ls -q 2>/dev/null); do
        "${ctr_[@]}" tasks delete --force "$t" >/dev/null 2>&1 || true
    done
    for c in $("${ctr_[@]}" containers ls -q 2>/dev/null); do
        "${ctr_[@]}" containers delete "$c" >/dev/null 2>&1 || true
    done
}

# Pids of processes that belong to this cluster even without a pidfile: anything in our
# kubepods cgroups, anything running one of our Kubernetes binaries, and containerd, its shims,
# runc and etcd when their command line names our cluster dir.
stray_pids() {
    local p exe cmd
    for p in /proc/[0-9]*; do
        p=${p#/proc/}
        if grep -qs ':/kubepods' "/proc/$p/cgroup"; then
            echo "$p"
            continue
        fi
        exe=$(readlink "/proc/$p/exe" 2>/dev/null) || continue
        exe=${exe% (deleted)}
        if [[ $exe == "$KUBE_BIN_DIR"/* ]]; then
            echo "$p"
            continue
        fi
        case ${exe##*/} in
            containerd | containerd-shim-runc-v2 | runc | etcd)
                cmd=$(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null) || continue
                [[ $cmd == *"$CLUSTER_DIR/"* ]] && echo "$p"
                ;;
        esac
    done
}

kill_strays() {
    local pids i
    for ((i = 0; i < 20; i++)); do
        mapfile -t pids < <(stray_pids)
        ((${#pids[@]} == 0)) && return 0
        log "killing leftover processes: ${pids[*]}"
        kill -KILL "${pids[@]}" 2>/dev/null || true
        sleep 0.5
    done
    log "WARNING: processes still alive: $(stray_pids | tr '\n' ' ')"
}

stop_all() {
    # Node agents first, so that nothing restarts the containers killed next.
    stop_components 20 kubelet kube-proxy
    kill_containers
    stop_components 20 kube-scheduler kube-controller-manager kube-apiserver
    # etcd last among the servers: the apiserver flushes to it on the way down.
    stop_components 20 etcd containerd
    kill_strays
}

# --- Mounts -----------------------------------------------------------------------------------------
# Mount points under a directory, deepest first (mountinfo field 5, with \040-style escapes).
mounts_under() {
    local dir=$1
    awk -v d="$dir" '$5 == d || index($5, d "/") == 1 { print $5 }' /proc/self/mountinfo |
        while read -r m; do printf '%b\n' "$m"; done | awk '{ print length, $0 }' | sort -rn | cut -d' ' -f2-
}

unmount_all() {
    local dir m i left
    for dir in "$KUBELET_DIR" "$CLUSTER_DIR"; do
        for ((i = 0; i < 5; i++)); do
            mapfile -t left < <(mounts_under "$dir")
            ((${#left[@]} == 0)) && break
            for m in "${left[@]}"; do
                umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
            done
        done
        mapfile -t left < <(mounts_under "$dir")
        ((${#left[@]} == 0)) || die "could not unmount: ${left[*]}"
    done
}

# --- Network ------------------------------------------------------------------------------------------
remove_links() {
    local l
    # veths of pods whose namespace is already gone disappear by themselves; any other port of
    # our bridge is removed explicitly.
    for l in $(ip -o link show master "$CNI_BRIDGE" 2>/dev/null | awk -F': ' '{ print $2 }' | cut -d@ -f1); do
        ip link delete "$l" 2>/dev/null || true
    done
    if ip link show "$CNI_BRIDGE" >/dev/null 2>&1; then
        log "deleting bridge $CNI_BRIDGE"
        ip link delete "$CNI_BRIDGE"
    fi
}

# Writes an iptables-restore script that removes our chains from one table: every KUBE-* chain
# (kubelet's and kube-proxy's; one Kubernetes per machine), CNI chains whose rules carry our CNI
# network's name, CNI-HOSTPORT-* chains left empty by that, and every rule jumping to them.
_iptables_cleanup_script() {
    awk -v net="name: \\\\\"$CNI_NETWORK_NAME\\\\\"" '
        /^\*/ { table = $0 }
        /^:/ { chain = substr($1, 2); chains[chain] = 1; order[++n] = chain }
        /^-A / {
            rules[++r] = $0; rchain[r] = $2
            for (i = 3; i < NF; i++) if ($i == "-j" || $i == "-g") rtarget[r] = $(i + 1)
            if (index($0, net) > 0) { mine[r] = 1; if (rtarget[r] ~ /^CNI-/) ours[rtarget[r]] = 1 }
            count[$2]++
        }
        END {
            if (table == "") exit
            for (c in chains) if (c ~ /^KUBE-/) ours[c] = 1
            # Shared portmap chains are ours once every rule in them is ours.
            for (c in chains) if (c ~ /^CNI-HOSTPORT-/) {
                left = 0
                for (i = 1; i <= r; i++) if (rchain[i] == c && !mine[i] && !(rtarget[i] in ours)) left++
                if (left == 0) ours[c] = 1
            }
            print table
            for (i = 1; i <= r; i++)
                if (!(rchain[i] in ours) && (mine[i] || (rtarget[i] in ours))) { sub(/^-A /, "-D ", rules[i]); print rules[i] }
            for (j = 1; j <= n; j++) if (order[j] in ours) print "-F " order[j]
            for (j = 1; j <= n; j++) if (order[j] in ours) print "-X " order[j]
            print "COMMIT"
        }'
}

remove_iptables() {
    local fam table script
    # kube-proxy knows its own rules best (iptables, and nftables/IPVS leftovers of other modes).
    if [[ -x $KUBE_BIN_DIR/kube-proxy ]] && { iptables-save | grep -q KUBE- || ip6tables-save | grep -q KUBE-; }; then
        mkdir -p "$LOG_DIR"
        "$KUBE_BIN_DIR/kube-proxy" --cleanup >>"$LOG_DIR/kube-proxy-cleanup.log" 2>&1 || true
    fi
    for fam in iptables ip6tables; do
        for table in raw mangle nat filter; do
            script=$("$fam-save" -t "$table" 2>/dev/null | _iptables_cleanup_script) || continue
            # Only a header and COMMIT: nothing of ours in this table.
            (($(wc -l <<<"$script") > 2)) || continue
            log "removing our $fam rules from table $table"
            "$fam-restore" --noflush <<<"$script" || log "WARNING: $fam-restore failed for table $table"
        done
    done
}

# The iptables-nft backend leaves its tables behind once empty. Drop those that did not exist
# before up.sh and hold no rule any more; anything with a rule belongs to someone else.
remove_nft_tables() {
    local before=$CLUSTER_DIR/nft-tables.before t
    command -v nft >/dev/null && [[ -e $before ]] || return 0
    while read -r t; do
        grep -qxF "$t" "$before" && continue
        # shellcheck disable=SC2086  # "table FAMILY NAME" split on purpose
        if ! nft list $t | awk '/^\t\t/ && !/^\t\ttype / { found = 1 } END { exit !found }'; then
            nft delete $t 2>/dev/null || true
        fi
    done < <(nft list tables)
}

restore_sysctls() {
    local saved=$CLUSTER_DIR/sysctl.saved line
    [[ -s $saved ]] || return 0
    while read -r line; do
        sysctl -qw "$line" 2>/dev/null || log "WARNING: could not restore $line"
    done <"$saved"
    rm -f "$saved"
}

# --- cgroups ------------------------------------------------------------------------------------------
# kubelet (cgroupsPerQOS) creates /kubepods in every hierarchy; runc puts containers below it.
remove_cgroups() {
    local root dir i
    for root in /sys/fs/cgroup/*; do
        dir=$root/kubepods
        [[ -d $dir ]] || continue
        for ((i = 0; i < 10; i++)); do
            find "$dir" -depth -type d -exec rmdir {} + 2>/dev/null || true
            [[ -d $dir ]] || break
            sleep 0.5
        done
        [[ -d $dir ]] && log "WARNING: could not remove cgroup $dir"
    done
    return 0
}

# --- Files ------------------------------------------------------------------------------------------
remove_state() {
    local l
    # Symlinks kubelet made to our pod logs.
    if [[ -d /var/log/containers ]]; then
        for l in /var/log/containers/*; do
            [[ -L $l && $(readlink "$l") == "$CLUSTER_DIR"/* ]] && rm -f "$l"
        done
        rmdir /var/log/containers 2>/dev/null || true
    fi
    # containerd's shims keep their sockets in /run/containerd/s whatever the state dir; they
    # remove them on exit, leaving empty directories behind.
    rmdir /run/containerd/s /run/containerd 2>/dev/null || true
    # --one-file-system: never descend into a mount that unmount_all somehow missed.
    rm -rf --one-file-system "$KUBELET_DIR"
    if [[ -d $CLUSTER_DIR ]]; then
        find "$CLUSTER_DIR" -mindepth 1 -maxdepth 1 ! -name logs ! -name logs.previous \
            -exec rm -rf --one-file-system {} +
        if $PURGE; then
            rm -rf "$CLUSTER_DIR"
        fi
    fi
}

# e2e/deploy.sh makes each root a shared bind of itself (HostToContainer propagation needs a
# shared host mount) and lists it in $CLUSTER_DIR/shared-roots: undo those binds.
unshare_roots() {
    local list=$CLUSTER_DIR/shared-roots root
    [[ -f $list ]] || return 0
    while read -r root; do
        [[ -n $root ]] && mountpoint -q "$root" && umount -l "$root"
    done <"$list"
    rm -f "$list"
}

main() {
    take_cluster_lock
    [[ -d $CLUSTER_DIR ]] || log "no cluster dir at $CLUSTER_DIR; cleaning up leftovers only"
    stop_all
    unmount_all
    unshare_roots
    remove_links
    remove_iptables
    remove_nft_tables
    remove_cgroups
    restore_sysctls
    remove_state
    log "cluster down"
}

main "$@"
