#!/usr/bin/env bash
# Optimises the built pag0.wasm in place with binaryen's wasm-opt -O3, for speed (see
# Cargo.toml's release profile); wasm-opt comes from Debian when missing. Cargo puts its
# own build back at that path on every `cargo build`, so the result is cached by the
# hash of cargo's output and of the flags.
set -euo pipefail
wasm="${1:?usage: shrink-wasm.sh path/to/pag0.wasm}"
cache="$wasm.shrunk"
input_hash="$(sha256sum "$wasm" | cut -d' ' -f1)-O3"
if [[ -f "$cache" && -f "$cache.from" && "$(cat "$cache.from")" == "$input_hash" ]]; then
  rm -f "$wasm" && cp "$cache" "$wasm"
  exit 0
fi
if [[ -f "$cache" ]] && cmp -s "$cache" "$wasm"; then exit 0; fi
if ! command -v wasm-opt >/dev/null 2>&1; then
  root="$(cd "$(dirname "$0")/.." && pwd)"
  source "$root/scripts/lib/install-lock.sh"
  install_lock "$root" apt
  sudo=""; [[ $(id -u) -eq 0 ]] || sudo="sudo"
  $sudo apt-get update -qq >&2 && $sudo apt-get install -y -qq binaryen >&2
fi
# The features rustc enables by default for wasm32-wasip1 (binaryen must be told).
features=(--enable-bulk-memory --enable-sign-ext --enable-mutable-globals
  --enable-nontrapping-float-to-int --enable-multivalue --enable-reference-types)
before=$(stat -c %s "$wasm")
wasm-opt -O3 "${features[@]}" "$wasm" -o "$cache"
echo "$input_hash" > "$cache.from"
# A new file, not a write through cargo's hard link into deps/.
rm -f "$wasm" && cp "$cache" "$wasm"
echo "wasm-opt -O3: $before -> $(stat -c %s "$wasm") bytes"
