#!/usr/bin/env bash
# The shared bench (../shared/bench/run.sh) against a private redis-server, never the machine's own: the
# harness flushes its Redis database before each app, so its redis-cli and redis-benchmark are wrappers
# that add this server's port, and BENCH_REDIS_URL names it. Arguments and the environment (ONLY,
# DURATION, BENCH_TRACING, ...) go to run.sh as they are; the server is stopped by its PID at the end.
#
#   ONLY="bare redis-1rtt gateway-mw aiohttp-proxy gateway-proxy" DURATION=10s bench/shared_bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
harness=${SHARED_BENCH:-../shared/bench}
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
work=$(mktemp -d)
redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --daemonize yes \
  --pidfile "$work/redis.pid" --dir "$work" >/dev/null
trap 'kill "$(cat "$work/redis.pid")" 2>/dev/null || true; rm -rf "$work"' EXIT
for tool in redis-cli redis-benchmark; do
  printf '#!/bin/sh\nexec %s -p %s "$@"\n' "$(command -v "$tool")" "$port" > "$work/$tool"
  chmod +x "$work/$tool"
done
for _ in $(seq 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.05; done
PATH="$work:$PATH" BENCH_REDIS_URL="redis://127.0.0.1:$port/9" PYTHONPATH="$PWD/bench" "$harness/run.sh" "$@"
