-- Applying credit grant number `seq` (amount, negative to take back) exactly once, in order: shared by
-- grant.lua and restore.lua. Answers "applied" | "duplicate" | "gap", the last applied, purchased - debt.
local function apply_grant(S, seq, amount)
  local last = tonumber(redis.call('HGET', S, 'c:seq')) or 0
  local purchased = tonumber(redis.call('HGET', S, 'c:p')) or 0
  local debt = tonumber(redis.call('HGET', S, 'c:d')) or 0
  if seq <= last then
    return 'duplicate', last, purchased - debt
  end
  if seq ~= last + 1 then
    return 'gap', last, purchased - debt
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
  return 'applied', seq, purchased - debt
end
