#!/usr/bin/env bash
# Where the proxy's time goes: CPU of the serving process per request (from /proc/<pid>/stat over a wrk run)
# for aiohttp-proxy, gateway-proxy, and gateway-proxy with its reconciler idle (the flush's share), same wrk
# settings as ../shared/bench/run.sh. Usage: bench/cpu_per_request.sh   (DURATION=8s ROUNDS=3)
set -euo pipefail
DURATION=${DURATION:-8s}; ROUNDS=${ROUNDS:-3}
source "$(dirname "$0")/lib.sh"
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
UP=$(port); serve upstream "$UP"; export UPSTREAM_URL=http://127.0.0.1:$UP
measure() {  # $1 label, $2 module, then VAR=value for the app
  local p before result after; p=$(port)
  serve "$2" "$p" "${@:3}"
  redis-cli -n 9 flushdb >/dev/null
  wrk -t2 -c64 -d3s -s "$PEERS/keys.lua" "http://127.0.0.1:$p/hello" >/dev/null
  before=$(ticks "$SERVED")
  result=$(wrk -t2 -c64 -d"$DURATION" -s "$PEERS/keys.lua" "http://127.0.0.1:$p/hello" | grep '^RESULT')
  after=$(ticks "$SERVED")
  stop "$SERVED"
  local requests=${result#*requests=}; requests=${requests%% *}
  local rps=${result#*rps=}; rps=${rps%% *}
  echo "$1 $rps $(( (after - before) * 1000000 / $(getconf CLK_TCK) / requests ))"
}
for round in $(seq "$ROUNDS"); do
  measure aiohttp-proxy proxy_aiohttp
  measure gateway-proxy bench_gateway_proxy
  measure gateway-proxy-flush-idle bench_gateway_proxy GATEWAY_RECONCILE_INTERVAL=3600
done | "$PY" -c '
import statistics, sys
rows = {}
for line in sys.stdin:
    name, rps, cpu = line.split()
    rows.setdefault(name, []).append((float(rps), int(cpu)))
base = rows["aiohttp-proxy"]
print("%-26s %8s %11s %19s   medians of %d rounds" % ("app", "req/s", "CPU us/req", "vs aiohttp (req/s)", len(base)))
for name, got in rows.items():
    ratio = statistics.median(a[0] / b[0] for a, b in zip(got, base))
    print(f"{name:26} {statistics.median(r for r, _ in got):8.0f} {statistics.median(c for _, c in got):11.0f} {ratio:19.2f}")
'
