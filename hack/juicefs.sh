#!/usr/bin/env bash
# Builds the JuiceFS community client (github.com/juicedata/juicefs) from its Go module, once per
# version and build tags, into $FUSECSI_CACHE/bin/juicefs-<version>[-<tags hash>], and prints the
# binary's path as the last line of stdout (log lines go to stderr).
#
# The module has `replace` directives (its forks of go-fuse, minio, urfave/cli, ...), so
# `go install module@version` refuses it. Its source is fetched with `go mod download` and built
# as the main module, from a writable copy, with its own go.mod and go.sum: exactly the
# dependency versions upstream releases with.
#
# cgo is on (SQLite metadata needs it): the binary links glibc dynamically (libc.so.6, plus
# libm/libpthread/libdl on older glibc), so it runs on this Debian 12 host and in a bookworm image.
#
# Environment:
#   JUICEFS_VERSION  release to build (default below: the newest stable one the module proxy here
#                    serves; v1.4.2+, v1.3.0, v1.3.2, v1.2.x answer 403 on this machine's proxy)
#   JUICEFS_TAGS     comma-separated Go build tags (default empty: every backend, since every
#                    module it needs is served). If the proxy starts refusing a storage SDK,
#                    drop it with JuiceFS's own tags (the Makefile's juicefs.lite target), e.g.
#                    nogateway,nowebdav,nocos,nobos,nohdfs,noibmcos,noobs,nooss,noqingstor,nosftp,
#                    noswift,noazure,nogs,noufile,nob2,nonfs,nodragonfly,nomysql,nopg,notikv,
#                    nobadger,noetcd,nocifs,nostorj,noqiniu,notos,noks3
#                    (upstream's list minus nosqlite: keeps sqlite3, redis, s3 and `file`; add
#                    nos3,noredis for sqlite3 + file only). Never add nogspt: it drops the
#                    rewriting of argv that hides a metadata password from `ps`.
# Usage: hack/juicefs.sh
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
die() { log "ERROR: $*"; exit 1; }

JUICEFS_MODULE=github.com/juicedata/juicefs
JUICEFS_VERSION=${JUICEFS_VERSION:-v1.4.1}
JUICEFS_TAGS=${JUICEFS_TAGS:-}

bin=$FUSECSI_CACHE/bin
out=$bin/juicefs-$JUICEFS_VERSION
if [[ -n $JUICEFS_TAGS ]]; then
  out+=-$(printf '%s' "$JUICEFS_TAGS" | sha256sum | cut -c1-8)
fi
if [[ -x $out ]]; then
  echo "$out"
  exit 0
fi

command -v go >/dev/null || die "go is required to build juicefs"
command -v gcc >/dev/null || die "gcc is required to build juicefs (cgo, for SQLite)"
mkdir -p "$bin"
export GOFLAGS=-modcacherw CGO_ENABLED=1

log "building juicefs $JUICEFS_VERSION${JUICEFS_TAGS:+ (tags $JUICEFS_TAGS)} (one-time, several minutes cold; cached in $bin)"
start=$SECONDS
work=$(mktemp -d "$bin/.juicefs.XXXXXX")
trap 'chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"' EXIT

# Run from an empty module-less dir so that no surrounding go.mod is involved.
info=$(cd "$work" && GOFLAGS=-modcacherw go mod download -json "$JUICEFS_MODULE@$JUICEFS_VERSION") ||
  die "the module proxy does not serve $JUICEFS_MODULE@$JUICEFS_VERSION"
dir=$(sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p' <<<"$info")
hash=$(sed -n 's/^[[:space:]]*"Hash": "\([0-9a-f]*\)",\{0,1\}$/\1/p' <<<"$info")
[[ -d $dir ]] || die "go mod download gave no source dir for $JUICEFS_MODULE@$JUICEFS_VERSION"
cp -r "$dir" "$work/src"
chmod -R u+w "$work/src"

# What upstream's Makefile passes (-s -w and the revision), without needing a git checkout.
pkg=$JUICEFS_MODULE/pkg/version
ldflags="-s -w -X $pkg.revision=${hash:0:7}"
# The release date, as upstream stamps it (the proxy's .info has it).
date=$(cd "$work" && go list -m -json "$JUICEFS_MODULE@$JUICEFS_VERSION" 2>/dev/null |
  sed -n 's/^[[:space:]]*"Time": "\([0-9-]*\)T.*/\1/p' | head -1) || true
[[ -n $date ]] && ldflags+=" -X $pkg.revisionDate=$date"

(cd "$work/src" && nice -n 10 go build -trimpath -tags "$JUICEFS_TAGS" -ldflags "$ldflags" \
  -o "$work/juicefs" . >&2) || die "go build of juicefs $JUICEFS_VERSION failed"
"$work/juicefs" version >&2 || die "the built juicefs does not run"
mv "$work/juicefs" "$out"
log "built $out in $((SECONDS - start)) s"
echo "$out"
