-- Everything one billable holds in Redis, with Redis TIME, read atomically.
-- KEYS: 1 state hash, 2 pending events list, 3 metered holds hash.
local clock = redis.call('TIME')
return cjson.encode({
  now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000),
  state = redis.call('HGETALL', KEYS[1]),
  holds = redis.call('HGETALL', KEYS[3]),
  pending = redis.call('LLEN', KEYS[2]),
})
