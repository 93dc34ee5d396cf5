-- Put back a billable's state from the record (with its members' state hashes), and apply the credit
-- grants recorded after it, in one step (a process that died between the two would leave the state
-- without them). Fields Redis already holds are live and win (a change made while the state was missing,
-- or a concurrent restore); the grants are applied either way, each once and in order. The protocol is
-- gateway/state/restore.py.
-- KEYS: 1 state hash, 2.. the state hashes of its members (lib/members.lua), in the order of ARGV's.
-- ARGV: 1 n = twice the field count, 2..n+1 field, value, ...; then for each member key: twice its field
--       count, field, value, ...; then sequence, amount, ...
-- Answers {1 restored here or 0, the last grant applied, 1 when Redis is behind the first grant given}.
--#include grants
--#include args
local S = KEYS[1]
local n = whole_arg(1, 0, #ARGV - 1)
if n % 2 ~= 0 then bad_arg(1, 'even (twice the field count)') end
local at = n + 2
local members = {}
for k = 2, #KEYS do
  local count = whole_arg(at, 0, #ARGV - at)
  if count % 2 ~= 0 then bad_arg(at, "even (twice a member's field count)") end
  members[#members + 1] = {KEYS[k], at + 1, at + count}
  at = at + count + 1
end
if (#ARGV - at + 1) % 2 ~= 0 then bad_arg(#ARGV, 'followed by its amount (grants are sequence, amount pairs)') end
local grants = {}
for i = at, #ARGV, 2 do grants[#grants + 1] = {whole_arg(i, 1), whole_arg(i + 1)} end
-- Nothing is written above this line.
local restored = 0
if redis.call('HEXISTS', S, 'hyd') == 0 then
  for i = 2, n + 1, 2 do
    redis.call('HSETNX', S, ARGV[i], ARGV[i + 1])
  end
  for _, m in ipairs(members) do
    for i = m[2], m[3], 2 do
      redis.call('HSETNX', m[1], ARGV[i], ARGV[i + 1])
    end
  end
  redis.call('HSET', S, 'hyd', 1)
  restored = 1
end
local gap = 0
for _, g in ipairs(grants) do
  if apply_grant(S, g[1], g[2]) == 'gap' then
    gap = 1
    break
  end
end
return {restored, tonumber(redis.call('HGET', S, 'c:seq')) or 0, gap}
