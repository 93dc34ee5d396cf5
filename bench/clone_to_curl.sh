#!/usr/bin/env bash
# Seconds from `git clone` to the answer of the first curl line of the README's quick start, following it
# exactly: a fresh clone in a temporary folder, a fresh venv, `gateway demo`, then its first curl line.
# Usage: bench/clone_to_curl.sh [REPO]  (default: this checkout; the demo listens on 8080, as the README says)
set -euo pipefail
repo=${1:-$(cd "$(dirname "$0")/.." && pwd)}
work=$(mktemp -d)
trap 'kill -INT "$demo" 2>/dev/null; wait "$demo" 2>/dev/null; rm -rf "$work"' EXIT
start=$(date +%s.%N)
git clone -q "$repo" "$work/gateway" && cd "$work/gateway"
( python3 -m venv .venv && .venv/bin/pip install -q -e . && exec .venv/bin/gateway demo ) > demo.log 2>&1 &
demo=$!
until grep -q '^  curl ' demo.log; do
  kill -0 "$demo" 2>/dev/null || { cat demo.log; exit 1; }
  sleep 0.1
done
KEY=$(sed -n 's/^  export KEY=//p' demo.log)
export KEY
first=$(grep -m1 '^  curl ' demo.log | sed 's/^  //')
status=$(eval "$first -s -o /dev/null -w '%{http_code}'")
end=$(date +%s.%N)
echo "$first -> $status"
echo "seconds from git clone to its answer: $(echo "$end - $start" | bc) (load average: $(cut -d' ' -f1-3 /proc/loadavg))"
