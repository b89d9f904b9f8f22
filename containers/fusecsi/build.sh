#!/usr/bin/env bash
# Builds the fusecsi image (node plugin, controller, and the `fusecsi fuse` client) as an OCI
# archive, without Docker or a registry, and prints the archive's path:
#   1. a Debian bookworm rootfs (debootstrap --variant=minbase) with python3 and fuse3, cached as
#      a tarball keyed by the package list, so it is made once per machine;
#   2. wheels of fusecsi and its dependencies, built on this machine (pyfuse3 compiles against
#      Debian's libfuse3, the same release as in the image), installed into /opt/fusecsi with
#      the image's own python3;
#   3. one layer, via oci_image_from_rootfs from e2e/cluster/images.sh.
# The image reference is fusecsi.local/fusecsi:<version>-<hash of the sources>, so a change in
# the code gives a new tag and kubelet never runs a stale image under an old name.
# Usage: containers/fusecsi/build.sh [--ref-only]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source=../../e2e/cluster/images.sh
source "$repo/e2e/cluster/images.sh"

SUITE=bookworm
PACKAGES=python3,python3-venv,fuse3,libfuse3-3,ca-certificates,util-linux,procps
base_key=$(printf '%s %s v1' "$SUITE" "$PACKAGES" | sha256sum | cut -c1-16)
base_tar=$FUSECSI_CACHE/rootfs/debian-$SUITE-$base_key.tar

sources_hash=$(cd "$repo" && git ls-files -z csi strategies protos pyproject.toml containers/fusecsi |
  xargs -0 sha256sum | sha256sum | cut -c1-12)
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$repo/pyproject.toml")
ref=fusecsi.local/fusecsi:$version-$sources_hash
if [[ ${1:-} == --ref-only ]]; then echo "$ref"; exit 0; fi

stamp=$FUSECSI_CACHE/images/fusecsi.$sources_hash.$base_key.path
if [[ -s $stamp && -s $(<"$stamp") ]]; then cat "$stamp"; exit 0; fi

cached_debian_rootfs "$base_tar" "$SUITE" "$PACKAGES"

work=$(mktemp -d "$FUSECSI_CACHE/images/.fusecsi.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir "$work/rootfs"
tar --numeric-owner -C "$work/rootfs" -xf "$base_tar"

log "building wheels of fusecsi $version ($sources_hash)"
python=${VENV:-$repo/.venv}/bin/python
"$python" -m pip wheel -q --wheel-dir "$work/rootfs/tmp/wheels" "$repo" >&2
chroot "$work/rootfs" /usr/bin/python3 -m venv /opt/fusecsi
chroot "$work/rootfs" /opt/fusecsi/bin/python -m pip install -q --no-index --no-compile \
  --find-links /tmp/wheels fusecsi >&2
chroot "$work/rootfs" /opt/fusecsi/bin/python -m compileall -q /opt/fusecsi >/dev/null
rm -rf "$work/rootfs/tmp/wheels" "$work/rootfs/root/.cache"
# The node plugin's default state dir and the socket dir exist in the image.
mkdir -p "$work/rootfs/csi" "$work/rootfs/run/fusecsi"

export OCI_ENV="PATH=/opt/fusecsi/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin PYTHONUNBUFFERED=1"
archive=$(oci_image_from_rootfs "$work/rootfs" "$ref" /opt/fusecsi/bin/fusecsi)
echo "$archive" >"$stamp"
echo "$archive"
