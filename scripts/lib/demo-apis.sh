# Sourced by scripts/run.sh and scripts/run-cluster.sh (from the repository root): the
# demo APIs a reference-like config routes to, and the bookkeeping to stop them again.
# Every process started here is added to the `pids` array; `stop_pids` ends them.

pids=()

# Kills every process in `pids` and reaps them (meant for `trap stop_pids EXIT INT TERM`).
stop_pids() {
  trap - EXIT INT TERM
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}

# True when Envoy config $1 routes to the paid x402 demo API.
config_has_x402() {
  grep -q 'cluster_name: x402_demo' "$1"
}

# Starts the demo APIs on 127.0.0.1:18080 and, when config $1 routes to x402.local, the
# paid x402 API on the official SDK's middleware (18402), the reference signer (18403)
# with a demo key made here once, and a local facilitator (18404).
start_demo_apis() {
  python3 demo/upstream.py --port 18080 &
  pids+=($!)
  if config_has_x402 "$1"; then
    local py key=".tools/demo-signer.key"
    py="$(scripts/ensure-x402-venv.sh)"
    if [[ ! -s "$key" ]]; then
      mkdir -p .tools && (umask 077 && "$py" -c 'import secrets; print("0x" + secrets.token_hex(32))' > "$key")
    fi
    "$py" demo/x402/facilitator.py --port 18404 >/dev/null &
    pids+=($!)
    "$py" demo/x402/server.py --port 18402 --facilitator http://127.0.0.1:18404 &
    pids+=($!)
    "$py" demo/x402/signer.py --port 18403 --key-file "$key" >/dev/null &
    pids+=($!)
  fi
}

# True once the x402 signer and paid API answer (at once when config $1 has no x402).
demo_apis_ready() {
  config_has_x402 "$1" || return 0
  curl -fsS http://127.0.0.1:18403/healthz >/dev/null 2>&1 \
    && curl -fsS http://127.0.0.1:18402/free >/dev/null 2>&1
}
