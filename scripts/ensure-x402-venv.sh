#!/usr/bin/env bash
# Prints the python of a local venv (.venv-x402, git-ignored) holding the official x402
# SDK and what the reference signer, facilitator and paid server need.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.venv-x402"
source "$root/scripts/lib/install-lock.sh"
install_lock "$root" x402-venv
stamp="$venv/.pag0-installed-v1"
if [[ ! -f "$stamp" ]]; then
  python3 -m venv --clear "$venv" >&2
  "$venv/bin/pip" install --quiet 'x402[fastapi,evm]==2.25.0' 'uvicorn==0.54.0' 'eth-account==0.14.0' >&2
  touch "$stamp"
fi
echo "$venv/bin/python"
