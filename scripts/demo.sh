#!/usr/bin/env bash
# `make demo`: plays the scenarios through the real listener. Uses a running
# `make run` if there is one; otherwise starts it, plays, and stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
if curl -fsS http://127.0.0.1:9901/ready >/dev/null 2>&1; then
  exec python3 demo/play.py
fi
scripts/run.sh >/tmp/pag0-demo-run.log 2>&1 &
run_pid=$!
trap 'kill "$run_pid" 2>/dev/null || true; wait "$run_pid" 2>/dev/null || true' EXIT
python3 demo/play.py --wait 30
