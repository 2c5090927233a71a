#!/usr/bin/env bash
# Shrinks the built pag0.wasm in place with binaryen's wasm-opt -Oz (installed from
# Debian when missing). Skipped when the file is already the shrunk one.
set -euo pipefail
wasm="${1:?usage: shrink-wasm.sh path/to/pag0.wasm}"
stamp="$wasm.shrunk"
if [[ -f "$stamp" && ! "$wasm" -nt "$stamp" ]]; then exit 0; fi
if ! command -v wasm-opt >/dev/null 2>&1; then
  sudo=""; [[ $(id -u) -eq 0 ]] || sudo="sudo"
  $sudo apt-get update -qq >&2 && $sudo apt-get install -y -qq binaryen >&2
fi
# The features rustc enables by default for wasm32-wasip1 (binaryen must be told).
features=(--enable-bulk-memory --enable-sign-ext --enable-mutable-globals
  --enable-nontrapping-float-to-int --enable-multivalue --enable-reference-types)
before=$(stat -c %s "$wasm")
wasm-opt -Oz "${features[@]}" "$wasm" -o "$wasm.tmp"
mv "$wasm.tmp" "$wasm"
touch "$stamp"
echo "wasm-opt -Oz: $before -> $(stat -c %s "$wasm") bytes"
