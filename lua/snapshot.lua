-- Everything one billable holds in Redis, with Redis TIME, read atomically: its members' state hashes too
-- (those its state names, `mb:<member>` = the member's key: lib/members.lua; all in its hash slot).
-- KEYS: 1 state hash, 2 pending events list, 3 metered holds hash.
-- Answers {now (ms), state field/value pairs, holds field/value pairs, pending events,
--          {member, its field/value pairs, ...}}.
local clock = redis.call('TIME')
local state = redis.call('HGETALL', KEYS[1])
local members = {}
for i = 1, #state, 2 do
  if string.sub(state[i], 1, 3) == 'mb:' then
    members[#members + 1] = string.sub(state[i], 4)
    members[#members + 1] = redis.call('HGETALL', state[i + 1])
  end
end
return {
  tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000),
  state,
  redis.call('HGETALL', KEYS[3]),
  redis.call('LLEN', KEYS[2]),
  members,
}
