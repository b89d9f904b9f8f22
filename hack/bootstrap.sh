#!/usr/bin/env bash
# Install what the project needs on a fresh Debian machine: system packages (FUSE headers for
# pyfuse3, bindfs for the benchmark baseline) and the Python venv. Re-runs are cheap: each step
# is skipped when its stamp (keyed by the inputs) says it is done.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

packages=(libfuse3-dev pkg-config fuse3 bindfs gcc debootstrap)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "bootstrap: missing Debian packages (${missing[*]}); installing them needs root" >&2
    exit 2
  fi
  log "installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

stamp_key=$(sha256sum "$REPO_ROOT/pyproject.toml" | cut -c1-16)
stamp=$VENV/.fusecsi-$stamp_key
if [[ ! -f $stamp ]]; then
  log "creating the Python venv in $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q -e "$REPO_ROOT[dev]"
  touch "$stamp"
fi
