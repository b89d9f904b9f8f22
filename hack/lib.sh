# Shared by the hack/ scripts: where caches live and how to reach the project's venv.
# shellcheck shell=bash
FUSECSI_CACHE=${FUSECSI_CACHE:-$HOME/.cache/fusecsi}
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$REPO_ROOT/.venv}
CSI_SANITY_VERSION=v5.6.0
export FUSECSI_CACHE REPO_ROOT VENV CSI_SANITY_VERSION
log() { printf '==> %s\n' "$*" >&2; }
