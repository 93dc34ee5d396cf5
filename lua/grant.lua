-- Apply credit grant number ARGV[1] (amount ARGV[2], negative to take back) exactly once, in order;
-- ARGV[3] = "1" when missing state must be restored first.
-- KEYS: 1 state hash. Answers {"applied" | "duplicate" | "gap" | "missing", last applied, purchased - debt}
-- (integer replies: exact up to 2^53, where cjson would keep 14 digits).
local S = KEYS[1]
local seq, amount = tonumber(ARGV[1]), tonumber(ARGV[2])
if ARGV[3] == '1' and redis.call('HEXISTS', S, 'hyd') == 0 then
  return {'missing', 0, 0}  -- restore the billable from the record first
end
local last = tonumber(redis.call('HGET', S, 'c:seq')) or 0
local purchased = tonumber(redis.call('HGET', S, 'c:p')) or 0
local debt = tonumber(redis.call('HGET', S, 'c:d')) or 0
if seq <= last then
  return {'duplicate', last, purchased - debt}
end
if seq ~= last + 1 then
  return {'gap', last, purchased - debt}
end
if amount >= 0 then
  -- Debt is paid first by any grant.
  local pay = math.min(debt, amount)
  debt, purchased = debt - pay, purchased + amount - pay
else
  local take = math.min(-amount, purchased)
  purchased, debt = purchased - take, debt + (-amount - take)
end
redis.call('HSET', S, 'c:p', purchased, 'c:d', debt, 'c:seq', seq, 'hyd', 1)
redis.call('HINCRBY', S, 'chg', 1)
return {'applied', seq, purchased - debt}
