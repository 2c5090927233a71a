#!/usr/bin/env bash
# Installs the x402 v1 peers (official npm x402-express and x402-fetch, pinned by
# demo/x402/v1/package-lock.json) into demo/x402/v1/node_modules (git-ignored), with
# Node.js from Debian when the machine has none. Prints the node binary.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dir="$root/demo/x402/v1"
source "$root/scripts/lib/install-lock.sh"
install_lock "$root" x402-npm
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  install_lock "$root" apt 8
  sudo=""; [[ $(id -u) -eq 0 ]] || sudo="sudo"
  $sudo apt-get update -qq >&2 && $sudo apt-get install -y -qq nodejs npm >&2
fi
stamp="$dir/node_modules/.pag0-installed"
if [[ ! -f "$stamp" || "$dir/package-lock.json" -nt "$stamp" ]]; then
  (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error >&2)
  touch "$stamp"
fi
command -v node
