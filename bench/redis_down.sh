#!/usr/bin/env bash
# p50/p99 of gateway-mw with Redis up, then with Redis unreachable (fail-open answers), in one run.
# Usage: bench/redis_down.sh  (DURATION=10s)
set -euo pipefail
source "$(dirname "$0")/lib.sh"
run() {  # $1 label, $2 redis url
  local p; p=$(port)
  serve bench_gateway_mw "$p" BENCH_REDIS_URL="$2"
  printf '%-12s %s\n' "$1" "$(load "http://127.0.0.1:$p/hello")"
  stop "$SERVED"
}
run redis-up "redis://127.0.0.1:6379/9"
run redis-down "redis://127.0.0.1:$(port)/0"   # nothing listens there: every decision fails open
