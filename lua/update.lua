-- Operator and billing changes to one billable's state. KEYS: 1 state hash.
-- ARGV[1] names the change; the rest are its values. Changes to what decides the plan bump the
-- plan version (pv), so every process's cached plan goes stale on its next decision.
-- Every argument is checked before the first write (lib/args.lua): a bad one is an error reply, nothing written.
--#include args
local S = KEYS[1]
local op = text_arg(1)
if op == 'assign' or op == 'subscription' or op == 'overrides' or op == 'suspend' then
  text_arg(2)
elseif op == 'period' then
  if whole_arg(2, 0, nil, true) then whole_arg(3, 0) end
elseif op == 'reset' then
  text_arg(2)
elseif op == 'count' then
  text_arg(2)
  whole_arg(3, 0)
elseif op == 'recharge' then
  text_arg(2, {['1'] = true, ['0'] = true})
  whole_arg(3, nil, nil, true)
  whole_arg(4, 0, nil, true)
end
-- Nothing is written above this line.
if op == 'assign' then            -- 2: plan name, "" removes the manual assignment
  if ARGV[2] == '' then redis.call('HDEL', S, 'asg') else redis.call('HSET', S, 'asg', ARGV[2]) end
  redis.call('HINCRBY', S, 'pv', 1)
elseif op == 'subscription' then  -- 2: subscription JSON, "" removes it
  if ARGV[2] == '' then redis.call('HDEL', S, 'sub') else redis.call('HSET', S, 'sub', ARGV[2]) end
  redis.call('HINCRBY', S, 'pv', 1)
elseif op == 'period' then        -- 2, 3: billing period start and end (ms), "" removes it
  if ARGV[2] == '' then redis.call('HDEL', S, 'bp_s', 'bp_e')
  else redis.call('HSET', S, 'bp_s', ARGV[2], 'bp_e', ARGV[3]) end
  redis.call('HINCRBY', S, 'pv', 1)
elseif op == 'overrides' then     -- 2: the billable's overrides (JSON, gateway.overrides), "" removes them
  if ARGV[2] == '' then redis.call('HDEL', S, 'ov') else redis.call('HSET', S, 'ov', ARGV[2]) end
  redis.call('HINCRBY', S, 'pv', 1)
elseif op == 'suspend' then       -- 2: "1" suspends, "" lifts
  if ARGV[2] == '' then redis.call('HDEL', S, 'sus') else redis.call('HSET', S, 'sus', '1') end
  redis.call('HINCRBY', S, 'pv', 1)
elseif op == 'reset' then         -- 2: an allowance: its window forgotten, so the next decision starts one afresh
  local n = ARGV[2]
  redis.call('HDEL', S, 'u:' .. n, 'g:' .. n, 't:' .. n, 'b:' .. n, 'w:' .. n)
elseif op == 'count' then         -- 2: limit, 3: usage of a persistent cap
  redis.call('HSET', S, 'u:' .. ARGV[2], ARGV[3])
  redis.call('HDEL', S, 't:' .. ARGV[2])
elseif op == 'recharge' then      -- 2: enabled "1"/"0", 3: threshold, 4: amount in cents ("" for none)
  redis.call('HSET', S, 'ar:on', ARGV[2])
  if ARGV[3] == '' then redis.call('HDEL', S, 'c:thr') else redis.call('HSET', S, 'c:thr', ARGV[3]) end
  if ARGV[4] == '' then redis.call('HDEL', S, 'ar:amt') else redis.call('HSET', S, 'ar:amt', ARGV[4]) end
elseif op == 'recharge_done' then -- the charger gives its lease back
  redis.call('HDEL', S, 'ar:lease')
else
  return redis.error_reply('unknown update ' .. op)
end
-- No `hyd` here: a change to a billable Redis lost must not pass for its restored state.
return redis.call('HINCRBY', S, 'chg', 1)
