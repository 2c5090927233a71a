#!/usr/bin/env bash
# `make run`: the demo APIs on 127.0.0.1:18080 and Envoy with pag0 on 127.0.0.1:10000
# (admin 127.0.0.1:9901), playing envoy/reference.yaml. Runs in the foreground until
# interrupted, then stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."
envoy_bin="$(scripts/ensure-envoy.sh)"
config="${PAG0_CONFIG:-envoy/reference.yaml}"
pids=()
cleanup() {
  trap - EXIT INT TERM
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

python3 demo/upstream.py --port 18080 &
pids+=($!)
if grep -q 'cluster_name: x402_demo' "$config"; then
  # The paid x402 API on the official SDK's middleware (18402), the reference signer
  # (18403) with a demo key made here once, and a local facilitator (18404).
  py="$(scripts/ensure-x402-venv.sh)"
  key=".tools/demo-signer.key"
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
if grep -q '"cluster": "pag0_cache_l2"' "$config"; then
  # The config asks for the second-level cache: Redis on 16379, Webdis on 17379.
  scripts/ensure-redis.sh
  redis-server --port 16379 --bind 127.0.0.1 --save '' --appendonly no >/dev/null &
  pids+=($!)
  webdis_conf="$(mktemp)"
  printf '{"redis_host": "127.0.0.1", "redis_port": 16379, "http_host": "127.0.0.1", "http_port": 17379, "threads": 2, "daemonize": false, "database": 0, "verbosity": 1, "logfile": "/dev/null"}' > "$webdis_conf"
  webdis "$webdis_conf" &
  pids+=($!)
fi
"$envoy_bin" -c "$config" --concurrency 2 --disable-hot-restart --file-flush-interval-msec 500 -l "${ENVOY_LOG_LEVEL:-warning}" &
pids+=($!)
for _ in $(seq 1 300); do
  if curl -fsS http://127.0.0.1:9901/ready >/dev/null 2>&1; then
    if ! grep -q 'cluster_name: x402_demo' "$config"; then break; fi
    if curl -fsS http://127.0.0.1:18403/healthz >/dev/null 2>&1 \
      && curl -fsS http://127.0.0.1:18402/free >/dev/null 2>&1; then break; fi
  fi
  sleep 0.1
done
cat <<MSG
pag0 is up: agents -> http://127.0.0.1:10000   (admin http://127.0.0.1:9901)
  try: curl -s -i -H 'host: api.tavily.com' -H 'x-pag0-api-key: demo-key' \\
         -H 'x-pag0-session: my-session' -H 'x-pag0-agent: researcher-1' \\
         -X POST http://127.0.0.1:10000/search -d '{"query":"pag0"}'
  x402 (pag0 pays): curl -s -i -H 'host: x402.local' -H 'x-pag0-api-key: demo-key' \\
         -H 'x-pag0-session: my-session' -H 'x-pag0-agent: buyer-1' http://127.0.0.1:10000/weather
  play the scenarios: make demo        stop: Ctrl-C
MSG
wait -n "${pids[@]}"
