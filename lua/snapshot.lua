-- Everything one billable holds in Redis, with Redis TIME, read atomically.
-- KEYS: 1 state hash, 2 pending events list, 3 metered holds hash.
-- Answers {now (ms), state field/value pairs, holds field/value pairs, pending events}.
local clock = redis.call('TIME')
return {
  tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000),
  redis.call('HGETALL', KEYS[1]),
  redis.call('HGETALL', KEYS[3]),
  redis.call('LLEN', KEYS[2]),
}
