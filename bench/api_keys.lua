-- wrk script for bench/proxy_keys.sh: each request carries one of the real API keys in $KEYS_FILE
-- (one per line), at random; done() prints the same RESULT line as ../shared/bench/keys.lua.
local reqs = {}

function init(args)
  for line in io.lines(os.getenv("KEYS_FILE")) do
    reqs[#reqs + 1] = wrk.format("GET", wrk.path, { ["X-Api-Key"] = line })
  end
end

function request()
  return reqs[math.random(#reqs)]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "RESULT rps=%.1f p50_ms=%.2f p99_ms=%.2f requests=%d non2xx=%d sockerr=%d\n",
    summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    summary.requests, e.status, e.connect + e.read + e.write + e.timeout))
end
