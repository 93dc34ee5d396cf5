-- decide.lua's spec (included by `--#include spec`; needs args): gateway/state/spec.py's Spec.encode(), a JSON
-- array read by position (cjson reads it in C: cheaper than any parsing in Lua, or one argument a value):
--   [shadow, auto-recharges a month, credits [allowance, period, rollover, cost, shown],
--    pay-as-you-go [meter, the request is one unit billed now] or false,
--    rate limits [[name, interval ms, burst, window s]...],
--    limits [[name, to, cost, period, after code, grace ms, grace max, window s or false,
--             overage [meter, cap] or false, warn_at [thresholds]]...]]
-- It holds no field names: decide.lua makes those of its policies from their names.
local function spec_arg(i)
  local spec = json_arg(i)
  if type(spec[3]) ~= 'table' or type(spec[5]) ~= 'table' or type(spec[6]) ~= 'table' then
    bad_arg(i, 'a decide spec (gateway/state/spec.py Spec.encode)')
  end
  return spec
end
