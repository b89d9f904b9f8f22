#!/usr/bin/env bash
# Builds the JuiceFS client image (for the `mountpod` strategy's Mount Pods) as an OCI archive,
# without Docker or a registry, and prints the archive's path as the last line of stdout:
#   1. the juicefs binary from hack/juicefs.sh (built from its Go module with cgo, so it links
#      glibc dynamically: the image's bookworm glibc is the one it was built against);
#   2. a minimal Debian bookworm rootfs (debootstrap --variant=minbase) with fuse3 (fusermount,
#      which juicefs uses to clear a dead mount point before mounting), ca-certificates (TLS to
#      object stores) and procps; mount/umount/sh come with minbase. Cached as a tarball keyed by
#      the package list, so it is made once per machine;
#   3. one layer, via oci_image_from_rootfs from e2e/cluster/images.sh; the entrypoint is
#      /usr/local/bin/juicefs (a pod's `command` replaces it, e.g. with /bin/sh -c).
# The image reference is fusecsi.local/juicefs:<juicefs version>-<hash of the build inputs> (the
# version, build tags, package list and this script and hack/juicefs.sh), so a change in any of
# them gives a new tag. Not imported anywhere: e2e/cluster/images.sh's import_image does that.
# The built rootfs is checked with `chroot ROOTFS juicefs version` before it is packed.
# Environment: JUICEFS_VERSION, JUICEFS_TAGS (as for hack/juicefs.sh).
# Usage: containers/juicefs/build.sh [--ref-only]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source=../../e2e/cluster/images.sh
source "$repo/e2e/cluster/images.sh"

# shellcheck disable=SC2016  # the sed pattern matches a literal ${...}
JUICEFS_VERSION=${JUICEFS_VERSION:-$(sed -n 's/^JUICEFS_VERSION=\${JUICEFS_VERSION:-\(v[^}]*\)}$/\1/p' "$repo/hack/juicefs.sh")}
JUICEFS_TAGS=${JUICEFS_TAGS:-}
export JUICEFS_VERSION JUICEFS_TAGS
[[ -n $JUICEFS_VERSION ]] || die "cannot read the default JUICEFS_VERSION from hack/juicefs.sh"

SUITE=bookworm
PACKAGES=fuse3,ca-certificates,procps
base_key=$(printf '%s %s juicefs-v1' "$SUITE" "$PACKAGES" | sha256sum | cut -c1-16)
base_tar=$FUSECSI_CACHE/rootfs/debian-$SUITE-$base_key.tar

inputs_hash=$( (printf '%s\n' "$JUICEFS_VERSION" "$JUICEFS_TAGS" "$base_key"
  cd "$repo" && sha256sum hack/juicefs.sh containers/juicefs/build.sh) | sha256sum | cut -c1-12)
ref=fusecsi.local/juicefs:${JUICEFS_VERSION#v}-$inputs_hash
if [[ ${1:-} == --ref-only ]]; then echo "$ref"; exit 0; fi

stamp=$IMAGE_CACHE/juicefs.$inputs_hash.path
if [[ -s $stamp && -s $(<"$stamp") ]]; then cat "$stamp"; exit 0; fi

binary=$("$repo/hack/juicefs.sh" | tail -1)
[[ -x $binary ]] || die "hack/juicefs.sh gave no binary"

cached_debian_rootfs "$base_tar" "$SUITE" "$PACKAGES"

log "building image $ref"
mkdir -p "$IMAGE_CACHE"
work=$(mktemp -d "$IMAGE_CACHE/.juicefs.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir "$work/rootfs"
tar --numeric-owner -C "$work/rootfs" -xf "$base_tar"
install -m 0755 "$binary" "$work/rootfs/usr/local/bin/juicefs"
# juicefs's defaults as root: cache in /var/jfsCache, logs in /var/log. /jfs is a conventional
# mount point inside the pod; /etc/mtab must stay the symlink to /proc (go-fuse would otherwise
# try to update it with `mount -f`).
mkdir -p "$work/rootfs/var/jfsCache" "$work/rootfs/jfs" "$work/rootfs/var/log"
[[ -L $work/rootfs/etc/mtab ]] || ln -sfn ../proc/self/mounts "$work/rootfs/etc/mtab"
# Proves that the image's libraries suffice for the cgo binary (it needs only libc.so.6). It
# also needs /proc (a dependency reads /proc/sys/kernel/osrelease at start-up), which every
# container has: mounted here in a private mount namespace, so it vanishes with the check.
mkdir -p "$work/rootfs/proc"
# shellcheck disable=SC2016  # $1 is expanded by the inner sh
unshare --mount --propagation private sh -c 'mount -t proc proc "$1/proc" && chroot "$1" /usr/local/bin/juicefs version' \
  sh "$work/rootfs" >&2 || die "juicefs does not run inside the rootfs"

export OCI_ENV="PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
archive=$(oci_image_from_rootfs "$work/rootfs" "$ref" /usr/local/bin/juicefs)
echo "$archive" >"$stamp"
echo "$archive"
