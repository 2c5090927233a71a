#!/usr/bin/env bash
# Installs Redis and Webdis (its HTTP front) from Debian if they are missing: the
# second-level cache's tests and `make run` with a cache cluster need them.
set -euo pipefail
if command -v redis-server >/dev/null 2>&1 && command -v webdis >/dev/null 2>&1; then
  exit 0
fi
root="$(cd "$(dirname "$0")/.." && pwd)"
source "$root/scripts/lib/install-lock.sh"
install_lock "$root" apt
# another installer may have finished while this one waited
if command -v redis-server >/dev/null 2>&1 && command -v webdis >/dev/null 2>&1; then exit 0; fi
if [[ "$(id -u)" == 0 ]]; then sudo=""; else sudo="sudo"; fi
$sudo apt-get update -qq >&2
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq redis-server webdis >&2
