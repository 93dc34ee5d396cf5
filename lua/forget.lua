-- Forget usage counters of a month that is over and already in the record: each field only while it
-- still holds the value the record was given (a later change keeps it for the next flush).
-- KEYS: 1 state hash, 2 (optional) the state hash of one of its members (lib/members.lua) to forget them from.
-- ARGV: field, value, field, value, ...
-- Answers how many fields were forgotten; forgetting bumps `chg`, so the next flush rewrites the snapshot.
--#include args
if #ARGV % 2 ~= 0 then bad_arg(#ARGV, 'followed by its value (ARGV is field, value pairs)') end
local H = KEYS[2] or KEYS[1]
local forgotten = 0
for i = 1, #ARGV, 2 do
  if redis.call('HGET', H, ARGV[i]) == ARGV[i + 1] then
    redis.call('HDEL', H, ARGV[i])
    forgotten = forgotten + 1
  end
end
if forgotten > 0 then redis.call('HINCRBY', KEYS[1], 'chg', 1) end
return forgotten
