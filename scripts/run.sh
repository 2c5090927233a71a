#!/usr/bin/env bash
# `make run`: the demo APIs on 127.0.0.1:18080 and Envoy with pag0 on 127.0.0.1:10000
# (admin 127.0.0.1:9901), playing envoy/reference.yaml. Runs in the foreground until
# interrupted, then stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."
envoy_bin="$(scripts/ensure-envoy.sh)"
config="${PAG0_CONFIG:-envoy/reference.yaml}"
source scripts/lib/demo-apis.sh
trap stop_pids EXIT INT TERM

start_demo_apis "$config"
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
  if curl -fsS http://127.0.0.1:9901/ready >/dev/null 2>&1 && demo_apis_ready "$config"; then
    break
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
