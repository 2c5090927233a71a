#!/usr/bin/env bash
# `make test-wasm`: the core's tests in wasm32-unknown-unknown (usize = 32 bits), run
# under Node by wasm-bindgen-test-runner. No browser. Exits non-zero when a test fails.
#
# The runner must be the exact version of the `wasm-bindgen` crate in Cargo.lock; it
# is installed once into .tools/ (git-ignored) and reused afterwards.
# Extra arguments go to the test binary, e.g. `scripts/wasm-test.sh ledger` to filter.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
CARGO="${CARGO:-cargo}"
TARGET=wasm32-unknown-unknown

# (a) The target.
if ! rustup target list --installed | grep -qx "$TARGET"; then
  rustup target add "$TARGET" >&2
fi

# (b) wasm-bindgen-test-runner at the version Cargo.lock resolves for wasm-bindgen.
if [[ ! -f Cargo.lock ]]; then
  "$CARGO" generate-lockfile >&2
fi
version="$(awk '
  $0 == "[[package]]" { name = "" }
  $1 == "name" && $3 == "\"wasm-bindgen\"" { name = "wasm-bindgen" }
  name == "wasm-bindgen" && $1 == "version" { gsub(/"/, "", $3); print $3; exit }
' Cargo.lock)"
if [[ -z "$version" ]]; then
  echo "wasm-test: no wasm-bindgen package in Cargo.lock" >&2
  exit 1
fi
tool_root="$root/.tools/wasm-bindgen-$version"
runner="$tool_root/bin/wasm-bindgen-test-runner"
if [[ ! -x "$runner" ]] || [[ "$("$runner" --version 2>/dev/null || true)" != *" $version"* ]]; then
  echo "wasm-test: installing wasm-bindgen-cli $version into $tool_root (a few minutes, once)" >&2
  # --locked first. If the registry lacks a version the CLI's own lockfile pins (it
  # happens: a lockfile newer than the registry's copy), resolve afresh; the CLI still
  # pins its wasm-bindgen crates to exactly $version, so the runner matches.
  if ! "$CARGO" install wasm-bindgen-cli --version "$version" --locked --root "$tool_root" >&2; then
    echo "wasm-test: --locked install failed; retrying without --locked" >&2
    "$CARGO" install wasm-bindgen-cli --version "$version" --root "$tool_root" >&2
  fi
fi

# Node runs the tests (wasm-bindgen-test's default when no run_in_browser is set).
if ! command -v node >/dev/null 2>&1; then
  echo "wasm-test: node is needed to run the wasm tests" >&2
  exit 1
fi

# (c) The tests.
export CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER="$runner"
exec "$CARGO" test --target "$TARGET" --test wasm_core -- "$@"
