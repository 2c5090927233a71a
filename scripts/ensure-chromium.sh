#!/usr/bin/env bash
# Prints the path of a Chromium for the dashboard test, installing Debian's if needed.
set -euo pipefail
for candidate in "${CHROMIUM_BIN:-}" chromium chromium-browser; do
  if [[ -n "$candidate" ]] && command -v "$candidate" >/dev/null 2>&1; then
    command -v "$candidate"; exit 0
  fi
done
root="$(cd "$(dirname "$0")/.." && pwd)"
source "$root/scripts/lib/install-lock.sh"
install_lock "$root" apt
# another installer may have finished while this one waited
for candidate in "${CHROMIUM_BIN:-}" chromium chromium-browser; do
  if [[ -n "$candidate" ]] && command -v "$candidate" >/dev/null 2>&1; then
    command -v "$candidate"; exit 0
  fi
done
if [[ "$(id -u)" == 0 ]]; then sudo=""; else sudo="sudo"; fi
$sudo apt-get update -qq >&2
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >&2
command -v chromium
