#!/usr/bin/env bash
# `make demo`: plays the scenarios through the real listener. Uses a running
# `make run` if there is one; otherwise starts it, plays, and stops it.
# PAG0_URL (listener, default http://127.0.0.1:10000) and PAG0_ADMIN (its Envoy's admin,
# default http://127.0.0.1:9901) point it at another running Envoy, e.g. `make run-cluster`'s
# second one: PAG0_URL=http://127.0.0.1:10001 PAG0_ADMIN=http://127.0.0.1:9902 make demo.
set -euo pipefail
cd "$(dirname "$0")/.."
url="${PAG0_URL:-http://127.0.0.1:10000}"
admin="${PAG0_ADMIN:-http://127.0.0.1:9901}"
if curl -fsS "$admin/ready" >/dev/null 2>&1; then
  exec python3 demo/play.py --listener "$url"
fi
if [[ -n "${PAG0_URL:-}${PAG0_ADMIN:-}" ]]; then
  echo "demo.sh: no Envoy is ready at $admin; start it first (make run or make run-cluster)" >&2
  exit 2
fi
scripts/run.sh >/tmp/pag0-demo-run.log 2>&1 &
run_pid=$!
trap 'kill "$run_pid" 2>/dev/null || true; wait "$run_pid" 2>/dev/null || true' EXIT
python3 demo/play.py --wait 30
