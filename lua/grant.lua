-- Apply credit grant number ARGV[1] (amount ARGV[2], negative to take back) exactly once, in order;
-- ARGV[3] = "1" when missing state must be restored first.
-- KEYS: 1 state hash. Answers {"applied" | "duplicate" | "gap" | "missing", last applied, purchased - debt}
-- (integer replies: exact up to 2^53, where cjson would keep 14 digits).
--#include grants
--#include args
local S = KEYS[1]
local seq, amount = whole_arg(1, 1), whole_arg(2)
text_arg(3)
if ARGV[3] == '1' and redis.call('HEXISTS', S, 'hyd') == 0 then
  return {'missing', 0, 0}  -- restore the billable from the record first
end
local status, last, balance = apply_grant(S, seq, amount)
return {status, last, balance}
