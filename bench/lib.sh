# Shared by the bench/*.sh scripts: the peers' folder, the bench venv, free ports, serving an app, wrk.
# Same wrk settings and key pool as ../shared/bench/run.sh.
HERE=$(cd "$(dirname "${BASH_SOURCE[1]}")" && pwd)
PEERS=$HERE/../../shared/bench
PY=${PY:-/tmp/benchvenv/bin/python}
DURATION=${DURATION:-10s}
export BENCH_KEYS=${BENCH_KEYS:-1000} PYTHONPATH="$HERE:$PEERS/peers"
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true' EXIT

port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# serve MODULE PORT [VAR=value ...]: uvicorn as run.sh starts it; SERVED is its pid once it answers.
serve() {
  env "${@:3}" "$PY" -m uvicorn "$1:app" --host 127.0.0.1 --port "$2" --loop uvloop --http httptools \
    --no-access-log --log-level error 2>/dev/null & SERVED=$!; PIDS+=("$SERVED")
  for _ in $(seq 100); do curl -s -o /dev/null -H 'X-Api-Key: ready' "http://127.0.0.1:$2/hello" && return 0; sleep 0.1; done
  echo "$1 did not answer on port $2" >&2; return 1
}

# load URL [WRK_SCRIPT]: 3 s of warm-up, then DURATION; prints wrk's RESULT line.
load() {
  local script=${2:-$PEERS/keys.lua}
  wrk -t2 -c64 -d3s -s "$script" "$1" >/dev/null
  wrk -t2 -c64 -d"$DURATION" -s "$script" "$1" | grep '^RESULT'
}

stop() { kill "$1"; wait "$1" 2>/dev/null || true; }
