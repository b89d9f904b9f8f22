#!/usr/bin/env bash
# Regenerate the betterproto bindings of the CSI spec (protos/csi/v1) from csi.proto of the
# pinned spec release, taken from its Go module. `--check` regenerates into a temporary directory
# and fails if the committed bindings differ by a single byte.
set -euo pipefail
SPEC_MODULE=github.com/container-storage-interface/spec
SPEC_VERSION=v1.12.0
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-$here/../.venv/bin/python}
python=$(cd "$(dirname "$py")" && pwd)/$(basename "$py")

spec_dir=$(cd "$(mktemp -d)" && go mod download -json "$SPEC_MODULE@$SPEC_VERSION" |
  "$python" -c 'import json,sys; d=json.load(sys.stdin); print(d.get("Dir") or sys.exit(d.get("Error")))')
include=$("$python" -c 'import grpc_tools, os; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))')

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# The plugin is found on PATH: put the venv's bin first.
PATH="$(dirname "$python"):$PATH" "$python" -m grpc_tools.protoc \
  -I "$spec_dir" -I "$include" --python_betterproto_out="$out" "$spec_dir/csi.proto" >/dev/null

if [[ "${1:-}" == "--check" ]]; then
  cmp "$out/csi/v1/__init__.py" "$here/csi/v1/__init__.py" ||
    { echo "protos/csi/v1/__init__.py differs from a fresh generation: run protos/generate.sh" >&2; exit 1; }
  echo "protos: bindings match csi.proto $SPEC_VERSION"
else
  mkdir -p "$here/csi/v1"
  # The plugin writes the parent package's __init__.py only sometimes; ours is always empty.
  : >"$here/csi/__init__.py"
  cp "$out/csi/v1/__init__.py" "$here/csi/v1/__init__.py"
  cp "$spec_dir/csi.proto" "$here/csi.proto"
  chmod 0644 "$here/csi.proto"
  echo "protos: generated from $SPEC_MODULE@$SPEC_VERSION"
fi
