-- An idempotency record (gateway/idempotency.py), under its billable's hash tag. KEYS: 1 the record.
-- ARGV: 1 "read": answers the record or nil;
--       "answer", 2 the record with the first answer: replaces the record decide.lua made, keeping its
--         expiry (answers 1; 0 when it has expired meanwhile: nothing is written);
--       "put", 2 the record, 3 lifetime (s): made unless one is there (answers 1, else 0).
--#include args
local op = text_arg(1, {read = true, answer = true, put = true})
if op == 'read' then return redis.call('GET', KEYS[1]) end
text_arg(2)
if op == 'put' then
  local ttl = whole_arg(3, 1)
  if redis.call('SET', KEYS[1], ARGV[2], 'NX', 'EX', ttl) then return 1 end
  return 0
end
local left = redis.call('PTTL', KEYS[1])
if left <= 0 then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', left)
return 1
