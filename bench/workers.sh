#!/usr/bin/env bash
# `gateway serve` (the real command: its server, slow-client guards and all) with --workers 1 and 2, one run,
# in front of the peers' bare upstream, on a private redis-server, billables named by X-Api-Key (1,000).
# Usage: bench/workers.sh (DURATION=10s; GATEWAY=path to the gateway command; DATABASE_URL=postgresql://...
# for a record of your own, else a SQLite file per run, whose one writer the workers' flushes queue on)
set -euo pipefail
source "$(dirname "$0")/lib.sh"
GATEWAY=${GATEWAY:-$(dirname "$PY")/gateway}
WORK=$(mktemp -d)
REDIS_PORT=$(port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --daemonize no >/dev/null & REDIS=$!
trap 'kill "${PIDS[@]}" "$REDIS" 2>/dev/null || true; rm -rf "$WORK"' EXIT
UP=$(port); serve upstream "$UP"
for workers in 1 2; do
  p=$(port)
  redis-cli -p "$REDIS_PORT" flushall >/dev/null  # the private server's, never the shared one
  "$GATEWAY" serve --plans "$HERE/plans.toml" --upstream "http://127.0.0.1:$UP" --port "$p" --workers "$workers" \
    --redis-url "redis://127.0.0.1:$REDIS_PORT/0" --database-url "${DATABASE_URL:-sqlite:///$WORK/w$workers.db}" \
    --billable-header X-Api-Key >"$WORK/serve-$workers.log" 2>&1 & GW=$!
  for _ in $(seq 200); do curl -s -o /dev/null -H 'X-Api-Key: ready' "http://127.0.0.1:$p/hello" && break; sleep 0.1; done
  printf 'gateway serve --workers %s  %s\n' "$workers" "$(load "http://127.0.0.1:$p/hello")"
  kill -TERM "$GW"; wait "$GW" 2>/dev/null || true
done
