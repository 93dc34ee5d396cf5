-- The reconciler's sweep: a billable's holds whose settle never came (their process died) leave the hash
-- once past their lifetime, kept as charged (decide.lua does the same on the billable's next request).
-- KEYS: 1 state hash, 2 metered holds hash. `hx` is the earliest expiry among the holds.
-- Answers how many holds left.
local S, HOLDS = KEYS[1], KEYS[2]
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local next_expiry = tonumber(redis.call('HGET', S, 'hx'))
if not next_expiry or next_expiry > now then return 0 end
next_expiry = nil
local expired = 0
local held = redis.call('HGETALL', HOLDS)
for i = 1, #held, 2 do
  local exp = tonumber(cjson.decode(held[i + 1]).exp) or 0
  if exp <= now then
    redis.call('HDEL', HOLDS, held[i])
    expired = expired + 1
  elseif not next_expiry or exp < next_expiry then
    next_expiry = exp
  end
end
if next_expiry then redis.call('HSET', S, 'hx', next_expiry) else redis.call('HDEL', S, 'hx') end
redis.call('HINCRBY', S, 'chg', 1)
return expired
