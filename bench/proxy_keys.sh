#!/usr/bin/env bash
# gateway-proxy with real API keys (its default mode) beside gateway-proxy with the trusted header, in one
# run, over 1,000 billables. Usage: bench/proxy_keys.sh (DURATION=10s)
set -euo pipefail
source "$(dirname "$0")/lib.sh"
WORK=$(mktemp -d)
trap 'kill "${PIDS[@]}" 2>/dev/null || true; rm -rf "$WORK"' EXIT
export KEYS_FILE=$WORK/keys.txt
"$PY" "$HERE/make_keys.py" "sqlite:///$WORK/gateway.db" 1000 > "$KEYS_FILE"
UP=$(port); serve upstream "$UP"; export UPSTREAM_URL=http://127.0.0.1:$UP
run() {  # $1 label, $2 wrk script, then VAR=value for the gateway
  local p; p=$(port)
  serve bench_gateway_proxy "$p" "${@:3}"
  redis-cli -n 9 flushdb >/dev/null
  printf '%-24s %s\n' "$1" "$(load "http://127.0.0.1:$p/hello" "$2")"
  stop "$SERVED"
}
run gateway-proxy-header "$PEERS/keys.lua"
run gateway-proxy-api-keys "$HERE/api_keys.lua" GATEWAY_BENCH_DB="$WORK/gateway.db"
