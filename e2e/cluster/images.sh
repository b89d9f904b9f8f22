#!/usr/bin/env bash
# Builds the container images the e2e cluster needs, by hand, and imports them into containerd.
#
# No registry is reachable here, so every image is built locally as an OCI image-layout archive
# (a tar of blobs/sha256/*, index.json and oci-layout) and imported with
# `ctr -n k8s.io images import`. Archives are cached under $FUSECSI_CACHE/images, keyed by a hash
# of their inputs, so an unchanged image is never rebuilt.
#
# Source it to reuse the functions (oci_image_from_rootfs is meant for the driver image too), or
# run it:   images.sh build [NAME...]     build (or reuse) archives, print their paths
#           images.sh import [NAME...]    build and import into the running cluster's containerd
#           images.sh import-archive FILE...   import archives built elsewhere (e.g. the driver's)
# NAMEs: pause busybox csi-provisioner csi-resizer fusecsi-registrar fusecsi-livenessprobe
# (default: all).

set -euo pipefail

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

IMAGE_CACHE=$FUSECSI_CACHE/images

# Image references. The pause image uses the name kubelet 1.33 expects by default, so nothing
# else needs to be told about it; the sidecars keep their upstream names so manifests written
# for upstream images work unchanged (they are only ever used with imagePullPolicy IfNotPresent).
PAUSE_IMAGE=registry.k8s.io/pause:3.10
BUSYBOX_IMAGE=fusecsi.local/busybox:1.35
# kubernetes-csi sidecars: name, Go module, version, main package (relative to the module).
# The newest release of each that builds from the Go module proxy reachable here: provisioner
# v6.4.0 needs sig-storage-lib-external-provisioner v13.1.0, which the proxy refuses. All work
# with Kubernetes 1.33 (they switch VolumeAttributesClass support off when its v1 API is absent).
SIDECARS=(
    "csi-provisioner github.com/kubernetes-csi/external-provisioner/v6 v6.3.0 cmd/csi-provisioner"
    "csi-resizer github.com/kubernetes-csi/external-resizer/v2 v2.3.0 cmd/csi-resizer"
)

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

# Stores a file as a content-addressed blob in an OCI layout dir; prints "<digest> <size>".
_oci_add_blob() {
    local layout=$1 file=$2 digest size
    digest=$(sha256_of "$file")
    size=$(stat -c %s "$file")
    mkdir -p "$layout/blobs/sha256"
    mv "$file" "$layout/blobs/sha256/$digest"
    echo "$digest $size"
}

# Prints a JSON array of strings; the arguments must not contain quotes or backslashes.
_json_array() {
    local out="" s
    for s in "$@"; do
        [[ $s != *[\"\\]* ]] || die "cannot JSON-encode: $s"
        out+="${out:+,}\"$s\""
    done
    echo "[$out]"
}

# oci_image_from_rootfs ROOTFS REF ENTRYPOINT...
#   Builds a one-layer OCI image archive whose filesystem is the directory ROOTFS and prints the
#   archive's path. The archive name is derived from the layer and config digests, so the same
#   rootfs and entrypoint give the same archive and nothing is rewritten.
#   Optional environment: OCI_ENV (space-separated KEY=VALUE list, default a standard PATH),
#   OCI_WORKDIR (default /), OCI_USER (default: the image's default, root).
#   The layer is an uncompressed tar (valid OCI, and containerd does not have to decompress it);
#   owners and mtimes are kept (Python compares .pyc and .py mtimes), in sorted order.
oci_image_from_rootfs() {
    (($# >= 3)) || die "usage: oci_image_from_rootfs ROOTFS REF ENTRYPOINT..."
    local rootfs=$1 ref=$2
    shift 2
    [[ -d $rootfs ]] || die "no such rootfs directory: $rootfs"
    [[ $ref == */*:* ]] || die "image reference must be fully qualified with a tag: $ref"
    mkdir -p "$IMAGE_CACHE"
    local work layout layer_digest layer_size config_digest config_size manifest_digest
    local manifest_size out env_json tag=${ref##*:} var
    work=$(mktemp -d "$IMAGE_CACHE/.build.XXXXXX")
    layout=$work/layout

    tar --sort=name --numeric-owner --xattrs --acls \
        -C "$rootfs" -cf "$work/layer.tar" .
    read -r layer_digest layer_size < <(_oci_add_blob "$layout" "$work/layer.tar")

    local envs=()
    read -r -a envs <<<"${OCI_ENV:-PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin}"
    env_json=$(_json_array "${envs[@]}")
    {
        printf '{"architecture":"amd64","os":"linux","config":{'
        printf '"Entrypoint":%s,"Env":%s,"WorkingDir":"%s"' \
            "$(_json_array "$@")" "$env_json" "${OCI_WORKDIR:-/}"
        [[ -n ${OCI_USER:-} ]] && printf ',"User":"%s"' "$OCI_USER"
        printf '},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]},' "$layer_digest"
        printf '"history":[{"created_by":"fusecsi e2e/cluster/images.sh oci_image_from_rootfs"}]}'
    } >"$work/config.json"
    read -r config_digest config_size < <(_oci_add_blob "$layout" "$work/config.json")

    printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",%s,%s}' \
        "$(printf '"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s}' "$config_digest" "$config_size")" \
        "$(printf '"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%s}]' "$layer_digest" "$layer_size")" \
        >"$work/manifest.json"
    read -r manifest_digest manifest_size < <(_oci_add_blob "$layout" "$work/manifest.json")

    # containerd names imported images after io.containerd.image.name; the OCI ref.name
    # annotation carries the tag, as the image-layout spec intends.
    printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"platform":{"architecture":"amd64","os":"linux"},"annotations":{"io.containerd.image.name":"%s","org.opencontainers.image.ref.name":"%s"}}]}' \
        "$manifest_digest" "$manifest_size" "$ref" "$tag" >"$layout/index.json"
    echo '{"imageLayoutVersion":"1.0.0"}' >"$layout/oci-layout"

    var=$(tr -c 'A-Za-z0-9._-' '_' <<<"$ref" | sed 's/_$//')
    out=$IMAGE_CACHE/$var@${manifest_digest:0:16}.oci.tar
    if [[ ! -s $out ]]; then
        tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$layout" \
            -cf "$out.tmp" oci-layout index.json blobs
        mv "$out.tmp" "$out"
    fi
    rm -rf "$work"
    echo "$out"
}

# Runs BUILDER (a function that fills a rootfs dir and prints the entrypoint, one word a line)
# only when no archive exists for KEY; prints the archive path. KEY must change whenever any
# input of the image changes.
# A minimal Debian rootfs (debootstrap minbase with PACKAGES) as a tarball at TAR, made once:
# the image builds key TAR by suite and packages. Usage: cached_debian_rootfs TAR SUITE PACKAGES
cached_debian_rootfs() {
    local tar=$1 suite=$2 packages=$3 base
    [[ -s $tar ]] && return 0
    log "debootstrap $suite with $packages (one-time, cached in $tar)"
    command -v debootstrap >/dev/null || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }
    mkdir -p "$(dirname "$tar")"
    base=$(mktemp -d "$(dirname "$tar")/.debootstrap.XXXXXX")
    nice_run debootstrap --variant=minbase --include="$packages" "$suite" "$base" >&2
    # Trim what a container never uses: apt lists, docs, man pages, locales.
    rm -rf "$base"/var/lib/apt/lists/* "$base"/var/cache/apt/*.bin "$base"/usr/share/doc/* \
        "$base"/usr/share/man/* "$base"/usr/share/locale/* "$base"/var/log/*
    tar --numeric-owner -C "$base" -cf "$tar.tmp" .
    mv "$tar.tmp" "$tar"
    rm -rf "$base"
}

_cached_image() {
    local name=$1 key=$2 ref=$3 builder=$4 stamp archive rootfs entry=()
    stamp=$IMAGE_CACHE/$name.$key.path
    if [[ -s $stamp ]] && [[ -s $(<"$stamp") ]]; then
        cat "$stamp"
        return 0
    fi
    log "building image $ref"
    mkdir -p "$IMAGE_CACHE"
    rootfs=$(mktemp -d "$IMAGE_CACHE/.rootfs.XXXXXX")
    if ! "$builder" "$rootfs" >"$rootfs.entry"; then
        rm -rf "$rootfs" "$rootfs.entry"
        die "image builder $builder failed for $ref"
    fi
    mapfile -t entry <"$rootfs.entry"
    archive=$(oci_image_from_rootfs "$rootfs" "$ref" "${entry[@]}")
    rm -rf "$rootfs" "$rootfs.entry"
    echo "$archive" >"$stamp"
    echo "$archive"
}

# --- pause ----------------------------------------------------------------------------------------
_pause_rootfs() {
    gcc -static -s -O2 -Wall -Wextra -o "$1/pause" "$E2E_CLUSTER_SRC/pause/pause.c" >&2 || return 1
    echo /pause
}

build_pause_image() {
    local key
    key=$( (sha256sum "$E2E_CLUSTER_SRC/pause/pause.c"; gcc --version | head -1) | sha256sum | cut -c1-16)
    _cached_image pause "$key" "$PAUSE_IMAGE" _pause_rootfs
}

# --- busybox --------------------------------------------------------------------------------------
# Debian's statically linked busybox, with one symlink per applet and the few files most test
# pods expect (/etc/passwd for `id`, /tmp).
_busybox_rootfs() {
    local root=$1 applet
    mkdir -p "$root/bin" "$root/etc" "$root/tmp" "$root/root" "$root/proc" "$root/sys" "$root/dev"
    chmod 1777 "$root/tmp"
    cp /bin/busybox "$root/bin/busybox"
    for applet in $(/bin/busybox --list-full); do
        [[ $applet == bin/busybox ]] && continue
        mkdir -p "$root/$(dirname "$applet")"
        ln -sf /bin/busybox "$root/$applet"
    done
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' \
        >"$root/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
    echo /bin/sh
}

build_busybox_image() {
    local key
    key=$( (dpkg-query -W -f='${Version}' busybox-static; sha256sum /bin/busybox) | sha256sum | cut -c1-16)
    _cached_image busybox "$key" "$BUSYBOX_IMAGE" _busybox_rootfs
}

# --- kubernetes-csi sidecars --------------------------------------------------------------------------
# Builds one sidecar command from its Go module. Modules that carry `replace` directives (e.g.
# external-provisioner pins the k8s.io staging modules) cannot be built with `go install m@v`,
# so each is built from a wrapper module that requires it and copies its replace lines.
build_sidecar_binary() {
    local name=$1 module=$2 version=$3 pkg=$4
    local dir=$FUSECSI_CACHE/sidecars/$name/$version info gomod goversion
    if [[ -x $dir/bin/$name ]]; then
        echo "$dir/bin/$name"
        return 0
    fi
    command -v go >/dev/null || die "go is required to build $name"
    log "building $name $version from $module (slow on a cold cache)"
    mkdir -p "$dir/src" "$dir/bin"
    info=$(cd "$dir/src" && go mod download -json "$module@$version")
    gomod=$(sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p' <<<"$info")
    goversion=$(sed -n 's/^go \([0-9.]*\)$/\1/p' "$gomod")
    {
        echo "// Generated by fusecsi e2e/cluster/images.sh: builds $name $version."
        echo "module fusecsi.local/build/$name"
        echo
        echo "go $goversion"
        echo
        echo "require $module $version"
        echo
        # Single-line and block replace directives, copied as they are.
        sed -n -e '/^replace (/,/^)/p' -e '/^replace [^(]/p' "$gomod"
    } >"$dir/src/go.mod"
    printf '//go:build tools\n\npackage tools\n\nimport _ "%s/%s"\n' "$module" "$pkg" >"$dir/src/tools.go"
    (cd "$dir/src" && nice_run go mod tidy >&2) || return 1
    (cd "$dir/src" && CGO_ENABLED=0 nice_run go build -trimpath \
        -ldflags "-s -w -X main.version=$version" -o "$dir/bin/$name" "$module/$pkg" >&2) || return 1
    echo "$dir/bin/$name"
}

# The upstream images are distroless: the binary at /<name> is the entrypoint.
_sidecar_rootfs() {
    local root=$1 binary
    binary=$(build_sidecar_binary "$SIDECAR_NAME" "$SIDECAR_MODULE" "$SIDECAR_VERSION" "$SIDECAR_PKG") || return 1
    mkdir -p "$root/tmp" "$root/etc"
    chmod 1777 "$root/tmp"
    printf 'root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n' \
        >"$root/etc/passwd"
    cp "$binary" "$root/$SIDECAR_NAME"
    echo "/$SIDECAR_NAME"
}

build_sidecar_image() {
    local want=$1 entry
    for entry in "${SIDECARS[@]}"; do
        read -r SIDECAR_NAME SIDECAR_MODULE SIDECAR_VERSION SIDECAR_PKG <<<"$entry"
        [[ $SIDECAR_NAME == "$want" ]] || continue
        _cached_image "$SIDECAR_NAME" "$SIDECAR_VERSION" \
            "registry.k8s.io/sig-storage/$SIDECAR_NAME:$SIDECAR_VERSION" _sidecar_rootfs
        return
    done
    die "unknown sidecar: $want"
}

# --- fusecsi's stand-ins for node-driver-registrar and livenessprobe -----------------------------------
# The upstream modules cannot be fetched here (the module proxy refuses them), so
# e2e/cluster/sidecars has small implementations of the same roles, with the same main flags.
# Their tag only changes by hand; the archive is rebuilt whenever their source changes.
STANDIN_VERSION=0.1.0
REGISTRAR_IMAGE=fusecsi.local/fusecsi-registrar:$STANDIN_VERSION
LIVENESSPROBE_IMAGE=fusecsi.local/fusecsi-livenessprobe:$STANDIN_VERSION

_standin_source_key() {
    (cd "$E2E_CLUSTER_SRC/sidecars" && find . -type f \( -name '*.go' -o -name 'go.*' \) -print0 |
        sort -z | xargs -0 sha256sum; go version) | sha256sum | cut -c1-16
}

build_standin_binaries() {
    local dir key
    key=$(_standin_source_key)
    dir=$FUSECSI_CACHE/sidecars/fusecsi-standins/$key
    if [[ ! -x $dir/bin/fusecsi-registrar || ! -x $dir/bin/fusecsi-livenessprobe ]]; then
        log "building fusecsi-registrar and fusecsi-livenessprobe"
        mkdir -p "$dir/bin"
        (cd "$E2E_CLUSTER_SRC/sidecars" && CGO_ENABLED=0 nice_run go build -trimpath \
            -ldflags "-s -w -X main.version=$STANDIN_VERSION" -o "$dir/bin/" ./cmd/... >&2) || return 1
    fi
    echo "$dir/bin"
}

_standin_rootfs() {
    local root=$1 bindir
    bindir=$(build_standin_binaries) || return 1
    mkdir -p "$root/tmp"
    chmod 1777 "$root/tmp"
    cp "$bindir/$STANDIN_NAME" "$root/$STANDIN_NAME"
    echo "/$STANDIN_NAME"
}

build_standin_image() {
    STANDIN_NAME=$1
    local ref
    case $STANDIN_NAME in
        fusecsi-registrar) ref=$REGISTRAR_IMAGE ;;
        fusecsi-livenessprobe) ref=$LIVENESSPROBE_IMAGE ;;
        *) die "unknown stand-in: $STANDIN_NAME" ;;
    esac
    _cached_image "$STANDIN_NAME" "$(_standin_source_key)" "$ref" _standin_rootfs
}

# --- import ---------------------------------------------------------------------------------------
# Imports an archive into the cluster's containerd (namespace k8s.io, which the CRI uses) unless
# an image with the same name and manifest digest is already there.
import_image() {
    local archive=$1 ref digest
    ref=$(tar -xOf "$archive" index.json | sed -n 's/.*"io.containerd.image.name":"\([^"]*\)".*/\1/p')
    digest=$(tar -xOf "$archive" index.json | sed -n 's/.*"digest":"\(sha256:[0-9a-f]*\)".*/\1/p')
    if ctr -a "$CONTAINERD_SOCK" -n k8s.io images ls "name==$ref" 2>/dev/null | grep -q "$digest"; then
        return 0
    fi
    log "importing $ref"
    ctr -a "$CONTAINERD_SOCK" -n k8s.io images import "$archive" >/dev/null
}

ALL_IMAGES=(pause busybox csi-provisioner csi-resizer fusecsi-registrar fusecsi-livenessprobe)

build_image() {
    case $1 in
        pause) build_pause_image ;;
        busybox) build_busybox_image ;;
        csi-*) build_sidecar_image "$1" ;;
        fusecsi-registrar | fusecsi-livenessprobe) build_standin_image "$1" ;;
        *) die "unknown image: $1 (known: ${ALL_IMAGES[*]})" ;;
    esac
}

images_main() {
    local cmd=${1:-} name archive
    shift || true
    case $cmd in
        build)
            (($# > 0)) || set -- "${ALL_IMAGES[@]}"
            for name in "$@"; do build_image "$name"; done
            ;;
        import)
            (($# > 0)) || set -- "${ALL_IMAGES[@]}"
            for name in "$@"; do
                archive=$(build_image "$name")
                import_image "$archive"
            done
            ;;
        import-archive)
            for archive in "$@"; do import_image "$archive"; done
            ;;
        *)
            echo "usage: $0 build|import [${ALL_IMAGES[*]}]" >&2
            echo "       $0 import-archive OCI_ARCHIVE..." >&2
            return 2
            ;;
    esac
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    images_main "$@"
fi
