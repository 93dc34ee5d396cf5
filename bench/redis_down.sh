#!/usr/bin/env bash
# p50/p99 of gateway-mw with Redis up, then with Redis unreachable (fail-open answers), in one run.
# Same wrk settings and key pool as ../shared/bench/run.sh. Usage: bench/redis_down.sh  (DURATION=10s)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
PEERS=$HERE/../../shared/bench
PY=${PY:-/tmp/benchvenv/bin/python}
DURATION=${DURATION:-10s}
export BENCH_KEYS=${BENCH_KEYS:-1000} PYTHONPATH="$HERE:$PEERS/peers"
port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
run() {  # $1 label, $2 redis url
  local p; p=$(port)
  BENCH_REDIS_URL=$2 "$PY" -m uvicorn bench_gateway_mw:app --host 127.0.0.1 --port "$p" --loop uvloop \
    --http httptools --no-access-log --log-level error & local pid=$!
  for _ in $(seq 100); do curl -s -o /dev/null -H 'X-Api-Key: ready' "http://127.0.0.1:$p/hello" && break; sleep 0.1; done
  wrk -t2 -c64 -d3s -s "$PEERS/keys.lua" "http://127.0.0.1:$p/hello" >/dev/null
  printf '%-12s %s\n' "$1" "$(wrk -t2 -c64 -d"$DURATION" -s "$PEERS/keys.lua" "http://127.0.0.1:$p/hello" | grep '^RESULT')"
  kill "$pid"; wait "$pid" 2>/dev/null || true
}
run redis-up "redis://127.0.0.1:6379/9"
run redis-down "redis://127.0.0.1:$(port)/0"   # nothing listens there: every decision fails open
