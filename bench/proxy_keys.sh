#!/usr/bin/env bash
# gateway-proxy with real API keys (its default mode) beside gateway-proxy with the trusted header, in one
# run, same wrk settings as ../shared/bench/run.sh over 1,000 billables. Usage: bench/proxy_keys.sh (DURATION=10s)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
PEERS=$HERE/../../shared/bench
PY=${PY:-/tmp/benchvenv/bin/python}
DURATION=${DURATION:-10s}
WORK=$(mktemp -d)
export BENCH_KEYS=1000 PYTHONPATH="$HERE:$PEERS/peers" KEYS_FILE=$WORK/keys.txt
port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true; rm -rf "$WORK"' EXIT
serve() {  # $1 module, $2 port
  "$PY" -m uvicorn "$1:app" --host 127.0.0.1 --port "$2" --loop uvloop --http httptools --no-access-log \
    --log-level error & PIDS+=($!)
}
"$PY" "$HERE/make_keys.py" "sqlite:///$WORK/gateway.db" 1000 > "$KEYS_FILE"
UP=$(port); serve upstream "$UP"; export UPSTREAM_URL=http://127.0.0.1:$UP
run() {  # $1 label, $2 wrk script, then VAR=value for the gateway
  local p; p=$(port); env "${@:3}" "$PY" -m uvicorn bench_gateway_proxy:app --host 127.0.0.1 --port "$p" \
    --loop uvloop --http httptools --no-access-log --log-level error & PIDS+=($!); local pid=$!
  for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$p/_gateway/health" && break; sleep 0.1; done
  redis-cli -n 9 flushdb >/dev/null
  wrk -t2 -c64 -d3s -s "$2" "http://127.0.0.1:$p/hello" >/dev/null
  printf '%-24s %s\n' "$1" "$(wrk -t2 -c64 -d"$DURATION" -s "$2" "http://127.0.0.1:$p/hello" | grep '^RESULT')"
  kill "$pid"; wait "$pid" 2>/dev/null || true
}
run gateway-proxy-header "$PEERS/keys.lua"
run gateway-proxy-api-keys "$HERE/api_keys.lua" GATEWAY_BENCH_DB="$WORK/gateway.db"
